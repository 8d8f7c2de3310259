"""LoRA with a bias on lora_B (PEFT ``lora_bias=True``): y = lora_dense(...) + s b_B.

Shapes as in ``minilora.layers``: W (d_out, d_in) [fan_in_fan_out: (d_in, d_out)], A (r, d_in),
B (d_out, r), bias (d_out,).
"""

from __future__ import annotations

from typing import Any

from minilora import array_ops, ops
from minilora._checks import check_floats, check_real, check_shape, get_key
from minilora.errors import MiniLoraValueError
from minilora.layers import base_operands

# ---------------------------------------------------------------- lora_bias


def lora_bias_dense(params: dict, lora: dict, x: Any, *, scale: float = 1.0, fan_in_fan_out: bool = False,
                    dropout_mask: Any = None) -> Any:
    """y = x W^T + b + s ((x mask) A^T B^T + b_B) (PEFT ``lora_bias=True``: lora_B has a bias,
    and ``lora_B(lora_A(x)) * scaling`` scales it too). lora {"A", "B", "bias" (d_out,)};
    params must have "b" (PEFT cannot merge a lora bias into a layer without one)."""
    W, b, d_in, d_out = base_operands(params, x, fan_in_fan_out)
    if b is None:
        raise MiniLoraValueError('lora_bias needs params["b"]: the base layer has no bias to merge it into')
    bias = get_key(lora, "bias", "lora")
    check_shape(bias, 'lora["bias"]', (d_out,), "(d_out,)")
    s = check_real(scale, "scale")
    return ops.lora_linear(x, W, array_ops.add(b, array_ops.mul(bias, s)), lora["A"], lora["B"], dropout_mask, scale=s,
                           fan_in_fan_out=fan_in_fan_out)


def lora_bias_merge(params: dict, lora: dict, *, scale: float = 1.0, fan_in_fan_out: bool = False,
                    sign: float = 1.0) -> dict:
    """W' = W + s B A and b' = b + s b_B (``sign=-1``: unmerge), PEFT ``Linear.merge``."""
    from minilora.layers import merge, unmerge

    sign = check_real(sign, "sign")
    if sign not in (1.0, -1.0):
        raise MiniLoraValueError(f"sign must be 1 (merge) or -1 (unmerge); got {sign}")
    f = merge if sign > 0 else unmerge
    out = f(params, {"A": get_key(lora, "A", "lora"), "B": get_key(lora, "B", "lora")}, scale=scale,
            fan_in_fan_out=fan_in_fan_out)
    b, bias = get_key(params, "b", "params"), get_key(lora, "bias", "lora")
    d_out = out["W"].shape[1 if fan_in_fan_out else 0]
    check_shape(b, 'params["b"]', (d_out,), "(d_out,)")
    check_shape(bias, 'lora["bias"]', (d_out,), "(d_out,)")
    check_floats(b=b, bias=bias)
    out["b"] = b + bias * (check_real(scale, "scale") * sign)
    return out
