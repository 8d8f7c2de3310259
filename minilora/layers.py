"""Dense and LoRA layers as pure functions of parameter dicts (Hu et al. 2021, arXiv 2106.09685).

    dense:       y = x W^T + b
    lora_dense:  y = x W^T + b + s * (dropout(x) A^T) B^T          (paper eq. 3, PEFT layout)
    merge:       W' = W + s * B A        unmerge: W = W' - s * B A  (paper section 4.1)

Shapes follow PyTorch/PEFT: W (d_out, d_in), b (d_out,), A (r, d_in), B (d_out, r), x (..., d_in).
``fan_in_fan_out=True`` means W is stored (d_in, d_out) (GPT-2's Conv1D, and the seed blog's
``x @ W``); A and B keep their shapes and the delta is transposed, as in PEFT.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from autograd.tracer import Box, getval

from minilora import ops
from minilora._checks import (
    check_array,
    check_bool,
    check_choice,
    check_dim,
    check_floats,
    check_ndim,
    check_rank,
    check_real,
    check_rng,
    check_shape,
    get_key,
)
from minilora.backend import get_backend, namespace_of
from minilora.errors import MiniLoraTypeError, NonFiniteError, ShapeError

__all__ = [
    "dense_init",
    "dense",
    "lora_init",
    "lora_scale",
    "lora_dense",
    "dropout_mask",
    "delta_weight",
    "merge",
    "unmerge",
    "LORA_INITS",
    "base_operands",
    "lora_factors",
    "merge_weight",
]

LORA_INITS = ("kaiming", "gaussian", "normal")


def dense_init(rng: Any, d_in: int, d_out: int, *, bias: bool = True, dtype: Any = "float64") -> dict:
    """A dense layer initialised like ``torch.nn.Linear``: W, b ~ U(-1/sqrt(d_in), 1/sqrt(d_in)).

    rng: numpy Generator or int seed. Returns {"W": (d_out, d_in), "b": (d_out,)} (no "b" when
    ``bias=False``) on the active backend.
    """
    rng = check_rng(rng)
    d_in, d_out = check_dim(d_in, "d_in"), check_dim(d_out, "d_out")
    bias = check_bool(bias, "bias")
    be = get_backend()
    dt = be.dtype(dtype)
    bound = 1.0 / math.sqrt(d_in)
    params = {"W": be.asarray(rng.uniform(-bound, bound, (d_out, d_in)), dt)}
    if bias:
        params["b"] = be.asarray(rng.uniform(-bound, bound, (d_out,)), dt)
    return params


def base_operands(params: Any, x: Any, fan_in_fan_out: bool) -> tuple[Any, Any, int, int]:
    """Validate a dense layer's params against x; return (W, b or None, d_in, d_out)."""
    fan_in_fan_out = check_bool(fan_in_fan_out, "fan_in_fan_out")
    W = get_key(params, "W", "params")
    b = params["b"] if getval(params).get("b") is not None else None
    check_ndim(W, 'params["W"]', 2, "(d_in, d_out)" if fan_in_fan_out else "(d_out, d_in)")
    shape = tuple(getval(W).shape)
    d_in, d_out = shape if fan_in_fan_out else shape[::-1]
    xv = check_array(x, "x")
    if len(xv.shape) < 1 or xv.shape[-1] != d_in:
        raise ShapeError(f"x must have shape (..., d_in) = (..., {d_in}); got {tuple(xv.shape)}")
    if b is not None:
        check_shape(b, 'params["b"]', (d_out,), "(d_out,)")
    return W, b, d_in, d_out


def dense(params: dict, x: Any, *, fan_in_fan_out: bool = False) -> Any:
    """y = x W^T + b (PyTorch ``nn.Linear``).

    params {"W": (d_out, d_in) [fan_in_fan_out: (d_in, d_out)], "b": (d_out,) optional},
    x (..., d_in) -> y (..., d_out).
    """
    W, b, _, _ = base_operands(params, x, fan_in_fan_out)
    check_floats(x=x, W=W, b=b)
    return ops.linear(x, W, b, fan_in_fan_out=fan_in_fan_out)


def lora_init(
    rng: Any, d_in: int, d_out: int, rank: int, *, init: str = "kaiming", dtype: Any = "float64"
) -> dict:
    """LoRA factors {"A": (rank, d_in), "B": (d_out, rank)} with B = 0, so the adapter starts as
    a no-op (paper section 4.1).

    init: "kaiming" (PEFT and loralib default: A ~ U(-1/sqrt(d_in), 1/sqrt(d_in)), i.e.
    ``kaiming_uniform_(a=sqrt(5))``), "gaussian" (PEFT ``init_lora_weights="gaussian"``:
    A ~ N(0, (1/rank)^2)), "normal" (the paper and the seed blog: A ~ N(0, 1)).
    """
    rng = check_rng(rng)
    d_in, d_out = check_dim(d_in, "d_in"), check_dim(d_out, "d_out")
    rank = check_rank(rank)
    check_choice(init, "init", LORA_INITS)
    be = get_backend()
    dt = be.dtype(dtype)
    if init == "kaiming":
        bound = 1.0 / math.sqrt(d_in)
        A = rng.uniform(-bound, bound, (rank, d_in))
    elif init == "gaussian":
        A = rng.normal(0.0, 1.0 / rank, (rank, d_in))
    else:
        A = rng.standard_normal((rank, d_in))
    return {"A": be.asarray(A, dt), "B": be.asarray(np.zeros((d_out, rank)), dt)}


def lora_scale(alpha: float, rank: int, *, rslora: bool = False) -> float:
    """s = alpha / r (paper section 4.1), or alpha / sqrt(r) for rsLoRA (Kalajdzievski 2023;
    PEFT ``use_rslora``)."""
    rank = check_rank(rank)
    alpha = check_real(alpha, "alpha")
    rslora = check_bool(rslora, "rslora")
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def lora_factors(lora: Any, d_in: int, d_out: int) -> tuple[Any, Any]:
    A, B = get_key(lora, "A", "lora"), get_key(lora, "B", "lora")
    check_ndim(A, 'lora["A"]', 2, "(r, d_in)")
    r = getval(A).shape[0]
    check_shape(A, 'lora["A"]', (r, d_in), "(r, d_in)")
    check_shape(B, 'lora["B"]', (d_out, r), "(d_out, r)")
    return A, B


def lora_dense(
    params: dict,
    lora: dict,
    x: Any,
    *,
    scale: float = 1.0,
    fan_in_fan_out: bool = False,
    dropout_mask: Any = None,
) -> Any:
    """y = x W^T + b + scale * ((x * mask) A^T) B^T, never forming B A (paper eq. 3; PEFT
    ``lora.Linear.forward``). The base weight's gradient is computed only if you ask for it.

    params {"W": (d_out, d_in) [fan_in_fan_out: (d_in, d_out)], "b": (d_out,) optional},
    lora {"A": (r, d_in), "B": (d_out, r)}, x (..., d_in), dropout_mask x-shaped or None
    (from ``dropout_mask``: entries 0 or 1/(1-p)) -> y (..., d_out).
    """
    lv = getval(lora)
    ops_ = _usual_operands(params, lv, x, scale, fan_in_fan_out) if dropout_mask is None else None
    if ops_ is not None:
        W, b = ops_
    else:  # the full checks, naming what is wrong
        W, b, d_in, d_out = base_operands(params, x, fan_in_fan_out)
        A, B = lora_factors(lv, d_in, d_out)  # values only: no graph nodes for checking
        scale = check_real(scale, "scale")
        if dropout_mask is not None:
            check_shape(dropout_mask, "dropout_mask", tuple(getval(x).shape), "x.shape")
        check_floats(x=x, W=W, b=b, A=A, B=B, dropout_mask=dropout_mask)
    if isinstance(lora, Box) and len(lv) == 2 and "A" in lv and "B" in lv:
        # differentiated as one dict: one node instead of a lookup per factor (ops.lora_linear_tree)
        return ops.lora_linear_tree(x, W, b, lora, dropout_mask, scale=scale, fan_in_fan_out=fan_in_fan_out)
    return ops.lora_linear(x, W, b, lora["A"], lora["B"], dropout_mask, scale=scale,
                           fan_in_fan_out=fan_in_fan_out)


def _usual_operands(params: Any, lora: Any, x: Any, scale: Any, fan_in_fan_out: bool) -> tuple[Any, Any] | None:
    """(W, b) when the call is the usual one, which the full checks would accept: untraced NumPy
    x, W, b and factors of one real float dtype, consistent shapes, a finite float scale; else None
    (and the full checks run). A few attribute tests instead of the checks' dozen calls: this runs
    at every training step."""
    if type(params) is not dict or type(lora) is not dict or type(x) is not np.ndarray or type(scale) is not float:
        return None
    W, b, A, B = params.get("W"), params.get("b"), lora.get("A"), lora.get("B")
    if type(W) is not np.ndarray or type(A) is not np.ndarray or type(B) is not np.ndarray:
        return None
    dt = x.dtype
    if dt.kind != "f" or not dt.isnative or type(fan_in_fan_out) is not bool or W.dtype != dt or A.dtype != dt or B.dtype != dt or W.ndim != 2 or A.ndim != 2 \
            or x.ndim < 1 or not math.isfinite(scale):
        return None
    d_in, d_out = W.shape if fan_in_fan_out else W.shape[::-1]
    if x.shape[-1] != d_in or A.shape[1] != d_in or B.shape != (d_out, A.shape[0]):
        return None
    if b is not None and (type(b) is not np.ndarray or b.dtype != dt or b.shape != (d_out,)):
        return None
    return W, b


def dropout_mask(rng: Any, shape: tuple[int, ...], p: float, dtype: Any = "float64") -> Any:
    """An inverted-dropout mask: each entry is 0 with probability p, else 1/(1-p) (as
    ``torch.nn.Dropout`` in training mode). Pass it to ``lora_dense`` so another framework can be
    compared on the very same mask. p = 1 gives all zeros. Returns ``shape`` on the active backend.
    """
    rng = check_rng(rng)
    p = check_real(p, "p", low=0.0, high=1.0)
    if not isinstance(shape, tuple | list):
        raise MiniLoraTypeError(f"shape must be a tuple of positive integers (e.g. x.shape); got {shape!r} "
                                f"({type(shape).__name__})")
    shape = tuple(check_dim(s, f"shape[{i}]") for i, s in enumerate(shape))
    be = get_backend()
    dt = be.dtype(dtype)
    if p == 1.0:
        return be.asarray(np.zeros(shape), dt)
    keep = rng.random(shape) >= p
    return be.asarray(keep / (1.0 - p), dt)


def delta_weight(lora: dict, *, scale: float = 1.0, fan_in_fan_out: bool = False) -> Any:
    """Delta W = scale * B A: (d_out, d_in), or (d_in, d_out) when ``fan_in_fan_out``
    (PEFT ``get_delta_weight``). lora {"A": (r, d_in), "B": (d_out, r)}."""
    A, B = get_key(lora, "A", "lora"), get_key(lora, "B", "lora")
    check_ndim(A, 'lora["A"]', 2, "(r, d_in)")
    check_ndim(B, 'lora["B"]', 2, "(d_out, r)")
    r = getval(A).shape[0]
    check_shape(B, 'lora["B"]', (getval(B).shape[0], r), "(d_out, r)")
    scale = check_real(scale, "scale")
    fan_in_fan_out = check_bool(fan_in_fan_out, "fan_in_fan_out")
    check_floats(A=A, B=B)
    return ops.lora_delta(A, B, scale=scale, fan_in_fan_out=fan_in_fan_out)


def merge_weight(W: Any, A: Any, B: Any, *, scale: Any = 1.0, fan_in_fan_out: bool = False,
                 unmerge: bool = False, magnitude: Any = None, round_delta: Any = None) -> Any:
    """The merge arithmetic, in one place: W' = W + s B A (``unmerge``: W - s B A), and with a DoRA
    magnitude m, W' = m / ||W + s B A||_row * (W + s B A) (PEFT ``Linear.merge``,
    ``DoraLinearVariant.merge_safe``). No checks: callers check shapes and dtypes first.

    W (d_out, d_in), or (d_in, d_out) when ``fan_in_fan_out`` (also an embedding's (num, dim));
    A (r, d_in), B (d_out, r), magnitude (d_out,) -> W's shape. ``round_delta`` (optional) is
    applied to s B A before the sum (PEFT rounds the delta to a half-precision base dtype first
    for embeddings and for unmerge). Differentiable in W, A and B (``ops.lora_delta``)."""
    delta = ops.lora_delta(A, B, scale=scale, fan_in_fan_out=fan_in_fan_out)
    if round_delta is not None:
        delta = round_delta(delta)
    if unmerge:
        return W - delta
    total = W + delta
    if magnitude is None:
        return total
    xp = namespace_of(getval(total))
    rows = total.T if fan_in_fan_out else total  # (d_out, d_in)
    factor = magnitude / xp.sqrt(xp.sum(rows * rows, axis=1))
    return total * (factor[None, :] if fan_in_fan_out else factor[:, None])


def _merged(params: dict, lora: dict, scale: float, fan_in_fan_out: bool, sign: float) -> dict:
    fan_in_fan_out = check_bool(fan_in_fan_out, "fan_in_fan_out")
    W = get_key(params, "W", "params")
    check_ndim(W, 'params["W"]', 2, "(d_in, d_out)" if fan_in_fan_out else "(d_out, d_in)")
    shape = tuple(getval(W).shape)
    d_in, d_out = shape if fan_in_fan_out else shape[::-1]
    A, B = lora_factors(lora, d_in, d_out)
    check_floats(W=W, A=A, B=B)
    scale = check_real(scale, "scale")
    new_W = merge_weight(W, A, B, scale=scale, fan_in_fan_out=fan_in_fan_out, unmerge=sign < 0)
    value = getval(new_W)
    xp = namespace_of(value)
    finite = xp.isfinite(value)
    if not bool(xp.all(finite)):
        bad = math.prod(shape) - int(xp.count_nonzero(finite))
        what = "merge" if sign > 0 else "unmerge"
        raise NonFiniteError(
            f"{what} would give non-finite values in W ({bad} of {math.prod(shape)} entries); "
            f"check lora A/B and scale={scale}. params were left unchanged"
        )
    out = dict(params)
    out["W"] = new_W
    return out


def merge(params: dict, lora: dict, *, scale: float = 1.0, fan_in_fan_out: bool = False) -> dict:
    """New params with W' = W + scale * B A (PEFT ``merge(safe_merge=True)``): refuses a
    non-finite result with ``NonFiniteError``. ``dense(merge(p, l), x) == lora_dense(p, l, x)``
    to rounding. Shapes as in ``lora_dense``; the input dicts are not modified."""
    return _merged(params, lora, scale, fan_in_fan_out, +1.0)


def unmerge(params: dict, lora: dict, *, scale: float = 1.0, fan_in_fan_out: bool = False) -> dict:
    """New params with W = W' - scale * B A, the inverse of ``merge`` up to rounding."""
    return _merged(params, lora, scale, fan_in_fan_out, -1.0)
