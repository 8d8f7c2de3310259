"""How far an honest LoRA implementation in a given dtype may be from the exact answer.

The standard bound for a dot product of length k computed in floating point with unit roundoff
u, in any order of summation, with or without fused multiply-adds (Higham, *Accuracy and
Stability of Numerical Algorithms*, 2nd ed., section 3.1; lemma 3.3 for the rules of gamma_k):

    |fl(x . w) - x . w| <= gamma_k |x| . |w|,        gamma_k = k u / (1 - k u)

and gamma_a + gamma_b + gamma_a gamma_b <= gamma_(a+b), so a chain of operations adds up its
lengths. Each further rounding (a scale, an addition, a mask) counts 1. Through the LoRA layer
y = x W^T + b + s ((x * m) A^T) B^T, elementwise, with M the same computation on absolute
values (|x| |W|^T + |b| + |s| (|x * m| |A|^T) |B|^T):

    |y_computed - y| <= gamma_K M,    K = d_in + r + 4

(d_in for x A^T, r for (.) B^T, one each for the mask, the scale, the two additions; the
base branch x W^T + b needs only d_in + 2 and shares the bound). The gradients (cotangent g),
merge and unmerge follow the same rule; their K and M are listed in ``lora_bounds``; Adam's
steps are bounded in ``minilora.testing.adam_tolerance``.
Underflow adds at most k eta (eta the smallest subnormal) per dot product.

The reference itself runs in float64, so a comparison adds the float64 bound of the oracle to
the bound of the dtype under test. The returned tolerance is ``SAFETY`` times the sum:
the factor 2 covers second-order terms the first-order chain rule drops and the odd extra
rounding (a cast of a Python-float scale, an addmm that rounds twice) — it is not a fudge
for error growth: the bound holds with any summation order.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from minilora._checks import check_bool, check_count, check_real
from minilora.errors import MiniLoraTypeError, MiniLoraValueError

__all__ = [
    "UNIT_ROUNDOFF",
    "SAFETY",
    "dtype_name",
    "unit_roundoff",
    "gamma",
    "probable_gamma",
    "PROBABLE_FAILURE",
    "BOUND_MODELS",
    "dot_bound",
    "lora_magnitudes",
    "lora_bounds",
    "round_to",
    "wider",
    "STORED",
]

# u = 2^-p for a p-bit significand (round to nearest)
UNIT_ROUNDOFF = {"float64": 2.0**-53, "float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}
# the smallest positive subnormal: the most one underflowing product can lose
_ETA = {"float64": 2.0**-1074, "float32": 2.0**-149, "float16": 2.0**-24, "bfloat16": 2.0**-133}
SAFETY = 2.0
# the probabilistic bound (``probable_gamma``): the chance that one element of an honest result
# exceeds it, under that bound's model of the rounding errors
PROBABLE_FAILURE = 1e-9
BOUND_MODELS = ("worst", "probable")


def dtype_name(dtype: Any) -> str:
    """'float64', 'float32', 'float16' or 'bfloat16' for a name, a NumPy dtype, an array, an
    ml_dtypes bfloat16 or a torch dtype (``torch.float32`` -> 'float32')."""
    if hasattr(dtype, "dtype") and not isinstance(dtype, type):
        dtype = dtype.dtype
    name = str(dtype).removeprefix("torch.")
    if name in ("float", "double", "half"):
        name = {"float": "float32", "double": "float64", "half": "float16"}[name]
    try:
        name = np.dtype(name).name if name != "bfloat16" else name
    except TypeError:
        pass
    if name not in UNIT_ROUNDOFF:
        raise MiniLoraTypeError(
            f"dtype must be one of {', '.join(UNIT_ROUNDOFF)}; got {dtype!r}"
        )
    return name


def _real_array(a: Any, name: str) -> np.ndarray:
    """``a`` as a float64 array, or a library error naming ``name`` (not NumPy's own)."""
    try:
        out = np.asarray(a, dtype=np.float64)
    except (TypeError, ValueError, OverflowError) as exc:
        raise MiniLoraTypeError(f"{name} must be real numbers (an array or a number); got {type(a).__name__}: "
                                f"{exc}") from None
    return out


def unit_roundoff(dtype: Any) -> float:
    """u of the dtype: float64 2^-53, float32 2^-24, float16 2^-11, bfloat16 2^-8."""
    return UNIT_ROUNDOFF[dtype_name(dtype)]


def gamma(k: int, dtype: Any) -> float:
    """gamma_k = k u / (1 - k u); refused when k u >= 1 (no bound exists: accumulate wider)."""
    u = unit_roundoff(dtype)
    k = check_count(k, "k")
    if k * u >= 1.0:
        raise MiniLoraValueError(
            f"no error bound for {k} chained roundings in {dtype_name(dtype)} (k u = {k * u:.3g} >= 1); "
            "pass accumulate='float32' if the implementation accumulates in float32"
        )
    return k * u / (1.0 - k * u)


def probable_gamma(k: int, dtype: Any, failure: float = PROBABLE_FAILURE) -> float:
    """The probabilistic counterpart of ``gamma``: a bound on k chained roundings that holds with
    probability at least 1 - ``failure`` when the rounding errors are independent random variables
    of mean zero (Higham and Mary, "A new approach to probabilistic rounding error analysis",
    SIAM J. Sci. Comput. 41(5), 2019, theorems 3.1 and 4.1):

        gamma~_k(lambda) = exp(lambda sqrt(k) u + k u^2 / (1 - u)) - 1,
        with probability >= 1 - 2 k exp(-lambda^2 (1 - u)^2 / 2)

    (k terms of a dot product, each bounded with that probability; ``lambda`` is chosen so the
    whole is 1 - failure). It grows like sqrt(k) u instead of k u, so it exists at every width:
    bfloat16 with k = 1024 gives about 1.7 (the worst case refuses k >= 256). It is a statement
    about typical errors, not a guarantee: errors that are not independent or not centred (the
    same value added again and again in low precision, say) can exceed it. ``minilora check``
    uses it only where no worst-case bound exists, and says so in the report."""
    u = unit_roundoff(dtype)
    k = check_count(k, "k")
    failure = check_real(failure, "failure", low=0.0, high=1.0, low_open=True, high_open=True)
    if not 0.0 < failure < 1.0:
        raise MiniLoraValueError(f"failure must be a probability in (0, 1); got {failure!r}")
    if k == 0:
        return 0.0
    lam = math.sqrt(2.0 * math.log(2.0 * k / failure)) / (1.0 - u)
    return math.expm1(lam * math.sqrt(k) * u + k * u * u / (1.0 - u))


def dot_bound(
    k: int, magnitude: Any, dtype: Any, *, accumulate: Any = None, stores: int = 1, safety: float = SAFETY,
    model: str = "worst",
) -> np.ndarray:
    """The tolerance of a length-k dot product (or chain of k roundings) whose magnitude is
    ``magnitude`` (the same computation on absolute values), elementwise:

        safety * ((gamma_k(accumulate) + gamma_stores(dtype)) M + k eta(accumulate) + stores eta(dtype))

    ``accumulate`` is the dtype sums are carried in (default: ``dtype``). When it is wider than
    ``dtype``, every intermediate the computation stores in ``dtype`` (``stores`` of them: the
    product x A^T, then its product with B^T, the scaled branch, the sum with the base) is one
    more rounding of ``dtype``; each intermediate's magnitude is at most M's share, so the
    chain costs gamma_stores(dtype) M.

    ``model``: "worst" (the default: Higham's worst-case gamma_k, which holds for any summation
    order and any data) or "probable" (``probable_gamma``: holds with probability
    1 - PROBABLE_FAILURE per element under a model of the rounding errors, and exists where the
    worst case does not).
    """
    if model not in BOUND_MODELS:
        raise MiniLoraValueError(f"model must be one of {', '.join(BOUND_MODELS)}; got {model!r}")
    g = gamma if model == "worst" else probable_gamma
    k = check_count(k, "k")
    stores = check_count(stores, "stores")
    safety = check_real(safety, "safety", low=0.0)
    acc = dtype_name(accumulate if accumulate is not None else dtype)
    out = dtype_name(dtype)
    store = g(stores, out) if acc != out else 0.0
    m = _real_array(magnitude, "magnitude")
    under = k * _ETA[acc] + (stores * _ETA[out] if acc != out else 0.0)
    return safety * ((g(k, acc) + store) * m + under)


# the intermediates each output stores in its dtype when sums are carried wider (``dot_bound``):
# y: x*m, x A^T, (.) B^T, (.) s, x W^T + b, the final sum; W: B A, (.) s, W + (.); unmerge
# twice that; dx: g B, (.) A, (.) m, (.) s, g W, the sum; dA, dB: g B (or x A^T), (.) s, the product
STORED = {"y": 6, "W": 3, "W_back": 6, "x": 6, "A": 4, "B": 4, "b": 1}


def wider(a: Any, b: Any) -> str:
    """The wider of two dtypes (the one with the smaller unit roundoff)."""
    a, b = dtype_name(a), dtype_name(b)
    return a if UNIT_ROUNDOFF[a] <= UNIT_ROUNDOFF[b] else b


def _host(a: Any) -> np.ndarray | None:
    return None if a is None else np.asarray(a, dtype=np.float64)


def _host_array(a: Any) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def lora_magnitudes(
    params: dict,
    lora: dict,
    x: Any,
    *,
    scale: float,
    fan_in_fan_out: bool = False,
    dropout_mask: Any = None,
    cotangent: Any = None,
) -> dict[str, tuple[int, np.ndarray]]:
    """{output: (K, M)}: the reduction length and the magnitude of every output of a LoRA
    layer (the table in ``lora_bounds``), computed in float64 on absolute values."""
    fan_in_fan_out = check_bool(fan_in_fan_out, "fan_in_fan_out")
    x = _host_array(x)
    W = _host_array(params["W"])
    b = _host(params.get("b"))
    A, B = _host_array(lora["A"]), _host_array(lora["B"])
    mask = _host(dropout_mask)
    s = abs(float(scale))
    r, d_in = A.shape
    d_out = B.shape[0]
    W_oi = np.abs(W.T if fan_in_fan_out else W)  # (d_out, d_in)
    ax = np.abs(x)
    axm = ax if mask is None else np.abs(x * mask)
    BA = np.abs(B) @ np.abs(A)  # (d_out, d_in)

    out: dict[str, tuple[int, np.ndarray]] = {}
    M_y = ax @ W_oi.T + s * (axm @ np.abs(A).T) @ np.abs(B).T
    if b is not None:
        M_y = M_y + np.abs(b)
    out["y"] = (d_in + r + 4, M_y)
    M_W = np.abs(W) + s * (BA.T if fan_in_fan_out else BA)
    out["W"] = (r + 2, M_W)
    out["W_back"] = (2 * r + 5, M_W)
    if cotangent is not None:
        g = np.abs(_host_array(cotangent))
        n = int(np.prod(g.shape[:-1], dtype=np.int64))
        G, Xm = g.reshape(-1, d_out), axm.reshape(-1, d_in)
        back = s * (g @ np.abs(B)) @ np.abs(A)
        out["x"] = (d_out + r + 4, g @ W_oi + (back if mask is None else back * np.abs(mask)))
        out["A"] = (d_out + n + 3, s * (G @ np.abs(B)).T @ Xm)
        out["B"] = (d_in + n + 3, s * G.T @ (Xm @ np.abs(A).T))
        out["b"] = (n + 1, G.sum(axis=0))
    return out


def lora_bounds(
    params: dict,
    lora: dict,
    x: Any,
    *,
    scale: float,
    dtype: Any,
    fan_in_fan_out: bool = False,
    dropout_mask: Any = None,
    cotangent: Any = None,
    accumulate: Any = None,
    adapter: Any = None,
    reference: Any = "float64",
    safety: float = SAFETY,
    model: str = "worst",
) -> dict[str, np.ndarray]:
    """Elementwise tolerances for every output of a LoRA layer in ``dtype``.

    ``accumulate``: the dtype sums are carried in (then each stored intermediate costs one
    rounding of ``dtype``, see ``STORED``; narrower than ``dtype``, as Keras' float64 matmuls run
    in float32, the inputs rounded to it cost two more); ``adapter``: the dtype the LoRA factors are stored
    and computed in. Wider than ``dtype`` (PEFT keeps lora_A/B in float32 under a
    float16/bfloat16 base): the gradients of A and B are bounded in that dtype. Narrower (Keras
    keeps them float32 under a float64 layer): every output adds the bound of the LoRA branch
    alone (M with W = 0 and no bias) in the adapter's dtype, with two more roundings for A and B
    rounded to it on the way in.

    Inputs as in ``minilora.lora_dense`` (host arrays; the values the implementation was given,
    already rounded to its dtype). Returns bounds keyed by output, each shaped like it:

    ======= ================================================ ===========================
    key     magnitude M                                      K
    ======= ================================================ ===========================
    y       |x||W|^T + |b| + |s| (|xm||A|^T)|B|^T            d_in + r + 4
    W       |W| + |s||B||A|            (merge: W + s B A)    r + 2
    W_back  |W| + |s||B||A|            (merge, then unmerge) 2 r + 5
    x       |g||W| + |s| ((|g||B|)|A|) * m                   d_out + r + 4   (with g)
    A       |s| (|G||B|)^T |Xm|                              d_out + n + 3   (with g)
    B       |s| |G|^T (|Xm||A|^T)                            d_in + n + 3    (with g)
    b       sum_n |G|                                        n + 1           (with g)
    ======= ================================================ ===========================

    xm = x * mask, G and Xm fold the batch dimensions into n rows, g is ``cotangent`` (the
    gradient of the loss with respect to y); W's layouts follow ``fan_in_fan_out``. Each bound
    is ``dot_bound(K, M, dtype)`` plus, when ``reference`` is given, the same for the reference
    dtype (the oracle's own rounding; pass None to compare against exact values). ``model`` as in
    ``dot_bound`` ("probable" for the probabilistic bound; the reference's share stays worst-case).
    """
    kw: dict[str, Any] = dict(scale=scale, fan_in_fan_out=fan_in_fan_out, dropout_mask=dropout_mask,
                              cotangent=cotangent)
    magnitudes = lora_magnitudes(params, lora, x, **kw)
    narrow = adapter is not None and unit_roundoff(adapter) > unit_roundoff(dtype)
    if narrow:  # the LoRA branch alone (the base weight zero, no bias)
        branch = lora_magnitudes({"W": np.zeros(np.shape(params["W"]))}, lora, x, **kw)
    out = {}
    for key, (k, M) in magnitudes.items():
        dt = dtype_name(dtype)
        acc = dtype_name(accumulate) if accumulate is not None else dt
        if adapter is not None and key in ("A", "B"):
            dt = wider(dt, adapter)
            acc = wider(acc, dt)
        if unit_roundoff(acc) > unit_roundoff(dt):  # sums narrower than storage: inputs rounded to acc (+2)
            k += 2
        bound = dot_bound(k, M, dt, accumulate=acc, stores=STORED[key], safety=safety, model=model)
        if narrow and key != "b":  # the branch in the adapter's dtype, A and B rounded to it (+2)
            bound = bound + dot_bound(k + 2, branch[key][1], adapter, stores=STORED[key], safety=safety, model=model)
        if reference is not None:
            bound = bound + dot_bound(k, M, reference, safety=safety)
        out[key] = bound
    return out


def round_to(a: Any, dtype: Any) -> np.ndarray:
    """``a`` rounded to the nearest value of ``dtype`` (ties to even), returned as float64.
    bfloat16 needs no extra package (see ``minilora.safetensors_io.float_to_bf16_bits``)."""
    name = dtype_name(dtype)
    a = _real_array(a, "a")
    if name == "bfloat16":
        from minilora.formats.safetensors import bf16_bits_to_float32, float_to_bf16_bits

        return bf16_bits_to_float32(float_to_bf16_bits(a)).astype(np.float64)
    with np.errstate(over="ignore"):
        return a.astype(name).astype(np.float64)
