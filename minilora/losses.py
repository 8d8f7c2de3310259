"""Losses: L1 and mean squared error, matching ``torch.nn.functional.l1_loss`` / ``mse_loss``.

    l1:  L = (1/N) sum_i |pred_i - target_i|        ("sum": without the 1/N)
    mse: L = (1/N) sum_i (pred_i - target_i)^2

pred and target have the same shape (no broadcasting: PyTorch warns about it, we refuse it);
the result is a 0-d array (a NumPy scalar on NumPy). The derivative of |d| at d = 0 is taken
as 0, as PyTorch does (``sign(0) = 0``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from autograd.extend import defjvp_argnums, defvjp_argnums, primitive

from minilora._checks import check_array, check_choice, check_floats
from minilora.backend import namespace_of
from minilora.errors import ShapeError
from minilora.ops import _recall, _remember, count_elements

__all__ = ["l1_loss", "mse_loss", "l1_loss_op", "mse_loss_op", "REDUCTIONS"]

REDUCTIONS = ("mean", "sum")


def _check(pred: Any, target: Any, reduction: str) -> bool:
    check_choice(reduction, "reduction", REDUCTIONS)
    ps, ts = tuple(check_array(pred, "pred").shape), tuple(check_array(target, "target").shape)
    if ps != ts:
        raise ShapeError(f"pred and target must have the same shape; got pred {ps} and target {ts}")
    check_floats(pred=pred, target=target)
    return reduction == "mean"


def l1_loss(pred: Any, target: Any, *, reduction: str = "mean") -> Any:
    """Mean (or summed) absolute error. pred, target (...) same shape -> 0-d."""
    return l1_loss_op(pred, target, mean=_check(pred, target, reduction))


def mse_loss(pred: Any, target: Any, *, reduction: str = "mean") -> Any:
    """Mean (or summed) squared error. pred, target (...) same shape -> 0-d."""
    return mse_loss_op(pred, target, mean=_check(pred, target, reduction))


# ---------------------------------------------------------------- the loss primitives


@primitive
def l1_loss_op(pred: Any, target: Any, *, mean: bool = True) -> Any:
    """sum |pred - target| (divided by its element count when ``mean``); a 0-d array."""
    xp = namespace_of(pred, target)
    if _blockable(pred, target):
        s, total = _blocked_l1(pred, target)
    else:
        d = pred - target
        s = xp.sign(d)
        # On NumPy, sum |d| = sign(d) . d: one BLAS pass over arrays the gradient needs anyway,
        # instead of an |d| temporary and a reduction (the same exact products, in BLAS's order)
        total = np.vdot(s, d) if xp is np else xp.sum(xp.abs(d))
    _remember("d", pred, s)  # the gradient is sign(d) * c
    return total / count_elements(s) if mean else total


@primitive
def mse_loss_op(pred: Any, target: Any, *, mean: bool = True) -> Any:
    """sum (pred - target)^2 (divided by its element count when ``mean``); a 0-d array."""
    xp = namespace_of(pred, target)
    d = pred - target
    _remember("d", pred, d)
    total = np.vdot(d, d) if xp is np else xp.sum(d * d)  # vdot: one BLAS pass, no d*d temporary
    return total / count_elements(d) if mean else total


# Above this size L1's forward runs in blocks of _BLOCK_BYTES: each block of d = pred - target is
# formed, signed and reduced while it is in cache, and the whole of d is never held, only sign(d):
# one (n, d_out) array fewer, which at this size the allocator fetches from the kernel page by
# page at every step (docs/performance.md). Below it, and for MSE (which keeps d itself as the
# gradient's buffer), the plain passes measured as fast.
_BLOCK_FROM = 8 << 20
_BLOCK_BYTES = 256 << 10


def _blockable(pred: Any, target: Any) -> bool:
    return (type(pred) is np.ndarray and type(target) is np.ndarray and pred.nbytes >= _BLOCK_FROM
            and pred.shape == target.shape and pred.dtype == target.dtype
            and pred.flags.c_contiguous and target.flags.c_contiguous)


def _blocked_l1(pred: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, Any]:
    """(sign(d), sum |d|) for d = pred - target, block by block: the same sign(d) as the plain
    passes; the sum adds the blocks' BLAS dot products sign(d) . d."""
    s = np.empty_like(pred)
    p, t, o = pred.reshape(-1), target.reshape(-1), s.reshape(-1)
    m = max(1, _BLOCK_BYTES // pred.itemsize)
    parts = np.empty(-(-p.size // m), dtype=pred.dtype)
    for k, i in enumerate(range(0, p.size, m)):
        db = p[i:i + m] - t[i:i + m]  # a fresh block: np.sign into another array is the fast path
        parts[k] = np.vdot(np.sign(db, out=o[i:i + m]), db)
    return s, np.add.reduce(parts)


@primitive


# ---------------------------------------------------------------- their derivatives
#
#   l1 (d = pred - target; sign(d) from the forward): dpred = sign(d) * (g / N)  dtarget = -dpred
#   mse:                                         dpred = d * (2/N * g)          dtarget = -dpred
#
# The formulas keep PyTorch's order of rounding (``l1_loss`` = mean(abs(d)) backward,
# ATen ``mse_loss_backward``: d * (norm * g)), so gradients agree bit for bit where the
# forward does.


def _loss_vjp(grad_of: Any, kept: Any = lambda d, xp: d) -> Any:
    """VJP maker of a loss of d = pred - target. The forward keeps ``kept(d, xp)`` (d for MSE,
    sign(d) for L1) in the memo; the gradient is ``grad_of(k, g, n, xp, own)`` of that array
    (``own``: it may be overwritten)."""

    def maker(argnums: tuple[int, ...], ans: Any, args: tuple, kwargs: dict) -> Any:
        pred, target = args[0], args[1]
        xp = namespace_of(pred, target)
        memo = _recall("d", pred)  # this module's own temporary: nobody else holds it
        k = kept(pred - target, xp) if memo is None else memo
        n = count_elements(k) if kwargs.get("mean", True) else 1
        spent = [False]

        def vjp(g: Any) -> list[Any]:
            # The first call may write the gradient over the kept array (one (n, d_out)
            # temporary fewer in the step); a second call (make_vjp allows it) recomputes it.
            own = not spent[0]
            spent[0] = True
            gd = grad_of(k if own else kept(pred - target, xp), g, n, xp, own)
            return [gd if i == 0 else -gd for i in argnums]

        return vjp

    return maker


def _loss_jvp(dot_of_d: Any) -> Any:
    def jvp(argnums: tuple[int, ...], gs: list, ans: Any, args: tuple, kwargs: dict) -> Any:
        pred, target = args[0], args[1]
        xp = namespace_of(pred, target)
        d = pred - target
        t = None
        for i, tangent in zip(argnums, gs, strict=True):
            t = (tangent if i == 0 else -tangent) if t is None else (t + tangent if i == 0 else t - tangent)
        s = dot_of_d(d, t, xp)
        return s / count_elements(d) if kwargs.get("mean", True) else s

    return jvp


def _l1_grad(s: Any, g: Any, n: int, xp: Any, own: bool) -> Any:
    """sign(d) * (g / N), given s = sign(d) (kept by the forward; written over when ``own``)."""
    c = g / n
    return np.multiply(s, c, out=s) if own and type(s) is np.ndarray and np.ndim(c) == 0 else s * c


def _mse_grad(d: Any, g: Any, n: int, xp: Any, own: bool) -> Any:
    """d * (2/N * g), ATen's order of rounding; written over d when ``own``."""
    c = (2.0 / n) * g
    return np.multiply(d, c, out=d) if own and type(d) is np.ndarray and np.ndim(c) == 0 else d * c


defvjp_argnums(l1_loss_op, _loss_vjp(_l1_grad, kept=lambda d, xp: xp.sign(d)))
defjvp_argnums(l1_loss_op, _loss_jvp(lambda d, t, xp: xp.sum(xp.sign(d) * t)))
defvjp_argnums(mse_loss_op, _loss_vjp(_mse_grad))
defjvp_argnums(mse_loss_op, _loss_jvp(lambda d, t, xp: xp.sum(d * t) * 2.0))
