"""LoRA on an embedding table (PEFT ``lora.Embedding``, loralib ``Embedding``), with optional DoRA.

    y = W[ids] + s A^T[ids] B^T,   W (num, dim), A (r, num), B (dim, r)
"""

from __future__ import annotations

from typing import Any

import numpy as np
from autograd.tracer import getval

from minilora._checks import check_dim, check_floats, check_rank, check_real, check_rng, check_shape, get_key
from minilora.backend import get_backend, namespace_of
from minilora.errors import MiniLoraValueError, ShapeError
from minilora.layers import delta_weight, merge_weight
from minilora.variants import primitives

# ---------------------------------------------------------------- embedding


def embedding_lora_init(rng: Any, num_embeddings: int, dim: int, rank: int, *, dtype: Any = "float64") -> dict:
    """{"A": zeros (r, num), "B": N(0, 1) (dim, r)}: PEFT's and loralib's embedding init (A is
    the zero factor here, the opposite of the dense layer)."""
    rng = check_rng(rng)
    rank = check_rank(rank)
    num_embeddings, dim = check_dim(num_embeddings, "num_embeddings"), check_dim(dim, "dim")
    be = get_backend()
    dt = be.dtype(dtype)
    return {"A": be.asarray(np.zeros((rank, num_embeddings)), dt),
            "B": be.asarray(rng.standard_normal((dim, rank)), dt)}


def _embedding_checks(params: dict, lora: dict) -> tuple[Any, int, int]:
    W = get_key(params, "W", "params")
    shape = tuple(getval(W).shape)
    if len(shape) != 2:
        raise ShapeError(f'params["W"] must be 2-D with shape (num_embeddings, dim); got {shape}')
    num, dim = shape
    A, B = get_key(lora, "A", "lora"), get_key(lora, "B", "lora")
    r = getval(A).shape[0] if getval(A).ndim == 2 else -1
    check_shape(A, 'lora["A"]', (r, num), "(r, num_embeddings)")
    check_shape(B, 'lora["B"]', (dim, r), "(dim, r)")
    check_floats(W=W, A=A, B=B)
    return W, num, dim


def lora_embedding(params: dict, lora: dict, ids: Any, *, scale: float = 1.0, magnitude: Any = None) -> Any:
    """y = W[ids] + s A^T[ids] B^T (PEFT ``lora.Embedding.forward``); with a DoRA magnitude
    (dim,), y = m / ||W + s (B A)^T||_col * (W[ids] + s A^T[ids] B^T) (PEFT
    ``DoraEmbeddingVariant``). params {"W": (num, dim)}, lora {"A": (r, num), "B": (dim, r)},
    ids integer array (...) with entries in [0, num) -> (..., dim)."""
    W, num, dim = _embedding_checks(params, lora)
    idv = getval(ids)
    xp = namespace_of(getval(W))
    if not (hasattr(idv, "dtype") and xp.isdtype(idv.dtype, "integral")):
        raise MiniLoraValueError(f"ids must be an integer array; got {getattr(idv, 'dtype', type(idv).__name__)}")
    if idv.size and (int(xp.min(idv)) < 0 or int(xp.max(idv)) >= num):
        raise MiniLoraValueError(f"ids must lie in [0, {num}); got values in [{int(xp.min(idv))}, {int(xp.max(idv))}]")
    if magnitude is not None:
        check_shape(magnitude, "magnitude", (dim,), "(dim,)")
    return primitives.lora_embedding(idv, W, lora["A"], lora["B"], magnitude, scale=check_real(scale, "scale"))


def embedding_delta(lora: dict, *, scale: float = 1.0) -> Any:
    """Delta W = s (B A)^T, (num_embeddings, dim) (PEFT ``Embedding.get_delta_weight``)."""
    return delta_weight(lora, scale=scale, fan_in_fan_out=True)  # (B A)^T, with delta_weight's checks


def embedding_merge(params: dict, lora: dict, *, scale: float = 1.0, magnitude: Any = None) -> dict:
    """W' = W + s (B A)^T; with DoRA, W' = m / ||W + s (B A)^T||_col * (W + s (B A)^T)."""
    W, _, _ = _embedding_checks(params, lora)
    lv = getval(lora)
    total = merge_weight(getval(W), lv["A"], lv["B"], scale=scale, fan_in_fan_out=True, magnitude=magnitude)
    return {**params, "W": total}


def embedding_unmerge(params: dict, lora: dict, *, scale: float = 1.0) -> dict:
    """W = W' - s (B A)^T (plain LoRA only; DoRA needs the norm, as for ``dora_unmerge``)."""
    W, _, _ = _embedding_checks(params, lora)
    lv = getval(lora)
    return {**params, "W": merge_weight(getval(W), lv["A"], lv["B"], scale=scale, fan_in_fan_out=True, unmerge=True)}
