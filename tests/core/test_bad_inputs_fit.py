"""fit checks what the loss gives (once, at the first step), the data callable's result, the
params and steps; a non-finite gradient never hands back NaN params as the "last finite" ones."""

from __future__ import annotations

from typing import Any

import autograd.numpy as anp
import numpy as np
import pytest
from helpers import expect_error

import minilora as ml
from minilora.errors import MiniLoraTypeError, MiniLoraValueError, NonFiniteError


def _regression() -> tuple[Any, dict, tuple]:
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((6, 4)), rng.standard_normal((6, 3))
    base = {"W": rng.standard_normal((3, 4))}
    lora = ml.lora_init(rng, 4, 3, 2)

    def loss(lora: dict, base: dict, x: Any, y: Any) -> Any:
        return ml.mse_loss(ml.lora_dense(base, lora, x), y)

    return loss, lora, (base, x, y)


@pytest.mark.parametrize(("result", "fragment"), [
    (lambda p: 1, "int"),
    (lambda p: None, "NoneType"),
    (lambda p: "x", "str"),
    (lambda p: anp.sum(p["A"] ** 2).reshape(1), "shape (1,)"),
    (lambda p: anp.reshape(anp.sum(p["A"] ** 2), (1, 1)), "shape (1, 1)"),
])
def test_a_loss_that_is_not_a_real_scalar_is_refused(result: Any, fragment: str) -> None:
    params = {"A": np.ones((2, 2))}
    with pytest.warns(UserWarning) if fragment in ("int", "NoneType", "str") else _nothing():
        expect_error(lambda: ml.fit(result, params, steps=2, lr=0.1), MiniLoraTypeError, "loss", fragment)


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")
def test_a_loss_returning_a_matrix_is_refused() -> None:
    def loss(p: Any) -> Any:
        return np.matrix([[1.0]])

    with pytest.warns(UserWarning):  # autograd: the output does not depend on the input
        expect_error(lambda: ml.fit(loss, {"A": np.ones((2, 2))}, steps=1, lr=0.1), MiniLoraTypeError, "loss")


def test_integer_params_are_refused() -> None:
    expect_error(lambda: ml.fit(lambda p: anp.sum(p["A"] ** 2), {"A": np.ones((2, 2), dtype=int)}, steps=2, lr=0.1),
                 MiniLoraTypeError, "params['A']", "int64")


@pytest.mark.parametrize("returned", [[1, 2], None, {"x": 1}, np.ones(3)])
def test_a_data_callable_returning_a_non_tuple_is_refused(returned: Any) -> None:
    loss, lora, _ = _regression()
    expect_error(lambda: ml.fit(loss, lora, lambda step: returned, steps=2, lr=0.1), MiniLoraTypeError,
                 "data_or_args(1)", type(returned).__name__)


def test_a_data_callable_returning_a_list_is_not_used_as_arguments() -> None:
    loss, lora, args = _regression()
    calls = []

    def data(step: int) -> Any:
        calls.append(step)
        return list(args)

    with pytest.raises(MiniLoraTypeError):
        ml.fit(loss, lora, data, steps=3, lr=0.1)
    assert calls == [1]


@pytest.mark.parametrize("steps", [np.int64(2), np.int32(2), np.uint8(2)])
def test_numpy_integer_steps_are_accepted(steps: Any) -> None:
    loss, lora, args = _regression()
    a, la = ml.fit(loss, lora, args, steps=2, lr=0.1)
    b, lb = ml.fit(loss, lora, args, steps=steps, lr=0.1)
    assert la == lb and len(lb) == 2 and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("flag", ["return_state", "amsgrad", "decoupled"])
def test_fit_flags_must_be_bools(flag: str) -> None:
    loss, lora, args = _regression()
    expect_error(lambda: ml.fit(loss, lora, args, steps=1, lr=0.1, **{flag: "no"}), MiniLoraTypeError, flag, "'no'")


# ---------------------------------------------------------------- NonFiniteError.partial


def _sqrt_loss(p: Any) -> Any:
    """sqrt at 0: the loss is finite, the gradient infinite, and Adam's update inf/inf = NaN."""
    return anp.sum(anp.sqrt(p["w"]))


def test_a_non_finite_gradient_leaves_the_last_finite_params_in_partial() -> None:
    params = {"w": np.array([0.0, 1.0])}
    with np.errstate(all="ignore"), pytest.raises(NonFiniteError) as info:
        ml.fit(_sqrt_loss, params, steps=5, lr=0.1)
    p, losses, state = info.value.partial
    assert np.all(np.isfinite(p["w"])), p
    assert np.array_equal(p["w"], params["w"]) and losses == [] and state["step"] == 0
    assert "step 0" in str(info.value)


def test_a_non_finite_gradient_at_the_last_step_is_an_error_not_nan_params() -> None:
    params = {"w": np.array([0.0, 1.0])}
    with np.errstate(all="ignore"), pytest.raises(NonFiniteError) as info:
        ml.fit(_sqrt_loss, params, steps=1, lr=0.1)
    p, losses, state = info.value.partial
    assert np.array_equal(p["w"], params["w"]) and losses == [] and state["step"] == 0
    assert "non-finite" in str(info.value)


def test_a_non_finite_gradient_after_some_finite_steps() -> None:
    # w goes 1, 0.9, 0.8, ... down to 0 under lr 0.1 (Adam's first steps are about lr): the
    # gradient 1/(2 sqrt(w)) is infinite only once w reaches 0 exactly; use w = 0.2 so two
    # finite steps are made, then a negative w gives a NaN loss, whose partial is finite.
    params = {"w": np.array([0.2, 1.0])}
    with np.errstate(all="ignore"), pytest.raises(NonFiniteError) as info:
        ml.fit(_sqrt_loss, params, steps=10, lr=0.1)
    p, losses, state = info.value.partial
    assert np.all(np.isfinite(p["w"])) and len(losses) == state["step"] >= 1
    assert all(np.isfinite(losses))


def test_a_non_finite_loss_keeps_the_current_finite_params() -> None:
    loss, lora, args = _regression()
    base, x, y = args
    with np.errstate(all="ignore"), pytest.raises(NonFiniteError) as info:
        ml.fit(loss, lora, lambda step: (base, x, y if step < 3 else y * np.nan), steps=5, lr=0.1)
    p, losses, state = info.value.partial
    assert len(losses) == 2 and state["step"] == 2 and all(np.all(np.isfinite(v)) for v in p.values())
    assert "step 3" in str(info.value)


def test_steps_zero_returns_the_params_unchanged() -> None:
    loss, lora, args = _regression()
    out, losses = ml.fit(loss, lora, args, steps=0, lr=0.1)
    assert losses == [] and all(np.array_equal(out[k], lora[k]) for k in lora)


def test_bad_steps_values_name_steps() -> None:
    loss, lora, args = _regression()
    for steps in (-1, 2.5, "2", True):
        expect_error(lambda s=steps: ml.fit(loss, lora, args, steps=s, lr=0.1), MiniLoraValueError, "steps")
