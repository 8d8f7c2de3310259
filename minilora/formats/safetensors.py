"""Read and write the safetensors format with NumPy alone, strictly validated.

The format (https://github.com/huggingface/safetensors, "Format"):

    bytes 0..8     N, the header length, an unsigned 64-bit little-endian integer
    bytes 8..8+N   a UTF-8 JSON object: {"name": {"dtype": "F32", "shape": [2, 3],
                   "data_offsets": [begin, end]}, ..., "__metadata__": {"key": "value"}}
    the rest       the data buffer: each tensor's bytes, C order, little-endian, at
                   [begin, end) relative to the start of the buffer

Reading refuses anything that is not exactly that: a short file, a header that is not a JSON
object of the right shape, an unknown dtype, a size that does not match the shape, offsets
outside the buffer, overlapping tensors or bytes no tensor owns (the reference implementation
refuses those too). Every refusal is a ``SafetensorsError`` naming the file; nothing else
escapes, whatever the bytes (the tests fuzz this with hypothesis).

NaN payloads, infinities and -0.0 survive a round trip bit for bit: data is copied as raw
bytes, never through a float conversion. BF16 (bfloat16) has no NumPy dtype: ``load`` returns
it as float32 (exact), or as the raw ``uint16`` bit patterns with ``bf16="bits"``; ``save``
writes a float array as BF16 when asked (``dtypes={"name": "BF16"}``, rounding to nearest
even) and a ``uint16`` array of bit patterns as BF16 with ``dtypes={"name": "BF16"}`` too.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping
from typing import Any, BinaryIO

import numpy as np

from minilora.errors import MiniLoraValueError, one_line
from minilora.formats.fileio import atomic_open

__all__ = [
    "read_header_streaming",
    "read_tensor",
    "SafetensorsError",
    "DTYPES",
    "save",
    "save_bytes",
    "load",
    "load_bytes",
    "read_header",
    "float_to_bf16_bits",
    "bf16_bits_to_float32",
]

# safetensors dtype name -> NumPy dtype of its raw little-endian storage (BF16: the 16 bits)
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_NAME_OF = {np.dtype(v).newbyteorder("="): k for k, v in DTYPES.items() if k != "BF16"}
# the reference implementation refuses headers over 100 MB; so do we, before reading them
MAX_HEADER = 100_000_000
MAX_DIMS = 64  # NumPy's limit on dimensions
MAX_BYTES = 2**63 - 1  # NumPy's limit on an array's size in bytes (even an empty one's)


class SafetensorsError(MiniLoraValueError):
    """A safetensors file that is missing, truncated or malformed, or a tensor that cannot be
    written. The message names the file."""


# ---------------------------------------------------------------- bfloat16 bit patterns


def float_to_bf16_bits(a: Any) -> np.ndarray:
    """The bfloat16 bit patterns (uint16) nearest to ``a`` (round to nearest, ties to even).

    bfloat16 is the top half of a float32. A float64 input is rounded to 8 significant bits
    directly (no double rounding through float32) wherever the result is a normal bfloat16;
    NaN stays NaN (quiet), infinities and overflow give infinities.
    """
    a = np.asarray(a)
    if a.dtype.kind != "f":
        raise SafetensorsError(f"BF16 needs a float array; got dtype {a.dtype}")
    a64 = a.astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        mant, expo = np.frexp(a64)  # a = mant * 2**expo, 0.5 <= |mant| < 1
        rounded = np.ldexp(np.rint(np.ldexp(mant, 8)), expo - 8)  # 8 significant bits, RNE
        normal = np.isfinite(a64) & (np.abs(a64) >= 2.0**-126)
        direct = np.where(normal, rounded, a64).astype(np.float32)  # exact where normal
    bits32 = np.ascontiguousarray(direct).view(np.uint32)
    # subnormals (and values that were not 'normal'): round the float32 bits to nearest even
    lower = bits32 & np.uint32(0xFFFF)
    upper = bits32 >> np.uint32(16)
    round_up = (lower > 0x8000) | ((lower == 0x8000) & ((upper & np.uint32(1)) == 1))
    out = (upper + round_up.astype(np.uint32)).astype(np.uint16)
    nan = np.isnan(direct)
    out[nan] = ((upper[nan] & np.uint32(0x8000)) | np.uint32(0x7FC0)).astype(np.uint16)
    return out.reshape(a.shape)


def bf16_bits_to_float32(bits: Any) -> np.ndarray:
    """float32 values of bfloat16 bit patterns (uint16): exact, NaN payloads kept."""
    a = np.asarray(bits)
    if a.dtype != np.uint16 and not (a.dtype.kind in "iu" and (a.size == 0 or 0 <= a.min() <= a.max() <= 0xFFFF)):
        raise SafetensorsError(f"bits must be bfloat16 bit patterns (uint16 values); got {a.dtype} {_short(a)}")
    return (a.astype(np.uint32) << np.uint32(16)).view(np.float32).reshape(a.shape)


# ---------------------------------------------------------------- writing


def save_bytes(tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None, *,
               dtypes: Mapping[str, str] | None = None) -> bytes:
    """The safetensors encoding of ``tensors`` (name -> array) as bytes.

    metadata: str -> str pairs stored under "__metadata__". dtypes: name -> safetensors dtype
    for tensors that should not keep their NumPy dtype (only "BF16" is a conversion: from a
    float array, or raw bits from a uint16 array). The header is padded with spaces to a
    multiple of 8 bytes so every tensor starts 8-byte aligned in the file.
    """
    dtypes = dict(dtypes or {})
    header: dict[str, Any] = {}
    if metadata is not None:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise SafetensorsError("metadata must map str to str")
        header["__metadata__"] = dict(metadata)
    chunks: list[bytes] = []
    offset = 0
    for name in sorted(tensors):  # a stable order: identical inputs give identical bytes
        if not isinstance(name, str) or name == "__metadata__":
            raise SafetensorsError(f"tensor names must be strings other than '__metadata__'; got {name!r}")
        kind, raw = _encode(name, tensors[name], dtypes.pop(name, None))
        header[name] = {"dtype": kind, "shape": list(raw.shape), "data_offsets": [offset, offset + raw.nbytes]}
        chunks.append(raw.tobytes(order="C"))
        offset += raw.nbytes
    if dtypes:
        raise SafetensorsError(f"dtypes names tensors that are not given: {sorted(dtypes)}")
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(chunks)


def _encode(name: str, value: Any, kind: str | None) -> tuple[str, np.ndarray]:
    a = np.asarray(value)
    if kind == "BF16" or (kind is None and a.dtype.name == "bfloat16"):  # ml_dtypes arrays too
        if a.dtype.name == "bfloat16":
            bits = a.view(np.uint16)
        elif a.dtype == np.uint16:
            bits = a
        elif a.dtype.kind == "f":
            bits = float_to_bf16_bits(a)
        else:
            raise SafetensorsError(f"tensor {name!r}: BF16 needs a float or uint16 array; got {a.dtype}")
        return "BF16", _c_order(bits, DTYPES["BF16"])
    if kind is not None and kind not in DTYPES:
        raise SafetensorsError(f"tensor {name!r}: unknown dtype {kind!r}; known: {', '.join(DTYPES)}")
    native = a.dtype.newbyteorder("=") if a.dtype.byteorder in "<>" else a.dtype
    found = _NAME_OF.get(native)
    if kind is not None and kind != found:
        raise SafetensorsError(f"tensor {name!r}: array of dtype {a.dtype} cannot be written as {kind}")
    if found is None:
        raise SafetensorsError(
            f"tensor {name!r}: dtype {a.dtype} has no safetensors equivalent "
            f"(supported: {', '.join(sorted(str(d) for d in _NAME_OF))}, and BF16)"
        )
    return found, _c_order(a, DTYPES[found])


def _c_order(a: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``a`` as a C-ordered array of ``dtype`` (0-d stays 0-d, unlike ascontiguousarray)."""
    return np.require(np.asarray(a, dtype=dtype), requirements="C")


def save(tensors: Mapping[str, Any], path: str | os.PathLike, metadata: Mapping[str, str] | None = None, *,
         dtypes: Mapping[str, str] | None = None) -> str:
    """Write ``tensors`` to ``path`` atomically (see ``save_bytes``); returns the path."""
    data = save_bytes(tensors, metadata, dtypes=dtypes)
    with atomic_open(path, "wb") as fh:
        fh.write(data)
    return os.fspath(path)


# ---------------------------------------------------------------- reading


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _parse_header(data: bytes, where: str) -> tuple[dict, dict, int]:
    """(tensor entries, metadata, start of the data buffer) after validating the header."""
    if len(data) < 8:
        raise SafetensorsError(f"{where}: truncated: {len(data)} bytes, shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER:
        raise SafetensorsError(f"{where}: header length {n} exceeds the {MAX_HEADER}-byte limit (corrupted?)")
    if 8 + n > len(data):
        raise SafetensorsError(
            f"{where}: truncated: the header claims {n} bytes but only {len(data) - 8} follow the length"
        )
    raw = data[8 : 8 + n]
    if not raw.startswith(b"{"):
        raise SafetensorsError(f"{where}: corrupted header: it must be a JSON object starting with '{{'")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise SafetensorsError(f"{where}: corrupted header: not valid UTF-8 JSON ({one_line(exc, with_type=False)})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{where}: corrupted header: expected a JSON object, got {type(header).__name__}")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SafetensorsError(f"{where}: corrupted header: __metadata__ must map strings to strings")
    return header, metadata, 8 + n


def _check_entry(name: str, entry: Any, where: str) -> tuple[str, tuple[int, ...], int, int]:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        got = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
        raise SafetensorsError(
            f"{where}: tensor {name!r}: expected the keys dtype, shape, data_offsets; got {got}"
        )
    kind, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(kind, str) or kind not in DTYPES:
        raise SafetensorsError(f"{where}: tensor {name!r}: unknown dtype {kind!r}; known: {', '.join(DTYPES)}")

    def is_count(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    if not isinstance(shape, list) or not all(is_count(s) for s in shape):
        raise SafetensorsError(
            f"{where}: tensor {name!r}: shape must be a list of non-negative integers; got {shape!r}"
        )
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_count(o) for o in offsets)):
        raise SafetensorsError(f"{where}: tensor {name!r}: data_offsets must be [begin, end]; got {offsets!r}")
    if len(shape) > MAX_DIMS:
        raise SafetensorsError(f"{where}: tensor {name!r}: {len(shape)} dimensions; at most {MAX_DIMS} are supported")
    if math.prod(max(s, 1) for s in shape) * DTYPES[kind].itemsize > MAX_BYTES:  # NumPy's own limit
        raise SafetensorsError(f"{where}: tensor {name!r}: shape {_short(shape)} is too large for an array")
    begin, end = offsets
    size = math.prod(shape) * DTYPES[kind].itemsize
    if end < begin or end - begin != size:
        raise SafetensorsError(
            f"{where}: tensor {name!r}: shape {tuple(shape)} of {kind} needs {size} bytes "
            f"but data_offsets [{begin}, {end}] hold {end - begin}"
        )
    return kind, tuple(shape), begin, end


def _validate(header: dict, metadata: dict, buffer_len: int, where: str) -> dict[str, tuple]:
    """The one header validation of both readers (``load``/``read_header`` and
    ``read_header_streaming``): {name: (dtype, shape, begin, end)} once every entry is well
    formed (``_check_entry``), every name and metadata string is valid Unicode (no lone
    surrogates, which JSON escapes allow) and the tensors tile the ``buffer_len`` data bytes
    exactly: no overlap, no gap, nothing past the end."""
    for text in [*header, *metadata, *metadata.values()]:
        if not isinstance(text, str) or not _is_unicode(text):
            raise SafetensorsError(f"{where}: corrupted header: {_short(text)} is not valid Unicode (a lone surrogate)")
    entries = {name: _check_entry(name, entry, where) for name, entry in header.items()}
    position = 0
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda kv: (kv[1][2], kv[1][3])):
        if begin != position:
            what = "overlaps the previous tensor" if begin < position else f"leaves bytes {position}..{begin} unowned"
            raise SafetensorsError(f"{where}: corrupted: tensor {name!r} at [{begin}, {end}] {what}")
        if end > buffer_len:
            raise SafetensorsError(
                f"{where}: truncated: tensor {name!r} ends at byte {end} of the data but the data has {buffer_len}"
            )
        position = end
    if position != buffer_len:
        raise SafetensorsError(f"{where}: corrupted: {buffer_len - position} trailing bytes after the last tensor")
    return entries


def _check_values(raw: np.ndarray, kind: str, name: str, where: str) -> np.ndarray:
    """``raw`` (a tensor as stored) after the checks its bytes need: a BOOL byte is 0 or 1."""
    if kind == "BOOL" and raw.size and int(raw.view(np.uint8).max()) > 1:
        raise SafetensorsError(f"{where}: corrupted: tensor {name!r} of BOOL holds bytes other than 0 and 1")
    return raw


def _is_unicode(text: str) -> bool:
    return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace") == text  # no lone surrogate


def _short(value: Any) -> str:
    return repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."


def load_bytes(data: bytes, *, name: str = "<bytes>", bf16: str = "float32") -> dict[str, np.ndarray]:
    """Decode safetensors ``data`` into {tensor name: NumPy array} (new, writable arrays in
    native byte order). ``name`` is used in error messages. BF16 tensors come back as float32
    (``bf16="float32"``) or as their uint16 bit patterns (``bf16="bits"``)."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise SafetensorsError(f"{name}: data must be bytes (a safetensors file's contents); got {type(data).__name__}")
    tensors, _ = _decode(bytes(data), name, bf16)
    return tensors


def read_header(path: str | os.PathLike) -> tuple[dict[str, dict], dict[str, str]]:
    """(tensor entries {name: {"dtype", "shape", "data_offsets"}}, metadata) of a safetensors
    file, validated like ``load`` (the whole file is read and checked)."""
    where = os.fspath(path)
    _, (entries, metadata) = _decode(_read(where), where, "bits", with_header=True)
    return entries, metadata


def read_header_streaming(fh: BinaryIO, where: str) -> tuple[dict[str, tuple], dict[str, str], int]:
    """Read and validate only the header of an open safetensors file: ({name: (dtype, shape,
    begin, end)}, metadata, start of the data). The tensors must tile the data exactly as the
    file's size says; no tensor bytes are read (for ``read_tensor``, one at a time)."""
    head = fh.read(8)
    n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
    # _parse_header refuses a short file or an oversized length before anything big is read
    header, metadata, start = _parse_header(head + fh.read(min(n, MAX_HEADER + 1)), where)
    entries = _validate(header, metadata, os.fstat(fh.fileno()).st_size - start, where)
    return entries, metadata, start


def read_tensor(fh: BinaryIO, start: int, entry: tuple, name: str, where: str) -> np.ndarray:
    """One tensor of an open file, as stored (BF16 as uint16 bits), from ``read_header_streaming``'s
    ``start`` and entry (dtype, shape, begin, end)."""
    kind, shape, begin, end = entry
    fh.seek(start + begin)
    raw = fh.read(end - begin)
    if len(raw) != end - begin:
        raise SafetensorsError(f"{where}: truncated while reading tensor {name!r}")
    return _check_values(np.frombuffer(raw, dtype=DTYPES[kind]).reshape(shape), kind, name, where)


def load(path: str | os.PathLike, *, bf16: str = "float32") -> dict[str, np.ndarray]:
    """Read a safetensors file into {tensor name: NumPy array}; see ``load_bytes``."""
    where = os.fspath(path)
    return load_bytes(_read(where), name=where, bf16=bf16)


def _read(where: str) -> bytes:
    try:
        with open(where, "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        raise SafetensorsError(f"{where}: file not found") from None
    except OSError as exc:
        raise SafetensorsError(f"{where}: cannot read: {exc.strerror or exc}") from None


def _decode(data: bytes, where: str, bf16: str, with_header: bool = False) -> Any:
    if bf16 not in ("float32", "bits"):
        raise MiniLoraValueError(f"bf16 must be 'float32' or 'bits'; got {bf16!r}")
    data = bytes(data)
    header, metadata, start = _parse_header(data, where)
    entries = _validate(header, metadata, len(data) - start, where)
    out: dict[str, np.ndarray] = {}
    for name, (kind, shape, begin, end) in entries.items():
        out[name] = _array(data, start, name, kind, shape, begin, end, where, bf16)
    if with_header:
        return out, (header, metadata)
    return out, metadata


def _array(data: bytes, start: int, name: str, kind: str, shape: tuple[int, ...], begin: int, end: int,
           where: str, bf16: str) -> np.ndarray:
    """One tensor's bytes as a new native-order array, checked (a BOOL byte must be 0 or 1)."""
    stored = DTYPES[kind]
    try:
        if end == begin:
            raw = np.empty(shape, dtype=stored)
        else:
            raw = np.frombuffer(data, dtype=stored, count=(end - begin) // stored.itemsize,
                                offset=start + begin).reshape(shape)
    except (ValueError, MemoryError, OverflowError) as exc:  # e.g. more than 64 dimensions
        raise SafetensorsError(f"{where}: tensor {name!r}: shape {shape} is not usable ({one_line(exc, with_type=False)})") from None
    _check_values(raw, kind, name, where)
    if kind == "BF16" and bf16 == "float32":
        return bf16_bits_to_float32(raw)
    return raw.astype(stored.newbyteorder("="), copy=True)

