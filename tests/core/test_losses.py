"""The losses' value follows one documented summation order at every size (issue 11).

``minilora.losses`` reduces d = pred - target in consecutive C-order blocks of ``BLOCK``
elements: each block by NumPy's pairwise sum, the block sums by NumPy's pairwise sum in block
order. Before, an 8 MiB threshold (tuned on one machine) switched between two orders, so the
loss of the same data depended on its size class. Here the value is recomputed from that
description, independently, at sizes around every block boundary, and the order is shown not to
depend on the array's shape or memory layout, only on its C-order elements.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import minilora as ml
from minilora import losses

B = losses.BLOCK
SIZES = [1, 7, B - 1, B, B + 1, 2 * B, 2 * B + 3, 5 * B - 1, 9 * B + 17]


def documented(pred: Any, target: Any, square: bool) -> Any:
    """The order the module documents, written from its description with plain NumPy."""
    d = (np.asarray(pred) - np.asarray(target)).ravel()  # C order
    blocks = [d[i:i + B] for i in range(0, max(d.size, 1), B)]
    sums = np.array([np.sum(b * b) if square else np.sum(np.abs(b)) for b in blocks], dtype=d.dtype)
    return np.sum(sums)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("n", SIZES)
def test_the_value_is_the_documented_blockwise_sum_at_every_size(n: int, dtype: str) -> None:
    rng = np.random.default_rng(n)
    # values of mixed magnitude, so that another order of summation would round differently
    pred = (rng.standard_normal(n) * 10.0 ** rng.integers(-3, 4, n)).astype(dtype)
    target = rng.standard_normal(n).astype(dtype)
    for loss, square in ((ml.mse_loss, True), (ml.l1_loss, False)):
        total = loss(pred, target, reduction="sum")
        assert total.dtype == np.dtype(dtype)
        assert total == documented(pred, target, square), (loss.__name__, n, dtype)
        assert loss(pred, target) == documented(pred, target, square) / n


def test_the_order_would_see_a_different_one() -> None:
    """The comparison above can fail: a plain whole-array sum rounds differently at these sizes."""
    rng = np.random.default_rng(0)
    n = 9 * B + 17
    pred = (rng.standard_normal(n) * 10.0 ** rng.integers(-3, 4, n)).astype("float32")
    target = rng.standard_normal(n).astype("float32")
    d = pred - target
    assert np.sum(d * d, dtype=np.float32) != documented(pred, target, True) or \
        np.sum(np.abs(d)) != documented(pred, target, False)


@pytest.mark.parametrize("loss", [ml.mse_loss, ml.l1_loss], ids=["mse", "l1"])
def test_the_value_depends_on_the_elements_not_the_shape_or_layout(loss: Any) -> None:
    rng = np.random.default_rng(5)
    n = 4 * B + 128
    flat_p, flat_t = rng.standard_normal(n).astype("float32"), rng.standard_normal(n).astype("float32")
    want = loss(flat_p, flat_t)
    for shape in [(n // 32, 32), (32, n // 32), (4, n // 128, 32)]:
        assert loss(flat_p.reshape(shape), flat_t.reshape(shape)) == want, shape
    # a Fortran-ordered copy (same C-order elements) and a transposed view of a C array
    p2, t2 = flat_p.reshape(n // 32, 32), flat_t.reshape(n // 32, 32)
    assert loss(np.asfortranarray(p2), np.asfortranarray(t2)) == want
    assert loss(np.ascontiguousarray(p2.T).T, np.ascontiguousarray(t2.T).T) == want


def test_a_prefix_of_whole_blocks_sums_the_same_way_inside_a_larger_array() -> None:
    """No size class: the first k blocks' contribution is the same whether or not more follow."""
    rng = np.random.default_rng(9)
    p, t = rng.standard_normal(6 * B), rng.standard_normal(6 * B)
    for k in (1, 2, 3):
        head = ml.mse_loss(p[:k * B], t[:k * B], reduction="sum")
        assert head == documented(p[:k * B], t[:k * B], True)
    assert ml.mse_loss(p, t, reduction="sum") == np.sum(
        np.array([ml.mse_loss(p[i:i + B], t[i:i + B], reduction="sum") for i in range(0, 6 * B, B)]))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("n", [7, losses.BLOCK - 1, losses.BLOCK, losses.BLOCK + 1, 3 * losses.BLOCK + 5])
def test_the_l1_gradient_is_sign_of_d_over_n_at_every_size(n: int, dtype: str) -> None:
    # The VJP forms sign(d) block by block above BLOCK elements (np.sign in place is slow):
    # whatever the size, the gradient is sign(pred - target) / N elementwise, zeros and NaN kept.
    rng = np.random.default_rng(n)
    pred = rng.standard_normal(n).astype(dtype)
    target = pred.copy()
    target[::3] = rng.standard_normal(target[::3].shape)  # a third differ, the rest give sign 0
    pred[5] = np.nan
    target[6] = np.inf
    g_pred, g_target = ml.grad(lambda p, t: ml.l1_loss(p, t), argnum=(0, 1))(pred, target)
    expected = np.sign(pred - target) * (np.float64(1.0) / n)
    assert g_pred.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(g_pred, expected.astype(dtype))
    np.testing.assert_array_equal(g_target, -expected.astype(dtype))
    assert 0 < np.count_nonzero(g_pred == 0) == np.count_nonzero(pred == target)


def test_the_l1_gradient_of_strided_inputs() -> None:
    rng = np.random.default_rng(0)
    pred = rng.standard_normal((300, 400)).T  # not C-contiguous, more than one block
    target = rng.standard_normal((400, 300))
    g = ml.grad(lambda p: ml.l1_loss(p, target))(pred)
    np.testing.assert_array_equal(g, np.sign(pred - target) / pred.size)
