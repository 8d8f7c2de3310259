"""Subspace similarity (paper section 7.2): constructed cases with known answers, the grid
against the pairwise definition, symmetry and invariances, bad input."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minilora.errors import MiniLoraTypeError, MiniLoraValueError, ShapeError
from minilora.study.subspace import right_singular_vectors, subspace_similarity, subspace_similarity_grid

with_fixture = settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def orthonormal(seed: int, d: int, k: int) -> np.ndarray:
    """k orthonormal columns in R^d."""
    return np.linalg.qr(np.random.default_rng(seed).standard_normal((d, k)))[0]


def factor(V: np.ndarray, sigma: list[float], seed: int = 0) -> np.ndarray:
    """A (r, d) = P diag(sigma) V^T with P a random rotation: right singular vectors V, in the
    order of the decreasing sigma."""
    P = orthonormal(seed + 100, len(sigma), len(sigma))
    return P @ (np.asarray(sigma)[:, None] * V.T)


def test_identical_subspaces_give_one() -> None:
    A = np.random.default_rng(0).standard_normal((6, 20))
    grid = subspace_similarity_grid(A, A)
    np.testing.assert_allclose(grid, np.ones((6, 6)), atol=1e-12)  # nested top-i, top-j spans


def test_same_row_space_at_full_rank_gives_one() -> None:
    rng = np.random.default_rng(1)
    A = rng.standard_normal((5, 30))
    M = rng.standard_normal((5, 5))  # invertible: same row space, other singular vectors
    assert subspace_similarity(A, M @ A, 5, 5) == pytest.approx(1.0, abs=1e-12)


def test_orthogonal_subspaces_give_zero() -> None:
    V = orthonormal(2, 24, 8)
    A1, A2 = factor(V[:, :4], [4, 3, 2, 1]), factor(V[:, 4:], [4, 3, 2, 1], seed=1)
    np.testing.assert_allclose(subspace_similarity_grid(A1, A2), np.zeros((4, 4)), atol=1e-12)


@pytest.mark.parametrize("angle", [0.0, np.pi / 6, np.pi / 4, np.pi / 3, np.pi / 2])
def test_two_lines_give_cos_squared(angle: float) -> None:
    e1, e2 = np.eye(10)[0], np.eye(10)[1]
    A1, A2 = 3.0 * e1[None, :], -2.0 * (np.cos(angle) * e1 + np.sin(angle) * e2)[None, :]
    assert subspace_similarity(A1, A2, 1, 1) == pytest.approx(np.cos(angle) ** 2, abs=1e-12)


def test_known_grid_for_swapped_directions() -> None:
    """A1's directions by decreasing singular value: v1, v2, v3; A2's: v2, v1, v4. Then
    phi(1,1) = |<v1, v2>|^2 = 0, phi(1,2) = 1 (v1 is in span(v2, v1)), phi(2,2) = 1,
    phi(3,3) = 2/3 (v3 is orthogonal to v2, v1, v4)."""
    V = orthonormal(3, 16, 4)
    A1 = factor(V[:, [0, 1, 2]], [3.0, 2.0, 1.0])
    A2 = factor(V[:, [1, 0, 3]], [3.0, 2.0, 1.0], seed=5)
    expected = np.array([
        [0.0, 1.0, 1.0],        # i=1: v1 against {v2}, {v2,v1}, {v2,v1,v4}
        [1.0, 1.0, 1.0],        # i=2: {v1,v2}: 1/1, 2/2, 2/2
        [1.0, 1.0, 2.0 / 3.0],  # i=3: {v1,v2,v3} vs {v2}: 1/1; vs {v2,v1}: 2/2; vs all: 2/3
    ])
    np.testing.assert_allclose(subspace_similarity_grid(A1, A2), expected, atol=1e-12)


def test_right_singular_vectors_order_and_orthonormality() -> None:
    V = orthonormal(4, 12, 3)
    U = right_singular_vectors(factor(V, [5.0, 2.0, 0.5]))
    assert U.shape == (12, 3)
    np.testing.assert_allclose(U.T @ U, np.eye(3), atol=1e-12)
    np.testing.assert_allclose(np.abs(np.sum(U * V, axis=0)), np.ones(3), atol=1e-12)  # same columns, up to sign


@given(seed=st.integers(0, 2**32 - 1), r1=st.integers(1, 6), r2=st.integers(1, 6), d=st.integers(6, 20))
def test_grid_matches_pairwise_and_is_symmetric(seed: int, r1: int, r2: int, d: int) -> None:
    rng = np.random.default_rng(seed)
    A1, A2 = rng.standard_normal((r1, d)), rng.standard_normal((r2, d))
    grid = subspace_similarity_grid(A1, A2)
    assert grid.shape == (r1, r2)
    assert np.all(grid >= -1e-12) and np.all(grid <= 1 + 1e-12)
    for i in range(1, r1 + 1):
        for j in range(1, r2 + 1):
            phi = subspace_similarity(A1, A2, i, j)
            assert grid[i - 1, j - 1] == pytest.approx(phi, abs=1e-12)
            assert subspace_similarity(A2, A1, j, i) == pytest.approx(phi, abs=1e-12)


@given(seed=st.integers(0, 2**32 - 1), c=st.floats(0.01, 100.0))
def test_invariant_to_rotating_and_scaling_the_factor(seed: int, c: float) -> None:
    """phi depends on singular directions only: A -> c Q A (Q orthogonal) changes nothing."""
    rng = np.random.default_rng(seed)
    A1, A2 = rng.standard_normal((4, 15)), rng.standard_normal((3, 15))
    Q = np.linalg.qr(rng.standard_normal((4, 4)))[0]
    np.testing.assert_allclose(subspace_similarity_grid(c * Q @ A1, A2), subspace_similarity_grid(A1, A2), atol=1e-9)


def test_arrays_from_another_backend(backend: Any) -> None:
    A1 = np.random.default_rng(7).standard_normal((3, 10))
    A2 = np.random.default_rng(8).standard_normal((4, 10))
    grid = subspace_similarity_grid(backend.put(A1), backend.put(A2))
    np.testing.assert_allclose(grid, subspace_similarity_grid(A1, A2), atol=1e-14)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(("i", "j", "error", "fragment"), [
    (0, 1, MiniLoraValueError, "i must be in [1, r1] = [1, 4]; got 0"),
    (5, 1, MiniLoraValueError, "i must be in [1, r1] = [1, 4]; got 5"),
    (1, 0, MiniLoraValueError, "j must be in [1, r2] = [1, 3]; got 0"),
    (1, 4, MiniLoraValueError, "j must be in [1, r2] = [1, 3]; got 4"),
    (-1, 2, MiniLoraValueError, "got -1"),
    (1.5, 1, MiniLoraTypeError, "i must be an integer in [1, r1] = [1, 4]; got 1.5"),
    (1, True, MiniLoraTypeError, "j must be an integer"),
])
def test_indices_outside_one_to_r(i: Any, j: Any, error: type, fragment: str) -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(error) as info:
        subspace_similarity(rng.standard_normal((4, 9)), rng.standard_normal((3, 9)), i, j)
    assert fragment in str(info.value)


def test_rank_above_width_limits_indices() -> None:
    """A (8, 5) has only 5 right singular vectors: i runs to min(r, d)."""
    rng = np.random.default_rng(0)
    A1 = rng.standard_normal((8, 5))
    assert subspace_similarity_grid(A1, A1).shape == (5, 5)
    with pytest.raises(MiniLoraValueError, match=r"\[1, 5\]; got 6"):
        subspace_similarity(A1, A1, 6, 1)


@pytest.mark.parametrize(("A1", "A2", "error", "fragment"), [
    (np.ones((2, 5)), np.ones((2, 6)), ShapeError, "same number of columns"),
    (np.ones(5), np.ones((2, 5)), ShapeError, "A1 must be 2-D"),
    (np.ones((2, 5)), np.ones((2, 5), dtype=int), MiniLoraTypeError, "A2 must have a real floating dtype"),
    (np.full((2, 5), np.nan), np.ones((2, 5)), MiniLoraValueError, "A1 has 10 non-finite"),
    (np.ones((0, 5)), np.ones((2, 5)), ShapeError, "must not be empty"),
])
def test_bad_factors(A1: Any, A2: Any, error: type, fragment: str) -> None:
    with pytest.raises(error, match=fragment):
        subspace_similarity_grid(A1, A2)
