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
from autograd.numpy.numpy_boxes import ArrayBox
from autograd.tracer import getval

from minilora._checks import check_array, check_choice, check_floats
from minilora.array_ops import RAW, TRACED, traced
from minilora.backend import namespace_of
from minilora.errors import ShapeError
from minilora.ops import count_elements

__all__ = ["l1_loss", "mse_loss", "l1_loss_op", "mse_loss_op", "REDUCTIONS"]

REDUCTIONS = ("mean", "sum")


def _check(pred: Any, target: Any, reduction: str) -> bool:
    p = pred._value if type(pred) is ArrayBox else pred
    if type(p) is np.ndarray and type(target) is np.ndarray and p.shape == target.shape and \
            p.dtype == target.dtype and p.dtype.kind == "f" and p.dtype.isnative and type(reduction) is str and reduction in REDUCTIONS:
        return reduction == "mean"  # the usual call, at every training step: nothing to report
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
#
# Both losses reduce d = pred - target in one order at every size (no size threshold, so the
# value of the same data never depends on how much of it there is): on NumPy, d is formed in
# consecutive blocks of BLOCK elements (C order), each block is reduced by NumPy's pairwise sum
# (of |d| or d * d), and the block sums are added by NumPy's pairwise sum in block order. One
# block's d is all the forward ever holds; a small input is one block. On other namespaces the
# sum is ``xp.sum`` of the whole |d| or d * d.
#
# Nothing is kept for the gradient: the VJP forms d again from its inputs (pred and target),
# block by block, into the array it returns.

BLOCK = 1 << 15


def _reduce(pred: Any, target: Any, square: bool) -> Any:
    """sum |pred - target| (or sum (pred - target)^2) in the order described above."""
    xp = namespace_of(pred, target)
    if not (type(pred) is np.ndarray and type(target) is np.ndarray):
        d = pred - target
        return xp.sum(d * d) if square else xp.sum(xp.abs(d))
    p, t = np.ravel(pred), np.ravel(target)  # a view when C-contiguous, else one copy
    if p.size <= BLOCK:  # one block: the same order, without the block bookkeeping
        d = np.subtract(p, t)
        return np.add.reduce(np.multiply(d, d, out=d) if square else np.abs(d, out=d))
    dtype = np.result_type(p, t)
    nblocks = max(1, -(-p.size // BLOCK))
    parts = np.empty(nblocks, dtype=dtype)
    buf = np.empty(min(p.size, BLOCK), dtype=dtype)
    for k in range(nblocks):
        i = k * BLOCK
        db = np.subtract(p[i:i + BLOCK], t[i:i + BLOCK], out=buf[:min(BLOCK, p.size - i)])
        if square:
            np.multiply(db, db, out=db)
        else:
            np.abs(db, out=db)
        parts[k] = np.add.reduce(db)
    return np.add.reduce(parts)


@primitive
def l1_loss_op(pred: Any, target: Any, *, mean: bool = True) -> Any:
    """sum |pred - target| (divided by its element count when ``mean``); a 0-d array."""
    total = _reduce(pred, target, square=False)
    return total / count_elements(pred) if mean else total


@primitive
def mse_loss_op(pred: Any, target: Any, *, mean: bool = True) -> Any:
    """sum (pred - target)^2 (divided by its element count when ``mean``); a 0-d array."""
    total = _reduce(pred, target, square=True)
    return total / count_elements(pred) if mean else total


# ---------------------------------------------------------------- their derivatives
#
#   l1 (d = pred - target):  dpred = sign(d) * (g / N)     dtarget = -dpred
#   mse:                     dpred = d * (2/N * g)          dtarget = -dpred
#   tangents:                l1: sum(sign(d) * t) / N       mse: 2 sum(d * t) / N    (t = t_pred - t_target)
#
# The formulas keep PyTorch's order of rounding (``l1_loss`` = mean(abs(d)) backward,
# ATen ``mse_loss_backward``: d * (norm * g)), so gradients agree bit for bit where the
# forward does. sign(d) is locally constant: its own derivative is 0 (PyTorch's too), so in a
# traced derivative it enters as a constant computed from the values.


def _scaled_d(pred: Any, target: Any, c: Any, sign: bool) -> Any:
    """d * c (or sign(d) * c) for a plain scalar c, on plain arrays, in one new array."""
    if type(pred) is np.ndarray and type(target) is np.ndarray and pred.ndim > 0 and np.ndim(c) == 0:
        if not sign:
            out = np.subtract(pred, target)
            return np.multiply(out, c, out=out)
        # NumPy 2.4 runs ``np.sign(a, out=a)`` (input and output the same memory) in a scalar loop,
        # 5 to 10 times slower than into another array (benchmarks/profile_step.py showed it as 45%
        # of the floor of an L1 step): d is formed block by block in a buffer, and its sign is
        # written into the result and scaled there. Same values, one (n, d_out) array, as before.
        p, t = pred, target
        if p.shape == t.shape and p.flags.c_contiguous and t.flags.c_contiguous and p.size > BLOCK:
            out = np.empty(p.shape, dtype=np.result_type(p, t))
            flat, pf, tf = out.reshape(-1), p.reshape(-1), t.reshape(-1)
            buf = np.empty(BLOCK, dtype=out.dtype)
            for i in range(0, flat.size, BLOCK):
                j = min(i + BLOCK, flat.size)
                blk = np.sign(np.subtract(pf[i:j], tf[i:j], out=buf[:j - i]), out=flat[i:j])
                np.multiply(blk, c, out=blk)  # while the block is in cache
            return out
        out = np.sign(np.subtract(p, t))
        return np.multiply(out, c, out=out)
    d = pred - target
    return (namespace_of(d).sign(d) if sign else d) * c


def _loss_vjp(sign: bool, factor: float) -> Any:
    def maker(argnums: tuple[int, ...], ans: Any, args: tuple, kwargs: dict) -> Any:
        pred, target = args[0], args[1]
        n = count_elements(pred) if kwargs.get("mean", True) else 1

        def vjp(g: Any) -> list[Any]:
            if traced(g, pred, target):
                o = TRACED
                c = o.mul(g, factor / n)  # (2/N) g, or g / N
                d = o.sub(pred, target)
                if sign:
                    d = _sign_of(d)
                gd = o.mul(d, c)
                return [gd if i == 0 else o.neg(gd) for i in argnums]
            gd = _scaled_d(pred, target, (factor / n) * g if factor != 1.0 else g / n, sign)
            return [gd if i == 0 else -gd for i in argnums]

        return vjp

    return maker


def _sign_of(d: Any) -> Any:
    """sign(d) as a constant (its derivative is 0 wherever it is defined)."""
    v = getval(d)
    return namespace_of(v).sign(v)


def _loss_jvp(sign: bool, factor: float) -> Any:
    def jvp(argnums: tuple[int, ...], gs: list, ans: Any, args: tuple, kwargs: dict) -> Any:
        pred, target = args[0], args[1]
        o = TRACED if traced(pred, target, *gs) else RAW
        t = None
        for i, tangent in zip(argnums, gs, strict=True):
            t = (tangent if i == 0 else o.neg(tangent)) if t is None else (
                o.add(t, tangent) if i == 0 else o.sub(t, tangent))
        d = o.sub(pred, target)
        s = o.dot(_sign_of(d) if sign else d, t)
        n = count_elements(pred) if kwargs.get("mean", True) else 1
        return o.mul(s, factor / n) if (factor != 1.0 or n != 1) else s

    return jvp


defvjp_argnums(l1_loss_op, _loss_vjp(sign=True, factor=1.0))
defjvp_argnums(l1_loss_op, _loss_jvp(sign=True, factor=1.0))
defvjp_argnums(mse_loss_op, _loss_vjp(sign=False, factor=2.0))
defjvp_argnums(mse_loss_op, _loss_jvp(sign=False, factor=2.0))
