"""Losses: L1 and mean squared error, matching ``torch.nn.functional.l1_loss`` / ``mse_loss``.

    l1:  L = (1/N) sum_i |pred_i - target_i|        ("sum": without the 1/N)
    mse: L = (1/N) sum_i (pred_i - target_i)^2

pred and target have the same shape (no broadcasting: PyTorch warns about it, we refuse it);
the result is a 0-d array (a NumPy scalar on NumPy). The derivative of |d| at d = 0 is taken
as 0, as PyTorch does (``sign(0) = 0``).
"""

from __future__ import annotations

from typing import Any

from . import ops
from ._checks import check_array, check_choice, check_floats
from .errors import ShapeError

__all__ = ["l1_loss", "mse_loss", "REDUCTIONS"]

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
    return ops.l1_loss_op(pred, target, mean=_check(pred, target, reduction))


def mse_loss(pred: Any, target: Any, *, reduction: str = "mean") -> Any:
    """Mean (or summed) squared error. pred, target (...) same shape -> 0-d."""
    return ops.mse_loss_op(pred, target, mean=_check(pred, target, reduction))
