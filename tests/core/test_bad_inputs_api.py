"""The public API called with junk (found by fuzzing every public function with None, strings,
lists, dicts, odd numbers, arrays of other dtypes and shapes): each refusal is a MiniLoraError
naming the argument, never NumPy's or autograd's raw error. Last, a bounded hypothesis fuzz of
the same calls: only the library's errors escape."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from helpers import expect_error
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import minilora as ml
from minilora.errors import MiniLoraError, MiniLoraTypeError, MiniLoraValueError

RNG = np.random.default_rng(0)
W = RNG.standard_normal((3, 4))
X = RNG.standard_normal((5, 4))
LORA = {"A": RNG.standard_normal((2, 4)), "B": RNG.standard_normal((3, 2))}


def _sq(p: Any) -> Any:
    return (p["A"] ** 2).sum()


@pytest.mark.parametrize("call", [
    lambda: ml.dense_init(-1, 4, 3),
    lambda: ml.lora_init(-1, 4, 3, 2),
    lambda: ml.dropout_mask(-1, (2,), 0.5),
])
def test_a_negative_int_seed_names_rng(call: Any) -> None:
    expect_error(call, MiniLoraValueError, "rng", ">= 0", "-1")  # was NumPy's 'expected non-negative integer'


@pytest.mark.parametrize("dtype", [{"A": 1}, [1, 2], (1, 2, 3)])
@pytest.mark.parametrize("call", [
    lambda dt: ml.dense_init(0, 4, 3, dtype=dt),
    lambda dt: ml.dropout_mask(0, (2,), 0.5, dtype=dt),
])
def test_a_junk_dtype_names_dtype(call: Any, dtype: Any) -> None:
    expect_error(lambda: call(dtype), MiniLoraTypeError, "dtype must be one of")  # was 'entry not a 2- or 3- tuple'


@pytest.mark.parametrize("reduction", [np.ones(3), ["mean"], None, 1])
def test_a_reduction_that_is_not_a_string_names_reduction(reduction: Any) -> None:
    expect_error(lambda: ml.mse_loss(X, X, reduction=reduction), MiniLoraValueError, "reduction")


@pytest.mark.parametrize("leaf", [None, "x", object()])
def test_to_numpy_names_a_leaf_that_is_not_an_array(leaf: Any) -> None:
    expect_error(lambda: ml.to_numpy({"a": np.ones(2), "b": leaf}), MiniLoraTypeError, "to_numpy",
                 type(leaf).__name__)


@pytest.mark.parametrize(("call", "name"), [
    (lambda: ml.grad(None), "fun"), (lambda: ml.value_and_grad("f"), "fun"), (lambda: ml.hvp(3), "fun"),
    (lambda: ml.fit(None, LORA, steps=1, lr=0.1), "loss_fn"),
])
def test_a_function_argument_that_is_not_callable_is_refused_by_name(call: Any, name: str) -> None:
    expect_error(call, MiniLoraTypeError, f"{name} must be a function")


def test_a_callback_that_is_not_callable_is_refused_before_the_first_step() -> None:
    calls = []

    def loss(p: Any) -> Any:
        calls.append(1)
        return _sq(p)

    expect_error(lambda: ml.fit(loss, LORA, steps=3, lr=0.1, callback="print"), MiniLoraTypeError,
                 "callback must be a function")
    assert calls == []  # it was a TypeError after the first step's work


@pytest.mark.parametrize("make", [ml.grad, ml.value_and_grad])
@pytest.mark.parametrize(("arg", "where"), [(None, "argument 0 "), ({"A": LORA["A"], "B": "x"}, "argument 0['B']"),
                                            ([np.ones(2), None], "argument 0[1]")])
def test_differentiating_something_without_a_vector_space_names_the_leaf(make: Any, arg: Any, where: str) -> None:
    expect_error(lambda: make(lambda p: 1.0)(arg), MiniLoraTypeError, where, "cannot be differentiated")


def test_floats_and_nested_trees_still_differentiate() -> None:
    assert ml.grad(lambda x: x ** 2)(3.0) == 6.0
    g = ml.grad(lambda t: (t[0] ** 2).sum() + t[1]["w"] * 2.0)((np.ones(2), {"w": 1.5}))
    assert np.array_equal(g[0], 2 * np.ones(2)) and g[1]["w"] == 2.0


# ---------------------------------------------------------------- fuzz: only library errors

JUNK = st.sampled_from([
    None, "x", "", "mean", 1, 0, -1, 1.5, float("nan"), float("inf"), True, [], {}, (), [1, 2], {"A": 1},
    np.float64(2), np.int64(2), np.array(1.0), np.ones(3), np.ones((3, 4), np.float32), np.ones((3, 4), np.int64),
    np.ones((3, 4), complex), np.array(["a"]), np.ones((0, 4)), np.ones((3, 4, 1)), np.ones((3, 4), ">f8"),
    W, X, LORA, {"W": W}, {"W": W, "b": np.ones(3)}, {"W": W, "b": "x"}, {"A": LORA["A"]},
    {"A": LORA["A"], "B": "x"}, {**LORA, "C": 1}, (2,), (2, 0), "float32", b"x", object(),
])
CALLS = {
    "dense": lambda a, b, c: ml.dense(a, b, fan_in_fan_out=c),
    "lora_dense": lambda a, b, c: ml.lora_dense(a, b, X, scale=c),
    "lora_dense_x": lambda a, b, c: ml.lora_dense({"W": W}, LORA, a, dropout_mask=b),
    "merge": lambda a, b, c: ml.merge(a, b, scale=c),
    "unmerge": lambda a, b, c: ml.unmerge(a, b, fan_in_fan_out=c),
    "delta_weight": lambda a, b, c: ml.delta_weight(a, scale=b),
    "lora_init": lambda a, b, c: ml.lora_init(0, a, b, c),
    "lora_scale": lambda a, b, c: ml.lora_scale(a, b, rslora=c),
    "dense_init": lambda a, b, c: ml.dense_init(a, b, 3, dtype=c),
    "dropout_mask": lambda a, b, c: ml.dropout_mask(a, b, c),
    "losses": lambda a, b, c: ml.l1_loss(a, b, reduction=c),
    "adam_init": lambda a, b, c: ml.adam_init(a, amsgrad=b),
    "adam_step": lambda a, b, c: ml.adam_step(a, b, c),
    "adam_hyper": lambda a, b, c: ml.adam_step(LORA, LORA, ml.adam_init(LORA), lr=a, betas=b, eps=c),
    "count_params": lambda a, b, c: ml.count_params(a),
    "fit": lambda a, b, c: ml.fit(_sq, LORA, steps=a, lr=b, state=c),
    "fit_params": lambda a, b, c: ml.fit(lambda p, *r: 1.0, a, b, steps=1, lr=0.1, callback=c),
    "grad": lambda a, b, c: ml.grad(_sq, a)(b),
    "to_numpy": lambda a, b, c: ml.to_numpy(a),
}


@settings(max_examples=400, deadline=2000, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(CALLS)), JUNK, JUNK, JUNK)
def test_junk_arguments_raise_only_library_errors(name: str, a: Any, b: Any, c: Any) -> None:
    with np.errstate(all="ignore"):
        try:
            CALLS[name](a, b, c)
        except MiniLoraError:
            pass
