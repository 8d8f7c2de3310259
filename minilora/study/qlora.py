"""QLoRA (Dettmers et al. 2023, arXiv 2305.14314): a frozen dense layer stored in NF4 with a LoRA
adapter in full precision on top.

``qlora_quantize`` stores the base weight with ``minilora.study.nf4.nf4_quantize``; ``qlora_dense``
dequantizes it onto the namespace and device of ``x`` and runs ``minilora.layers.lora_dense``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from minilora._checks import check_array
from minilora.backend import namespace_of
from minilora.errors import MiniLoraTypeError, MiniLoraValueError, ShapeError
from minilora.layers import lora_dense
from minilora.study.nf4 import nf4_dequantize, nf4_quantize

__all__ = ["qlora_quantize", "qlora_dense"]


def qlora_quantize(params: dict, *, blocksize: int = 64, double_quant: bool = True) -> dict:
    """A frozen dense layer {"W": (d_out, d_in), "b": (d_out,) optional} -> {"W": NF4 state, "b"}:
    the base weight stored in NF4 as QLoRA does (bias kept as it is)."""
    if not isinstance(params, dict) or "W" not in params:
        raise MiniLoraValueError('params must be a dict with "W" (d_out, d_in)')
    W = check_array(params["W"], 'params["W"]')
    if len(W.shape) != 2:
        raise ShapeError(f'params["W"] must be 2-D (d_out, d_in); got shape {tuple(W.shape)}')
    out = {"W": nf4_quantize(W, blocksize=blocksize, double_quant=double_quant)}
    if params.get("b") is not None:
        out["b"] = params["b"]
    return out


def qlora_dense(qparams: dict, lora: dict, x: Any, *, scale: float = 1.0, dropout_mask: Any = None) -> Any:
    """y = x W_nf4^T + b + scale * ((x * mask) A^T) B^T with W_nf4 = nf4_dequantize(qparams["W"])
    (QLoRA eq. 5, without its bfloat16 compute dtype: the dequantized float32 weight is cast to x's
    dtype). Only ``lora`` is meant to be differentiated; the frozen weight never is, so this is
    ``lora_dense`` on the dequantized weight and trains with ``fit``.

    qparams {"W": NF4 state of shape (d_out, d_in), "b": (d_out,) optional}, lora {"A": (r, d_in),
    "B": (d_out, r)}, x (..., d_in) -> (..., d_out).
    """
    if not isinstance(qparams, dict) or not isinstance(qparams.get("W"), dict):
        raise MiniLoraTypeError('qparams must be {"W": NF4 state from nf4_quantize, "b": optional}')
    xv = check_array(x, "x")
    W_host = nf4_dequantize(qparams["W"])
    if W_host.ndim != 2:
        raise ShapeError(f'qparams["W"] must hold a 2-D (d_out, d_in) weight; got shape {W_host.shape}')
    xp = namespace_of(xv)
    if xp is np:
        W = W_host.astype(xv.dtype)
    else:
        W = xp.asarray(W_host, dtype=xv.dtype, device=xv.device)
    frozen = {"W": W}
    if qparams.get("b") is not None:
        frozen["b"] = qparams["b"]
    return lora_dense(frozen, lora, x, scale=scale, dropout_mask=dropout_mask)
