"""LoRA variants that PEFT ships for dense and embedding layers, as pure functions.

    DoRA       y = x W^T + b + (c - 1)(dropout(x) W^T) + c s (dropout(x) A^T) B^T,
               c = m / ||W + s B A||_row (detached)          (Liu et al. 2024, arXiv 2402.09353;
                                                               PEFT tuners/lora/dora.py, variants.py)
    embedding  y = W[ids] + s A^T[ids] B^T,  A (r, num), B (dim, r)   (PEFT lora.Embedding, loralib)
    lora_bias  y = lora_dense(...) + s b_B                    (PEFT ``lora_bias=True``)
    inits      PiSSA (SVD), OLoRA (QR), "orthogonal"; each returns (lora, adjusted base W)

Shapes as in ``layers``: W (d_out, d_in) [fan_in_fan_out: (d_in, d_out)], A (r, d_in),
B (d_out, r), m (d_out,). Float64 throughout unless the inputs are float32.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from autograd.tracer import getval

from . import ops
from ._checks import check_floats, check_rank, check_real, check_rng, check_shape, get_key
from .backend import get_backend, namespace_of
from .errors import MiniLoraValueError, NonFiniteError, ShapeError
from .layers import _base, _lora_factors

__all__ = [
    "dora_magnitude",
    "dora_dense",
    "dora_merge",
    "dora_unmerge",
    "lora_bias_dense",
    "lora_bias_merge",
    "embedding_lora_init",
    "lora_embedding",
    "embedding_delta",
    "embedding_merge",
    "embedding_unmerge",
    "pissa_init",
    "olora_init",
    "orthogonal_init",
    "randomized_svd",
]


# ---------------------------------------------------------------- DoRA


def dora_magnitude(params: dict, lora: dict, *, scale: float = 1.0, fan_in_fan_out: bool = False) -> Any:
    """m = ||W + s B A|| per output row, (d_out,): DoRA's magnitude at initialisation, so the
    adapter starts as the base layer (PEFT ``DoraLinearLayer.update_layer``)."""
    W = get_key(params, "W", "params")
    shape = tuple(getval(W).shape)
    d_in, d_out = shape if fan_in_fan_out else shape[::-1]
    A, B = _lora_factors(lora, d_in, d_out)
    check_floats(W=W, A=A, B=B)
    return ops.dora_norm(getval(W), getval(A), getval(B), scale=check_real(scale, "scale"),
                         fan_in_fan_out=fan_in_fan_out)


def dora_dense(params: dict, lora: dict, magnitude: Any, x: Any, *, scale: float = 1.0,
               fan_in_fan_out: bool = False, dropout_mask: Any = None) -> Any:
    """DoRA forward (see the module docstring; PEFT ``DoraLinearVariant.forward``): with a
    dropout mask the base term is recomputed on the dropped input, as PEFT does in training.

    params {"W", "b" optional}, lora {"A", "B"}, magnitude (d_out,), x (..., d_in) -> (..., d_out).
    Gradients flow to x, W, b, A, B, magnitude and the mask; never through the row norm.
    """
    W, b, d_in, d_out = _base(params, x, fan_in_fan_out)
    A, B = _lora_factors(getval(lora), d_in, d_out)
    check_shape(magnitude, "magnitude", (d_out,), "(d_out,)")
    if dropout_mask is not None:
        check_shape(dropout_mask, "dropout_mask", tuple(getval(x).shape), "x.shape")
    check_floats(x=x, W=W, b=b, A=A, B=B, magnitude=magnitude, dropout_mask=dropout_mask)
    return ops.dora_linear(x, W, b, lora["A"], lora["B"], magnitude, dropout_mask,
                           scale=check_real(scale, "scale"), fan_in_fan_out=fan_in_fan_out)


def dora_merge(params: dict, lora: dict, magnitude: Any, *, scale: float = 1.0,
               fan_in_fan_out: bool = False) -> tuple[dict, Any]:
    """(new params with W' = m / ||W + s B A||_row * (W + s B A), weight_norm) (PEFT
    ``DoraLinearVariant.merge_safe``). Keep weight_norm: ``dora_unmerge`` needs it, because the
    norm of the unmerged weight cannot be recovered from W' (every row of W' has norm m)."""
    W = getval(get_key(params, "W", "params"))
    norm = dora_magnitude(params, lora, scale=scale, fan_in_fan_out=fan_in_fan_out)
    xp = namespace_of(W)
    delta = ops.lora_delta(getval(lora["A"]), getval(lora["B"]), scale=scale, fan_in_fan_out=fan_in_fan_out)
    factor = magnitude / norm
    factor = factor[None, :] if fan_in_fan_out else factor[:, None]
    new_W = factor * (W + delta)
    if not bool(xp.all(xp.isfinite(new_W))):
        raise NonFiniteError("DoRA merge would give non-finite values in W (a zero row norm?); params unchanged")
    return {**params, "W": new_W}, norm


def dora_unmerge(params: dict, lora: dict, magnitude: Any, weight_norm: Any, *, scale: float = 1.0,
                 fan_in_fan_out: bool = False) -> dict:
    """W = W' / (m / weight_norm) - s B A, the inverse of ``dora_merge`` (PEFT
    ``DoraLinearVariant.unmerge``), with the weight_norm ``dora_merge`` returned."""
    W = getval(get_key(params, "W", "params"))
    delta = ops.lora_delta(getval(lora["A"]), getval(lora["B"]), scale=scale, fan_in_fan_out=fan_in_fan_out)
    factor = magnitude / weight_norm
    factor = factor[None, :] if fan_in_fan_out else factor[:, None]
    return {**params, "W": W / factor - delta}


# ---------------------------------------------------------------- lora_bias


def lora_bias_dense(params: dict, lora: dict, x: Any, *, scale: float = 1.0, fan_in_fan_out: bool = False,
                    dropout_mask: Any = None) -> Any:
    """y = x W^T + b + s ((x mask) A^T B^T + b_B) (PEFT ``lora_bias=True``: lora_B has a bias,
    and ``lora_B(lora_A(x)) * scaling`` scales it too). lora {"A", "B", "bias" (d_out,)};
    params must have "b" (PEFT cannot merge a lora bias into a layer without one)."""
    W, b, d_in, d_out = _base(params, x, fan_in_fan_out)
    if b is None:
        raise MiniLoraValueError('lora_bias needs params["b"]: the base layer has no bias to merge it into')
    bias = get_key(lora, "bias", "lora")
    check_shape(bias, 'lora["bias"]', (d_out,), "(d_out,)")
    s = check_real(scale, "scale")
    return ops.lora_linear(x, W, b + bias * s, lora["A"], lora["B"], dropout_mask, scale=s,
                           fan_in_fan_out=fan_in_fan_out)


def lora_bias_merge(params: dict, lora: dict, *, scale: float = 1.0, fan_in_fan_out: bool = False,
                    sign: float = 1.0) -> dict:
    """W' = W + s B A and b' = b + s b_B (``sign=-1``: unmerge), PEFT ``Linear.merge``."""
    from .layers import merge, unmerge

    f = merge if sign > 0 else unmerge
    out = f(params, {"A": lora["A"], "B": lora["B"]}, scale=scale, fan_in_fan_out=fan_in_fan_out)
    out["b"] = params["b"] + lora["bias"] * (scale * sign)
    return out


# ---------------------------------------------------------------- embedding


def embedding_lora_init(rng: Any, num_embeddings: int, dim: int, rank: int, *, dtype: Any = "float64") -> dict:
    """{"A": zeros (r, num), "B": N(0, 1) (dim, r)}: PEFT's and loralib's embedding init (A is
    the zero factor here, the opposite of the dense layer)."""
    rng = check_rng(rng)
    rank = check_rank(rank)
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
    return ops.lora_embedding(idv, W, lora["A"], lora["B"], magnitude, scale=check_real(scale, "scale"))


def embedding_delta(lora: dict, *, scale: float = 1.0) -> Any:
    """Delta W = s (B A)^T, (num_embeddings, dim) (PEFT ``Embedding.get_delta_weight``)."""
    return ops.lora_delta(lora["A"], lora["B"], scale=scale, fan_in_fan_out=True)


def embedding_merge(params: dict, lora: dict, *, scale: float = 1.0, magnitude: Any = None) -> dict:
    """W' = W + s (B A)^T; with DoRA, W' = m / ||W + s (B A)^T||_col * (W + s (B A)^T)."""
    W, _, _ = _embedding_checks(params, lora)
    total = getval(W) + embedding_delta(getval(lora), scale=scale)
    if magnitude is not None:
        xp = namespace_of(total)
        total = total * (magnitude / xp.sqrt(xp.sum(total * total, axis=0)))[None, :]
    return {**params, "W": total}


def embedding_unmerge(params: dict, lora: dict, *, scale: float = 1.0) -> dict:
    """W = W' - s (B A)^T (plain LoRA only; DoRA needs the norm, as for ``dora_unmerge``)."""
    W, _, _ = _embedding_checks(params, lora)
    return {**params, "W": getval(W) - embedding_delta(getval(lora), scale=scale)}


# ---------------------------------------------------------------- inits that use W


def _as_rows(W: Any, fan_in_fan_out: bool) -> np.ndarray:
    """W as a host float64 (d_out, d_in) matrix."""
    Wv = np.asarray(getval(W), dtype=np.float64)
    if Wv.ndim != 2:
        raise ShapeError(f"W must be 2-D; got shape {Wv.shape}")
    return Wv.T if fan_in_fan_out else Wv


def _back(W: Any, residual: np.ndarray, A: np.ndarray, B: np.ndarray, fan_in_fan_out: bool) -> tuple[dict, Any]:
    be = get_backend()
    dt = getval(W).dtype
    res = residual.T if fan_in_fan_out else residual
    return {"A": be.asarray(A, dt), "B": be.asarray(B, dt)}, be.asarray(res, dt)


def randomized_svd(M: np.ndarray, rank: int, niter: int, rng: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-``rank`` (U, S, V) of M (m, n) by randomized subspace iteration (Halko, Martinsson &
    Tropp 2011, alg. 4.4; the algorithm of ``torch.svd_lowrank`` with q = rank, which PEFT's
    ``pissa_niter_k`` calls): Q = orth(M G), then ``niter`` times Q = orth(M orth(M^T Q)),
    and the SVD of Q^T M. M ~= U diag(S) V^T with U (m, rank), S (rank,), V (n, rank)."""
    rng = check_rng(rng)
    Q, _ = np.linalg.qr(M @ rng.standard_normal((M.shape[1], rank)))
    for _ in range(niter):
        Z, _ = np.linalg.qr(M.T @ Q)
        Q, _ = np.linalg.qr(M @ Z)
    Ub, S, Vh = np.linalg.svd(Q.T @ M, full_matrices=False)
    return Q @ Ub, S, Vh.T


def pissa_init(W: Any, rank: int, *, scale: float = 1.0, fan_in_fan_out: bool = False, niter: int | None = None,
               rng: Any = None) -> tuple[dict, Any]:
    """PiSSA (Meng et al. 2024, arXiv 2404.02948; PEFT ``LoraLayer.pissa_init``): with
    W = U S V^T (d_out, d_in), A = sqrt(S_r / s) V_r^T, B = U_r sqrt(S_r / s), so s B A is the
    top-r part of W, and the base becomes the residual W - s B A. ``niter`` uses the randomized
    SVD (PEFT ``init_lora_weights="pissa_niter_<niter>"``; needs ``rng``).

    Computed in float64 on the host (PEFT computes in float32), cast back to W's dtype.
    Returns ({"A": (r, d_in), "B": (d_out, r)}, W_residual with W's shape).
    """
    rank = check_rank(rank)
    s = check_real(scale, "scale")
    M = _as_rows(W, fan_in_fan_out)
    if rank > min(M.shape):
        raise MiniLoraValueError(f"rank must be <= min(d_out, d_in) = {min(M.shape)} for PiSSA; got {rank}")
    if niter is None:
        U, S, Vh = np.linalg.svd(M, full_matrices=False)
        U, S, V = U[:, :rank], S[:rank], Vh[:rank].T
    else:
        if rng is None:
            raise MiniLoraValueError("pissa with niter needs rng (the randomized SVD draws a Gaussian matrix)")
        U, S, V = randomized_svd(M, rank, int(niter), rng)
    root = np.sqrt(S / s)
    A = root[:, None] * V.T
    B = U * root[None, :]
    return _back(W, M - s * (B @ A), A, B, fan_in_fan_out)


def olora_init(W: Any, rank: int, *, scale: float = 1.0) -> tuple[dict, Any]:
    """OLoRA (Buyukakyuz 2024, arXiv 2406.01775; PEFT ``LoraLayer.olora_init``): W = Q R (QR of
    the (d_out, d_in) weight), B = Q[:, :r], A = R[:r], base W - s B A. fan_in_fan_out is not
    supported (PEFT factorizes the stored matrix as is, which then has the wrong shape)."""
    rank = check_rank(rank)
    s = check_real(scale, "scale")
    M = _as_rows(W, False)
    if rank > min(M.shape):
        raise MiniLoraValueError(f"rank must be <= min(d_out, d_in) = {min(M.shape)} for OLoRA; got {rank}")
    Q, R = np.linalg.qr(M)
    B, A = Q[:, :rank], R[:rank]
    return _back(W, M - s * (B @ A), A, B, False)


def orthogonal_init(W: Any, rank: int, rng: Any = None, *, fan_in_fan_out: bool = False,
                    normals: tuple | None = None) -> tuple[dict, Any]:
    """PEFT ``init_lora_weights="orthogonal"`` (``LoraLayer.orthogonal_init``): Q from the QR of
    a Gaussian (r, r); A = (G1 Q[0::2])^T / 10 (r, d_in), B = G2^T Q[1::2] / 10 (d_out, r) with
    G1 (d_in, r/2), G2 (r/2, d_out) Gaussian. Rows of Q are orthonormal, so B A = 0 to rounding:
    the adapter starts as a no-op with neither factor zero. The base is unchanged.

    normals: optional (X (r, r), G1, G2) to use instead of drawing from ``rng`` (to replay
    another framework's draws). rank must be even."""
    rank = check_rank(rank)
    if rank % 2:
        raise MiniLoraValueError(f"orthogonal init needs an even rank; got {rank}")
    M = _as_rows(W, fan_in_fan_out)
    d_out, d_in = M.shape
    if normals is None:
        rng = check_rng(rng)
        normals = (rng.standard_normal((rank, rank)), rng.standard_normal((d_in, rank // 2)),
                   rng.standard_normal((rank // 2, d_out)))
    X, G1, G2 = (np.asarray(a, dtype=np.float64) for a in normals)
    Q, _ = np.linalg.qr(X)
    A = (G1 @ Q[0::2, :]).T / 10.0
    B = G2.T @ Q[1::2, :] / 10.0
    return _back(W, M, A, B, fan_in_fan_out)
