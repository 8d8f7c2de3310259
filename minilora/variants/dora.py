"""DoRA (Liu et al. 2024, arXiv 2402.09353; PEFT tuners/lora/dora.py, variants.py), as pure functions.

    y = x W^T + b + (c - 1)(dropout(x) W^T) + c s (dropout(x) A^T) B^T,
    c = m / ||W + s B A||_row (detached, as in PEFT)

Shapes as in ``minilora.layers``: W (d_out, d_in) [fan_in_fan_out: (d_in, d_out)], A (r, d_in),
B (d_out, r), m (d_out,).
"""

from __future__ import annotations

from typing import Any

from autograd.tracer import getval

from minilora import ops
from minilora._checks import check_bool, check_floats, check_ndim, check_real, check_shape, get_key
from minilora.backend import namespace_of
from minilora.errors import NonFiniteError
from minilora.layers import base_operands, lora_factors, merge_weight
from minilora.variants import primitives

# ---------------------------------------------------------------- DoRA


def dora_magnitude(params: dict, lora: dict, *, scale: float = 1.0, fan_in_fan_out: bool = False) -> Any:
    """m = ||W + s B A|| per output row, (d_out,): DoRA's magnitude at initialisation, so the
    adapter starts as the base layer (PEFT ``DoraLinearLayer.update_layer``)."""
    fan_in_fan_out = check_bool(fan_in_fan_out, "fan_in_fan_out")
    W = get_key(params, "W", "params")
    check_ndim(W, 'params["W"]', 2, "(d_in, d_out)" if fan_in_fan_out else "(d_out, d_in)")
    shape = tuple(getval(W).shape)
    d_in, d_out = shape if fan_in_fan_out else shape[::-1]
    A, B = lora_factors(lora, d_in, d_out)
    check_floats(W=W, A=A, B=B)
    return primitives.dora_norm(getval(W), getval(A), getval(B), scale=check_real(scale, "scale"),
                         fan_in_fan_out=fan_in_fan_out)


def dora_dense(params: dict, lora: dict, magnitude: Any, x: Any, *, scale: float = 1.0,
               fan_in_fan_out: bool = False, dropout_mask: Any = None) -> Any:
    """DoRA forward (see the module docstring; PEFT ``DoraLinearVariant.forward``): with a
    dropout mask the base term is recomputed on the dropped input, as PEFT does in training.

    params {"W", "b" optional}, lora {"A", "B"}, magnitude (d_out,), x (..., d_in) -> (..., d_out).
    Gradients flow to x, W, b, A, B, magnitude and the mask; never through the row norm.
    """
    W, b, d_in, d_out = base_operands(params, x, fan_in_fan_out)
    A, B = lora_factors(getval(lora), d_in, d_out)
    check_shape(magnitude, "magnitude", (d_out,), "(d_out,)")
    if dropout_mask is not None:
        check_shape(dropout_mask, "dropout_mask", tuple(getval(x).shape), "x.shape")
    check_floats(x=x, W=W, b=b, A=A, B=B, magnitude=magnitude, dropout_mask=dropout_mask)
    return primitives.dora_linear(x, W, b, lora["A"], lora["B"], magnitude, dropout_mask,
                           scale=check_real(scale, "scale"), fan_in_fan_out=fan_in_fan_out)


def dora_merge(params: dict, lora: dict, magnitude: Any, *, scale: float = 1.0,
               fan_in_fan_out: bool = False) -> tuple[dict, Any]:
    """(new params with W' = m / ||W + s B A||_row * (W + s B A), weight_norm) (PEFT
    ``DoraLinearVariant.merge_safe``). Keep weight_norm: ``dora_unmerge`` needs it, because the
    norm of the unmerged weight cannot be recovered from W' (every row of W' has norm m)."""
    W = getval(get_key(params, "W", "params"))
    norm = dora_magnitude(params, lora, scale=scale, fan_in_fan_out=fan_in_fan_out)
    xp = namespace_of(W)
    new_W = merge_weight(W, getval(lora["A"]), getval(lora["B"]), scale=scale, fan_in_fan_out=fan_in_fan_out,
                         magnitude=magnitude)
    if not bool(xp.all(xp.isfinite(new_W))):
        raise NonFiniteError("DoRA merge would give non-finite values in W (a zero row norm?); params unchanged")
    return {**params, "W": new_W}, norm


def dora_unmerge(params: dict, lora: dict, magnitude: Any, weight_norm: Any, *, scale: float = 1.0,
                 fan_in_fan_out: bool = False) -> dict:
    """W = W' / (m / weight_norm) - s B A, the inverse of ``dora_merge`` (PEFT
    ``DoraLinearVariant.unmerge``), with the weight_norm ``dora_merge`` returned."""
    fan_in_fan_out = check_bool(fan_in_fan_out, "fan_in_fan_out")
    W = get_key(params, "W", "params")
    check_ndim(W, 'params["W"]', 2, "(d_in, d_out)" if fan_in_fan_out else "(d_out, d_in)")
    shape = tuple(getval(W).shape)
    d_in, d_out = shape if fan_in_fan_out else shape[::-1]
    A, B = lora_factors(getval(lora), d_in, d_out)
    check_shape(magnitude, "magnitude", (d_out,), "(d_out,)")
    check_shape(weight_norm, "weight_norm", (d_out,), "(d_out,)")
    check_floats(W=W, A=A, B=B, magnitude=magnitude, weight_norm=weight_norm)
    W = getval(W)
    delta = ops.lora_delta(getval(A), getval(B), scale=check_real(scale, "scale"), fan_in_fan_out=fan_in_fan_out)
    factor = magnitude / weight_norm
    factor = factor[None, :] if fan_in_fan_out else factor[:, None]
    return {**params, "W": W / factor - delta}
