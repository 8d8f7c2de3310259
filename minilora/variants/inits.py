"""Initialisations that use the base weight: PiSSA (SVD), OLoRA (QR), "orthogonal".

Each returns (lora, adjusted base W) so that the adapted layer starts equal to the base layer.
Shapes as in ``minilora.layers``: W (d_out, d_in) [fan_in_fan_out: (d_in, d_out)], A (r, d_in),
B (d_out, r).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from autograd.tracer import getval

from minilora._checks import check_bool, check_count, check_floats, check_rank, check_real, check_rng
from minilora.backend import get_backend
from minilora.errors import MiniLoraTypeError, MiniLoraValueError, ShapeError

# ---------------------------------------------------------------- inits that use W


def _as_rows(W: Any, fan_in_fan_out: bool) -> np.ndarray:
    """W as a host float64 (d_out, d_in) matrix."""
    fan_in_fan_out = check_bool(fan_in_fan_out, "fan_in_fan_out")
    check_floats(W=W)
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
    if not hasattr(M, "ndim"):
        raise MiniLoraTypeError(f"M must be a 2-D float array; got {type(M).__name__}")
    check_floats(M=M)
    if M.ndim != 2:
        raise ShapeError(f"M must be a 2-D array; got shape {M.shape}")
    rank, niter = check_rank(rank), check_count(niter, "niter")
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
