"""NF4 (4-bit NormalFloat) quantization (Dettmers et al. 2023, arXiv 2305.14314),
bit-compatible with bitsandbytes 0.50 on the CPU.

    code:        q_i = Phi^-1(p_i) / Phi^-1(p_max), 16 values in [-1, 1] with an exact 0   (paper eq. 4)
    quantize:    per block of `blocksize` values, c = max|x|; i = nearest code to x * (1/c)
    pack:        two indices per byte, the *first* element in the high nibble
    dequantize:  x_hat = code[i] * c                                                (float32)
    double quant: c - mean(c) is quantized again, 8-bit blockwise (block 256, the "dynamic" map),
                  so the constants cost 8/64 + 32/(64*256) = 0.127 instead of 32/64 = 0.5 bits/param

Every step copies what bitsandbytes computes, in float32, operation for operation:
- the code comes from scipy's normal quantiles at points of ``torch.linspace`` (reproduced with its
  fused multiply-add), as ``bitsandbytes.functional.create_normal_map`` does;
- the scaled value is ``x * (1/c)`` (a reciprocal, then a product, not a division), clamped to
  [-1, 1]; the index is the number of midpoints ``(q_i + q_{i+1}) / 2`` strictly below it, so a
  value exactly on a midpoint takes the *lower* code (``torch.bucketize``);
- the 8-bit second level uses bitsandbytes' CPU rule: the scaled value picks one of 65536 bins of
  [-1, 1] and each bin stores the code nearest the bin's own value (a lookup table), which is
  not always the code nearest the value itself.
The one quantity not reproduced bit for bit is the double-quantization offset, ``torch.mean`` of
the constants: its float32 summation order depends on the CPU's vector width and thread count.
minilora uses the mean computed in float64 (``math.fsum``) rounded to float32, and takes
``offset=`` to reproduce a given bitsandbytes state exactly.

The quantizers run on the host in NumPy (they are storage formats, not differentiated);
The QLoRA layer over an NF4 base is in ``minilora.study.qlora``.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np

from minilora._checks import check_array, check_choice, check_rank
from minilora.backend import to_numpy
from minilora.errors import MiniLoraTypeError, MiniLoraValueError, ShapeError

__all__ = [
    "nf4_code",
    "dynamic_code",
    "nf4_quantize",
    "nf4_dequantize",
    "quantize_blockwise_8bit",
    "dequantize_blockwise_8bit",
    "pack_4bit",
    "unpack_4bit",
    "nf4_bits_per_param",
    "nf4_nbytes",
]

NF4_OFFSET = 0.9677083  # bitsandbytes' create_normal_map default: the outermost quantile p_max
DOUBLE_QUANT_BLOCKSIZE = 256  # fixed by bitsandbytes' quantize_4bit(compress_statistics=True)
_LUT_SIZE = 65536  # bins of [-1, 1] in bitsandbytes' CPU 8-bit quantizer
_F32 = np.float32


# ---------------------------------------------------------------- the codes


def _linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps)`` in float32, value for value: the first half counts up
    from ``start``, the second half down from ``end``, each as one fused multiply-add."""
    s, e = _F32(start), _F32(end)
    step = (e - s) / _F32(steps - 1)
    i = np.arange(steps)
    # a float32 product with a small integer is exact in float64, so one rounding of the float64
    # sum to float32 is the fused multiply-add's single rounding
    up = (np.float64(s) + np.float64(step) * i).astype(_F32)
    down = (np.float64(e) - np.float64(step) * (steps - 1 - i)).astype(_F32)
    return np.where(i < steps // 2, up, down)


@functools.cache
def _nf4_code() -> np.ndarray:
    from scipy.stats import norm  # lazily: import minilora stays numpy + autograd

    positive = norm.ppf(_linspace_f32(NF4_OFFSET, 0.5, 9)[:-1])  # 8 values > 0
    negative = -norm.ppf(_linspace_f32(NF4_OFFSET, 0.5, 8)[:-1])  # 7 values < 0
    values = np.sort(np.concatenate([positive, [0.0], negative]).astype(_F32))
    code = values / values.max()  # float32 division, as bitsandbytes normalises
    code.flags.writeable = False
    return code


def nf4_code() -> np.ndarray:
    """The 16 NF4 values, float32, ascending, from -1 to 1 with 0 at index 7 (QLoRA eq. 4; equal
    bit for bit to ``bitsandbytes.functional.get_4bit_type("nf4")``).

    q_i are standard-normal quantiles: 8 at evenly spaced probabilities from p_max = 0.9677083 down
    to 0.5 (exclusive) and 7 mirrored negative ones, plus 0, divided by the largest.
    """
    return _nf4_code().copy()


@functools.cache
def _dynamic_code() -> np.ndarray:
    parts = []
    for i in range(7):  # one decade per exponent 10^-6 ... 10^0, 2^i fractions in each
        bounds = _linspace_f32(0.1, 1.0, 2**i + 1)
        means = (bounds[:-1] + bounds[1:]) / _F32(2)
        decade = _F32(10.0 ** (i - 6)) * means
        parts += [decade, -decade]
    code = np.sort(np.concatenate(parts + [np.array([0.0, 1.0], _F32)]).astype(_F32))
    code.flags.writeable = False
    return code


def dynamic_code() -> np.ndarray:
    """bitsandbytes' signed 8-bit "dynamic" map (``create_dynamic_map()``): 256 float32 values,
    ascending, in [-1, 1]; a dynamic exponent 10^-6..10^0 and a shrinking fraction (Dettmers 2015,
    arXiv 1511.04561). The second-level code of double quantization."""
    return _dynamic_code().copy()


# ---------------------------------------------------------------- validation


def _host_floats(x: Any, name: str) -> np.ndarray:
    """``x`` on the host as float32, refusing non-float, empty and non-finite input."""
    value = check_array(x, name)
    host = np.asarray(to_numpy(value))
    if host.dtype.kind != "f":
        raise MiniLoraTypeError(f"{name} must have a real floating dtype (float16/32/64); got {host.dtype}")
    if host.size == 0:
        raise MiniLoraValueError(f"{name} must not be empty; got shape {host.shape}")
    finite = np.isfinite(host)
    if not finite.all():
        bad = int(host.size - np.count_nonzero(finite))
        first = np.unravel_index(int(np.argmin(finite)), host.shape)
        where = tuple(int(k) for k in first)
        raise MiniLoraValueError(
            f"{name} has {bad} non-finite value(s) (NaN or Inf) of {host.size}; the first at index "
            f"{where if len(where) != 1 else where[0]} ({host[first]}); quantization needs finite values"
        )
    # a float64 input is rounded to float32 first, as torch's tensor.float() would
    return host.astype(_F32, copy=False)


def _blocks(n: int, blocksize: Any, name: str = "blocksize") -> int:
    blocksize = check_rank(blocksize, name)
    if n % blocksize:
        divisors = [d for d in (32, 64, 128, 256, 512, 1024, 2048, 4096) if n % d == 0]
        hint = f" (e.g. {', '.join(map(str, divisors[:4]))})" if divisors else ""
        raise MiniLoraValueError(
            f"{name} must divide the number of values, {n}; got {blocksize} "
            f"({n} = {n // blocksize} * {blocksize} + {n % blocksize}); choose a divisor{hint}"
        )
    return blocksize


def _check_uint8(a: Any, name: str, shape: tuple[int, ...]) -> np.ndarray:
    host = np.asarray(to_numpy(check_array(a, name)))
    if host.dtype != np.uint8:
        raise MiniLoraTypeError(f"{name} must be uint8; got {host.dtype}")
    if host.shape != shape:
        raise ShapeError(f"{name} must have shape {shape}; got {host.shape}")
    return host


# ---------------------------------------------------------------- 4-bit packing


def pack_4bit(indices: Any) -> np.ndarray:
    """Pack 4-bit indices (integers 0..15), two per byte, element 2k in the high nibble and
    element 2k + 1 in the low one (bitsandbytes' order). An odd count is padded with 7 (NF4's
    zero, what bitsandbytes' padding quantizes to). (n,) -> uint8 ((n + 1) // 2,)."""
    idx = np.asarray(indices).reshape(-1)
    if idx.dtype.kind not in "ui":
        raise MiniLoraTypeError(f"indices must be integers 0..15; got dtype {idx.dtype}")
    if idx.size and (idx.min() < 0 or idx.max() > 15):
        raise MiniLoraValueError(f"indices must be in [0, 15]; got values in [{idx.min()}, {idx.max()}]")
    idx = idx.astype(np.uint8)
    if idx.size % 2:
        idx = np.append(idx, np.uint8(7))
    return (idx[0::2] << 4) | idx[1::2]


def unpack_4bit(packed: Any, n: int) -> np.ndarray:
    """Inverse of ``pack_4bit``: uint8 ((n + 1) // 2,) -> indices uint8 (n,)."""
    n = check_rank(n, "n")
    p = _check_uint8(packed, "packed", ((n + 1) // 2,))
    out = np.empty(p.size * 2, np.uint8)
    out[0::2], out[1::2] = p >> 4, p & 0x0F
    return out[:n]


# ---------------------------------------------------------------- 8-bit blockwise (second level)


@functools.lru_cache(maxsize=4)
def _lut(code_bytes: bytes) -> np.ndarray:
    """bitsandbytes' CPU lookup table: bin k of [-1, 1] (value -1 + 2k/65535) -> the code whose
    midpoint interval holds that bin value (a bin value on a midpoint takes the lower code)."""
    code = np.frombuffer(code_bytes, _F32)
    mids = _F32(0.5) * (code[:-1] + code[1:])
    k = np.arange(_LUT_SIZE, dtype=_F32)
    centers = _F32(-1.0) + (_F32(2.0) * k) / _F32(_LUT_SIZE - 1)
    return np.searchsorted(mids, centers, side="left").astype(np.uint8)


def _code_8bit(code: Any) -> np.ndarray:
    if code is None:
        return _dynamic_code()
    c = np.asarray(code, dtype=_F32).reshape(-1)
    if c.size != 256 or not np.all(np.diff(c) >= 0) or c[0] < -1 or c[-1] > 1:
        raise MiniLoraValueError(f"code must be 256 ascending float32 values in [-1, 1]; got {c.size} values")
    return c


def quantize_blockwise_8bit(x: Any, *, blocksize: int = DOUBLE_QUANT_BLOCKSIZE,
                            code: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """8-bit blockwise quantization as bitsandbytes' CPU kernel does it (``quantize_blockwise``).

    Per block: c = max|x| (float32), s = clamp(x * (1/c), -1, 1), bin k = trunc((s + 1) / 2 * 65535
    + 0.5), index = LUT[k] (see ``_lut``); a block of zeros gives index 0 and c = 0. The last block
    may be shorter. code: 256 ascending values (default ``dynamic_code()``).
    x (n,) -> (indices uint8 (n,), absmax float32 (ceil(n / blocksize),)).
    """
    flat = _host_floats(x, "x").reshape(-1)
    blocksize = check_rank(blocksize, "blocksize")
    lut = _lut(_code_8bit(code).tobytes())
    n = flat.size
    nb = -(-n // blocksize)
    padded = np.zeros(nb * blocksize, _F32)
    padded[:n] = flat
    blocks = padded.reshape(nb, blocksize)
    absmax = np.abs(blocks).max(axis=1)  # padding zeros never raise a maximum
    safe = np.where(absmax == 0, _F32(1), absmax)
    scaled = np.clip(blocks * (_F32(1) / safe)[:, None], _F32(-1), _F32(1))
    # float32 steps, truncated; a fused multiply-add in the last step would give the same bin for
    # every float32 in [-1, 1] (checked exhaustively), so the compiler's choice does not matter
    bins = ((scaled + _F32(1)) * _F32(0.5) * _F32(_LUT_SIZE - 1) + _F32(0.5)).astype(np.uint16)
    q = lut[bins]
    q[absmax == 0] = 0
    return q.reshape(-1)[:n], absmax


def dequantize_blockwise_8bit(q: Any, absmax: Any, *, blocksize: int = DOUBLE_QUANT_BLOCKSIZE,
                              code: Any = None) -> np.ndarray:
    """x_hat = code[q] * absmax[block] in float32. q uint8 (n,), absmax (ceil(n / blocksize),)."""
    blocksize = check_rank(blocksize, "blocksize")
    qh = np.asarray(to_numpy(check_array(q, "q")))
    n = qh.size
    qh = _check_uint8(qh, "q", (n,))
    nb = -(-n // blocksize)
    am = np.asarray(to_numpy(check_array(absmax, "absmax")), dtype=_F32).reshape(-1)
    if am.size != nb:
        raise ShapeError(f"absmax must have ceil(n / blocksize) = {nb} values; got {am.size}")
    values = _code_8bit(code)[qh]
    return values * np.repeat(am, blocksize)[:n]


# ---------------------------------------------------------------- NF4


def nf4_quantize(x: Any, *, blocksize: int = 64, double_quant: bool = False, offset: Any = None) -> dict:
    """NF4-quantize ``x`` in blocks of ``blocksize`` consecutive values (row-major), as
    ``bitsandbytes.functional.quantize_4bit(x, blocksize, quant_type="nf4", compress_statistics=
    double_quant)``.

    x: any shape, float16/32/64 (rounded to float32 first), finite; ``blocksize`` must divide x.size.
    offset: the double-quantization offset (float32); default: the mean of the block maxima.

    Returns a dict: "packed" uint8 ((n + 1) // 2,), "shape", "blocksize", "double_quant", and
    either "absmax" float32 (n / blocksize,) or, with double_quant, "absmax_q" uint8
    (n / blocksize,), "absmax_absmax" float32 (ceil(n / blocksize / 256),), "absmax_offset"
    (float32) and "absmax_blocksize" (256): bitsandbytes' QuantState, field for field.
    """
    host = _host_floats(x, "x")
    flat = host.reshape(-1)
    n = flat.size
    blocksize = _blocks(n, blocksize)
    blocks = flat.reshape(n // blocksize, blocksize)
    absmax = np.abs(blocks).max(axis=1)  # (n / blocksize,) float32
    # bitsandbytes: x * (1 / max(c, 1e-38)), clamped; a block of zeros stays zero
    inv = _F32(1) / np.maximum(absmax, _F32(1e-38))
    scaled = np.clip(blocks * inv[:, None], _F32(-1), _F32(1)).reshape(-1)
    code = _nf4_code()
    mids = (code[:-1] + code[1:]) / _F32(2)
    indices = np.searchsorted(mids, scaled, side="left")  # on a midpoint: the lower code
    state: dict[str, Any] = {
        "packed": pack_4bit(indices),
        "shape": tuple(host.shape),
        "blocksize": blocksize,
        "double_quant": bool(double_quant),
    }
    if not double_quant:
        if offset is not None:
            raise MiniLoraValueError("offset is the double-quantization offset: pass double_quant=True with it")
        state["absmax"] = absmax
        return state
    if offset is None:
        offset = _F32(math.fsum(absmax.astype(np.float64).tolist()) / absmax.size)
    else:
        offset = _F32(offset)
        if not np.isfinite(offset):
            raise MiniLoraValueError(f"offset must be finite; got {offset}")
    q, absmax2 = quantize_blockwise_8bit(absmax - offset, blocksize=DOUBLE_QUANT_BLOCKSIZE)
    state.update(absmax_q=q, absmax_absmax=absmax2, absmax_offset=offset,
                 absmax_blocksize=DOUBLE_QUANT_BLOCKSIZE)
    return state


def _state_absmax(state: dict, nb: int) -> np.ndarray:
    if state.get("double_quant"):
        for key in ("absmax_q", "absmax_absmax", "absmax_offset"):
            if key not in state:
                raise MiniLoraValueError(f"a double-quantized NF4 state must contain {key!r}")
        q = _check_uint8(state["absmax_q"], 'state["absmax_q"]', (nb,))
        absmax = dequantize_blockwise_8bit(
            q, state["absmax_absmax"], blocksize=state.get("absmax_blocksize", DOUBLE_QUANT_BLOCKSIZE)
        )
        return absmax + _F32(state["absmax_offset"])
    if "absmax" not in state:
        raise MiniLoraValueError("an NF4 state must contain 'absmax' (or be double_quant)")
    absmax = np.asarray(to_numpy(state["absmax"]), dtype=_F32).reshape(-1)
    if absmax.size != nb:
        raise ShapeError(f'state["absmax"] must have n / blocksize = {nb} values; got {absmax.size}')
    return absmax


def nf4_dequantize(state: dict, *, dtype: str = "float32") -> np.ndarray:
    """x_hat = code[i] * c per block, in float32, then cast to ``dtype`` (as bitsandbytes'
    ``dequantize_4bit``); with double quantization c = dynamic[absmax_q] * absmax_absmax + offset.
    state: a dict from ``nf4_quantize`` (or bitsandbytes' QuantState fields) -> array of state["shape"]."""
    if not isinstance(state, dict):
        raise MiniLoraTypeError(f"state must be a dict from nf4_quantize; got {type(state).__name__}")
    for key in ("packed", "shape", "blocksize"):
        if key not in state:
            raise MiniLoraValueError(f"an NF4 state must contain {key!r}; it has keys {sorted(state)}")
    check_choice(dtype, "dtype", ("float16", "float32", "float64"))
    shape = tuple(int(s) for s in state["shape"])
    n = math.prod(shape)
    blocksize = _blocks(n, state["blocksize"], 'state["blocksize"]')
    indices = unpack_4bit(state["packed"], n)
    absmax = _state_absmax(state, n // blocksize)
    values = _nf4_code()[indices].reshape(-1, blocksize) * absmax[:, None]
    return values.reshape(shape).astype(dtype)


def nf4_bits_per_param(blocksize: int = 64, *, double_quant: bool = False) -> float:
    """Storage per weight: 4 bits + the block constants, 32 / blocksize bits, or with double
    quantization 8 / blocksize + 32 / (blocksize * 256) bits (QLoRA section 3)."""
    blocksize = check_rank(blocksize, "blocksize")
    if double_quant:
        return 4 + 8 / blocksize + 32 / (blocksize * DOUBLE_QUANT_BLOCKSIZE)
    return 4 + 32 / blocksize


def nf4_nbytes(state: dict) -> int:
    """Bytes an NF4 state stores: packed indices plus block constants (plus the 4-byte offset)."""
    if not isinstance(state, dict):
        raise MiniLoraTypeError(f"state must be the dict nf4_quantize returns; got {type(state).__name__}")
    keys = ("packed", "absmax_q", "absmax_absmax") if state.get("double_quant") else ("packed", "absmax")
    missing = [k for k in keys if k not in state]
    if missing:
        raise MiniLoraValueError(f"state lacks {', '.join(missing)}: not a state from nf4_quantize")
    return sum(int(np.asarray(state[k]).nbytes) for k in keys) + (4 if state.get("double_quant") else 0)
