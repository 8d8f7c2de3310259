"""Subspace similarity between two LoRA factors (Hu et al. 2021, section 7.2, eq. 4).

    phi(A1, A2, i, j) = || U1[:, :i]^T U2[:, :j] ||_F^2 / min(i, j)        in [0, 1]

U1, U2 are the right singular vectors of A1 (r1, d) and A2 (r2, d), as columns (d, r), in
order of decreasing singular value. phi = 1 when the span of the top-i directions of one lies in
(or contains) the span of the top-j directions of the other; 0 when the two are orthogonal. The
paper compares A from rank-8 and rank-64 runs of the same task (its Figure 3).

For B factors (d_out, r), whose columns span the output side, pass ``B.T``. Computed on the host
in float64 with NumPy's SVD.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np

from minilora._checks import check_array
from minilora.backend import to_numpy
from minilora.errors import MiniLoraTypeError, MiniLoraValueError, ShapeError

__all__ = ["right_singular_vectors", "subspace_similarity", "subspace_similarity_grid"]


def _factor(A: Any, name: str) -> np.ndarray:
    host = np.asarray(to_numpy(check_array(A, name)))
    if host.ndim != 2:
        raise ShapeError(f"{name} must be 2-D (r, d); got shape {host.shape}")
    if host.dtype.kind != "f":
        raise MiniLoraTypeError(f"{name} must have a real floating dtype; got {host.dtype}")
    if min(host.shape) == 0:
        raise ShapeError(f"{name} must not be empty; got shape {host.shape}")
    if not np.isfinite(host).all():
        bad = int(host.size - np.count_nonzero(np.isfinite(host)))
        raise MiniLoraValueError(f"{name} has {bad} non-finite value(s) (NaN or Inf)")
    return host.astype(np.float64)


def right_singular_vectors(A: Any) -> np.ndarray:
    """U (d, k) with k = min(r, d): the right singular vectors of A (r, d) as columns, by
    decreasing singular value (A = P S U^T)."""
    _, _, vh = np.linalg.svd(_factor(A, "A"), full_matrices=False)
    return vh.T


def _index(value: Any, name: str, k: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise MiniLoraTypeError(f"{name} must be an integer in [1, {what}] = [1, {k}]; got {value!r}")
    if not 1 <= int(value) <= k:
        raise MiniLoraValueError(f"{name} must be in [1, {what}] = [1, {k}]; got {value}")
    return int(value)


def _pair(A1: Any, A2: Any) -> tuple[np.ndarray, np.ndarray]:
    a1, a2 = _factor(A1, "A1"), _factor(A2, "A2")
    if a1.shape[1] != a2.shape[1]:
        raise ShapeError(
            f"A1 and A2 must have the same number of columns d (r, d); got A1 {a1.shape} and A2 {a2.shape}"
        )
    u1 = np.linalg.svd(a1, full_matrices=False)[2].T
    u2 = np.linalg.svd(a2, full_matrices=False)[2].T
    return u1, u2


def subspace_similarity(A1: Any, A2: Any, i: int, j: int) -> float:
    """phi(A1, A2, i, j) = ||U1[:, :i]^T U2[:, :j]||_F^2 / min(i, j) (paper eq. 4).

    A1 (r1, d), A2 (r2, d); i in [1, min(r1, d)], j in [1, min(r2, d)] -> float in [0, 1].
    """
    u1, u2 = _pair(A1, A2)
    i = _index(i, "i", u1.shape[1], "r1")
    j = _index(j, "j", u2.shape[1], "r2")
    m = u1[:, :i].T @ u2[:, :j]
    return float(np.sum(m * m) / min(i, j))


def subspace_similarity_grid(A1: Any, A2: Any) -> np.ndarray:
    """phi for every i, j at once: G[i - 1, j - 1] = phi(A1, A2, i, j), shape (r1, r2)
    (with r = min(r, d)). One product M = U1^T U2; phi(i, j) is the sum of M[:i, :j]^2, a 2-D
    cumulative sum, over min(i, j)."""
    u1, u2 = _pair(A1, A2)
    m = u1.T @ u2
    sums = np.cumsum(np.cumsum(m * m, axis=0), axis=1)
    i = np.arange(1, m.shape[0] + 1)[:, None]
    j = np.arange(1, m.shape[1] + 1)[None, :]
    return sums / np.minimum(i, j)
