"""Adam's state, gradients and hyper-parameters are checked before any arithmetic: a state whose
m, v or v_max lacks (or adds) a leaf of params is refused, never zipped into a shorter result;
dtypes are never promoted; every error is a library error naming the leaf or argument."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from helpers import expect_error

import minilora as ml
from minilora.errors import MiniLoraTypeError, MiniLoraValueError
from minilora.variants import adam_step_lrs


def _params(dtype: str = "float64") -> dict:
    rng = np.random.default_rng(0)
    return {"A": rng.standard_normal((2, 3)).astype(dtype), "B": rng.standard_normal((3, 2)).astype(dtype)}


def _grads(dtype: str = "float64") -> dict:
    return {k: np.full_like(v, 0.5) for k, v in _params(dtype).items()}


# ---------------------------------------------------------------- the state's structure


@pytest.mark.parametrize("key", ["m", "v", "v_max"])
def test_a_state_moment_missing_a_leaf_is_refused(key: str) -> None:
    params = _params()
    state = ml.adam_init(params, amsgrad=True)
    state[key] = {"A": state[key]["A"]}  # "B" dropped: the old zip returned params without "B"
    expect_error(lambda: ml.adam_step(params, _grads(), state, amsgrad=True), MiniLoraValueError,
                 f"state[{key!r}]", "'B'")


@pytest.mark.parametrize("key", ["m", "v", "v_max"])
def test_a_state_moment_with_an_extra_leaf_is_refused(key: str) -> None:
    params = _params()
    state = ml.adam_init(params, amsgrad=True)
    state[key] = {**state[key], "C": np.zeros(3)}
    expect_error(lambda: ml.adam_step(params, _grads(), state, amsgrad=True), MiniLoraValueError,
                 f"state[{key!r}]", "'C'")


def test_fit_refuses_a_state_whose_v_lacks_a_leaf() -> None:
    params = _params()
    state = ml.adam_init(params)
    state["v"] = {"A": state["v"]["A"]}
    loss = lambda p: (p["A"] ** 2).sum() + (p["B"] ** 2).sum()  # noqa: E731
    expect_error(lambda: ml.fit(loss, params, steps=2, lr=0.1, state=state), MiniLoraValueError, "state['v']")


@pytest.mark.parametrize("key", ["m", "v"])
def test_a_state_moment_of_another_shape_is_refused(key: str) -> None:
    params = _params()
    state = ml.adam_init(params)
    state[key] = {**state[key], "A": np.zeros((2, 2))}
    expect_error(lambda: ml.adam_step(params, _grads(), state), MiniLoraValueError,
                 f"state[{key!r}]['A']", "(2, 2)", "(2, 3)")


@pytest.mark.parametrize("key", ["m", "v"])
def test_a_state_moment_of_another_dtype_is_refused(key: str) -> None:
    params = _params()
    state = ml.adam_init(params)
    state[key] = {**state[key], "B": state[key]["B"].astype(np.float32)}
    expect_error(lambda: ml.adam_step(params, _grads(), state), MiniLoraTypeError,
                 f"state[{key!r}]['B']", "float32", "float64")


def test_a_state_moment_leaf_that_is_not_an_array_is_refused() -> None:
    params = _params()
    state = ml.adam_init(params)
    state["m"] = {**state["m"], "A": 0.0}
    expect_error(lambda: ml.adam_step(params, _grads(), state), MiniLoraTypeError, "state['m']['A']", "array")


@pytest.mark.parametrize(("step", "fragment"), [
    (-1, "got -1"), (1.5, "got 1.5"), (True, "got True"), ("x", "got 'x'"), (None, "got None"),
])
def test_a_bad_step_count_is_refused(step: Any, fragment: str) -> None:
    params = _params()
    state = {**ml.adam_init(params), "step": step}
    expect_error(lambda: ml.adam_step(params, _grads(), state), MiniLoraValueError, "state['step']", fragment)


def test_a_numpy_integer_step_is_accepted_like_an_int() -> None:
    params, grads = _params(), _grads()
    state = ml.adam_step(params, grads, ml.adam_init(params))[1]
    a = ml.adam_step(params, grads, state)
    b = ml.adam_step(params, grads, {**state, "step": np.int64(state["step"])})
    assert all(np.array_equal(a[0][k], b[0][k]) for k in params) and b[1]["step"] == 2


def test_a_state_that_is_not_adam_inits_is_refused() -> None:
    expect_error(lambda: ml.adam_step(_params(), _grads(), {"m": {}}), MiniLoraValueError, "state", "adam_init")


# ---------------------------------------------------------------- gradients and params dtypes


def test_float32_params_with_float64_grads_are_refused_not_promoted() -> None:
    params = _params("float32")
    expect_error(lambda: ml.adam_step(params, _grads("float64"), ml.adam_init(params)), MiniLoraTypeError,
                 "grads['A']", "float64", "float32")


@pytest.mark.parametrize("dtype", ["int64", "complex128", "object", "bool"])
def test_grads_of_a_non_float_dtype_are_refused(dtype: str) -> None:
    params = _params()
    grads = {k: np.ones(v.shape).astype(dtype) for k, v in params.items()}
    expect_error(lambda: ml.adam_step(params, grads, ml.adam_init(params)), MiniLoraTypeError, "grads['A']", dtype)


def test_grads_missing_a_leaf_are_refused() -> None:
    params = _params()
    expect_error(lambda: ml.adam_step(params, {"A": _grads()["A"]}, ml.adam_init(params)), MiniLoraValueError,
                 "grads", "'B'")


@pytest.mark.parametrize("dtype", ["int64", "complex128", "object"])
def test_params_of_a_non_float_dtype_are_refused(dtype: str) -> None:
    good = _params()
    bad = {**good, "B": good["B"].astype(dtype)}
    state = ml.adam_init(good)
    expect_error(lambda: ml.adam_step(bad, _grads(), state), MiniLoraTypeError, "params['B']", dtype)


@pytest.mark.parametrize("dtype", ["int64", "int8", "object", "complex64", "bool"])
def test_adam_init_refuses_non_float_arrays(dtype: str) -> None:
    expect_error(lambda: ml.adam_init({"A": np.ones((2, 2)).astype(dtype)}), MiniLoraTypeError, "params['A']", dtype)


def test_adam_init_refuses_a_leaf_that_is_not_an_array() -> None:
    expect_error(lambda: ml.adam_init({"layer": [np.ones(2), "w"]}), MiniLoraTypeError, "params['layer'][1]", "str")


def test_nested_trees_are_checked_leaf_by_leaf() -> None:
    params = {"layer": [np.ones(2), {"A": np.ones((2, 2))}]}
    state = ml.adam_init(params)
    state["v"] = {"layer": [np.zeros(2), {}]}
    expect_error(lambda: ml.adam_step(params, ml.adam_init(params)["m"], state), MiniLoraValueError,
                 "state['v']", "['layer'][1]['A']")


# ---------------------------------------------------------------- hyper-parameters (torch.optim.Adam's checks)

BAD_HYPER = [
    ({"lr": -1e-3}, MiniLoraValueError, "lr"),
    ({"lr": True}, MiniLoraTypeError, "lr"),
    ({"lr": "0.1"}, MiniLoraTypeError, "lr"),
    ({"lr": float("nan")}, MiniLoraValueError, "lr"),
    ({"lr": None}, MiniLoraTypeError, "lr"),
    ({"eps": -1.0}, MiniLoraValueError, "eps"),
    ({"eps": False}, MiniLoraTypeError, "eps"),
    ({"weight_decay": -0.1}, MiniLoraValueError, "weight_decay"),
    ({"weight_decay": True}, MiniLoraTypeError, "weight_decay"),
    ({"betas": (1.0, 0.999)}, MiniLoraValueError, "betas[0]"),
    ({"betas": (0.9, -0.1)}, MiniLoraValueError, "betas[1]"),
    ({"betas": (True, 0.999)}, MiniLoraTypeError, "betas[0]"),
    ({"betas": 0.9}, MiniLoraValueError, "betas"),
    ({"betas": (0.9, 0.99, 0.9)}, MiniLoraValueError, "betas"),
    ({"betas": "ab"}, MiniLoraValueError, "betas"),
    ({"decoupled": "no"}, MiniLoraTypeError, "decoupled"),
    ({"amsgrad": "no"}, MiniLoraTypeError, "amsgrad"),
    ({"maximize": 1}, MiniLoraTypeError, "maximize"),
]


@pytest.mark.parametrize(("kwargs", "kind", "name"), BAD_HYPER)
def test_bad_hyper_parameters_are_refused(kwargs: dict, kind: type, name: str) -> None:
    params = _params()
    expect_error(lambda: ml.adam_step(params, _grads(), ml.adam_init(params, amsgrad=True), **kwargs), kind, name)


@pytest.mark.parametrize(("kwargs", "kind", "name"), [h for h in BAD_HYPER if "maximize" not in h[0]])
def test_fit_refuses_the_same_hyper_parameters(kwargs: dict, kind: type, name: str) -> None:
    kwargs = {"lr": 0.1, **kwargs}  # (fit has no maximize: it minimises the loss)
    loss = lambda p: (p["A"] ** 2).sum()  # noqa: E731
    expect_error(lambda: ml.fit(loss, _params(), steps=1, **kwargs), kind, name)


def test_numpy_numbers_and_bools_are_accepted_as_hyper_parameters() -> None:
    params, grads = _params(), _grads()
    a = ml.adam_step(params, grads, ml.adam_init(params), lr=0.01, betas=(0.9, 0.99), decoupled=True,
                     weight_decay=0.1)
    b = ml.adam_step(params, grads, ml.adam_init(params), lr=np.float64(0.01), betas=[np.float32(0.9), 0.99],
                     decoupled=np.bool_(True), weight_decay=np.float64(0.1))
    assert all(np.array_equal(a[0][k], b[0][k]) for k in params)


def test_loraplus_adam_checks_the_same_state_and_flags() -> None:
    params = _params()
    lrs = {"A": 0.1, "B": 0.2}
    state = ml.adam_init(params)
    state["v"] = {"A": state["v"]["A"]}
    expect_error(lambda: adam_step_lrs(params, _grads(), state, lrs=lrs), MiniLoraValueError, "state['v']")
    expect_error(lambda: adam_step_lrs(params, _grads(), ml.adam_init(params), lrs=lrs, amsgrad="no"),
                 MiniLoraTypeError, "amsgrad")
    expect_error(lambda: adam_step_lrs(params, _grads("float32"), ml.adam_init(params), lrs=lrs),
                 MiniLoraTypeError, "grads['A']")
