"""The forward's (n, r) intermediate handed to the VJP (ops._remember_h): a pure optimisation.
Gradients must be identical whether the VJP finds it or has to recompute it."""

from __future__ import annotations

import numpy as np
import pytest
from autograd import make_vjp

import minilora.losses as losses
import minilora.ops as ops


def _args(seed: int = 0, mask: bool = False) -> tuple:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((3, 5, 6))
    m = (rng.random(x.shape) > 0.3) / 0.7 if mask else None
    return x, rng.standard_normal((4, 6)), rng.standard_normal(4), rng.standard_normal((2, 6)), \
        rng.standard_normal((4, 2)), m


@pytest.mark.parametrize("mask", [False, True])
def test_gradient_of_B_is_the_same_with_and_without_the_memo(mask: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    x, W, b, A, B, m = _args(mask=mask)
    g = np.random.default_rng(1).standard_normal((3, 5, 4))

    def f(B_: np.ndarray) -> np.ndarray:
        return ops.lora_linear(x, W, b, A, B_, m, scale=0.7)

    vjp, _ = make_vjp(f)(B)
    with_memo = vjp(g)
    monkeypatch.setattr(ops, "_recall_h", lambda y: None)  # as if the slot held another output
    vjp, _ = make_vjp(f)(B)
    np.testing.assert_array_equal(vjp(g), with_memo)


def test_the_memo_answers_only_for_its_own_output() -> None:
    x, W, b, A, B, m = _args()
    y1 = ops.lora_linear.fun(x, W, b, A, B, m, scale=0.7)
    y2 = ops.lora_linear.fun(x, W, b, A, B, m, scale=0.7)  # same values, another array
    assert ops._recall_h(y1) is None  # the slot now belongs to y2
    h = ops._recall_h(y2)
    np.testing.assert_array_equal(h, (x @ A.T) * 0.7)
    assert ops._recall_h(y2) is None  # taken once, then the slot is empty


@pytest.mark.parametrize("loss", [losses.l1_loss_op, losses.mse_loss_op], ids=["l1", "mse"])
@pytest.mark.parametrize("mean", [True, False])
def test_loss_gradients_are_the_same_with_and_without_the_memo(loss, mean: bool,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(2)
    pred, target = rng.standard_normal((4, 3)), rng.standard_normal((4, 3))

    def grads() -> tuple:
        vjp, _ = make_vjp(lambda p, t: loss(p, t, mean=mean), argnum=(0, 1))(pred, target)
        return vjp(np.float64(1.5))

    with_memo = grads()
    monkeypatch.setattr(losses, "_recall", lambda slot, key: None)  # forces the recomputation
    without = grads()
    for a, b in zip(with_memo, without, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(with_memo[0], -with_memo[1])  # d/dtarget = -d/dpred


@pytest.mark.parametrize("loss", [losses.l1_loss_op, losses.mse_loss_op], ids=["l1", "mse"])
def test_a_loss_vjp_called_twice_gives_the_same_gradient_and_leaves_its_inputs_alone(loss) -> None:
    # The first call writes the gradient over the forward's private d; the second must not see
    # that (make_vjp hands out a VJP that may be called any number of times).
    rng = np.random.default_rng(3)
    pred, target = rng.standard_normal((5, 4)), rng.standard_normal((5, 4))
    pred_before, target_before = pred.copy(), target.copy()
    vjp, _ = make_vjp(lambda p: loss(p, target))(pred)
    first = vjp(np.float64(1.0)).copy()
    second = vjp(np.float64(2.0))
    np.testing.assert_array_equal(second, 2.0 * first)  # the gradient is linear in g; x2 is exact
    d = pred - target
    expected = np.sign(d) / d.size if loss is losses.l1_loss_op else d * (2.0 / d.size)
    np.testing.assert_array_equal(first, expected)
    np.testing.assert_array_equal(pred, pred_before)
    np.testing.assert_array_equal(target, target_before)


def test_the_mse_gradient_keeps_float32() -> None:
    pred = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)
    target = np.ones((3, 4), np.float32)
    vjp, _ = make_vjp(lambda p: losses.mse_loss_op(p, target))(pred)
    assert vjp(np.float32(1.0)).dtype == np.float32


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_l1_computed_in_blocks_agrees_with_the_plain_passes(dtype: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Large arrays take the blocked path (losses._BLOCK_FROM); made small here so that several
    # blocks and a partial last one are exercised on a small array.
    loss = losses.l1_loss_op
    rng = np.random.default_rng(4)
    pred, target = rng.standard_normal((37, 29)).astype(dtype), rng.standard_normal((37, 29)).astype(dtype)
    pred[3, :5] = target[3, :5]  # d = 0 exactly: sign 0, as torch

    def value_and_grad() -> tuple:
        vjp, value = make_vjp(lambda p: loss(p, target))(pred)
        return value, vjp(np.asarray(1.0, dtype))

    plain_value, plain_grad = value_and_grad()
    monkeypatch.setattr(losses, "_BLOCK_FROM", 0)
    monkeypatch.setattr(losses, "_BLOCK_BYTES", 100 * np.dtype(dtype).itemsize)  # 100 elements a block
    assert losses._blockable(pred, target)
    value, grad = value_and_grad()
    np.testing.assert_array_equal(grad, plain_grad)  # elementwise: identical
    assert grad.dtype == np.dtype(dtype) and np.asarray(value).dtype == np.dtype(dtype)
    # the sum is the same sum in another order: within the error bound of either, n * eps
    assert abs(float(value) - float(plain_value)) <= pred.size * np.finfo(dtype).eps * abs(float(plain_value))
    assert not losses._blockable(pred[:, ::2], target[:, ::2])  # strided views take the plain path
