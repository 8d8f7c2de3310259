"""The tolerance model of minilora.testing: it holds for honest arithmetic (minilora in float32
and float16 against itself in float64, plain dot products, Adam) and fails for the classic LoRA
bugs (a wrong scale, a transposed B, a dropped bias, a lost dropout mask, Adam without bias
correction). assert_lora_close says where and by how much."""

from __future__ import annotations

import math
import re
from typing import Any

import autograd.numpy as anp
import numpy as np
import pytest
from helpers import require
from hypothesis import assume, example, given
from hypothesis import strategies as st

import minilora as ml
from minilora.errors import MiniLoraTypeError, MiniLoraValueError
from minilora.testing import (
    SAFETY,
    UNIT_ROUNDOFF,
    ToleranceError,
    adam_bounds,
    assert_lora_close,
    compare,
    dot_bound,
    dtype_name,
    gamma,
    lora_bounds,
    lora_magnitudes,
    round_to,
    unit_roundoff,
)
from minilora.testing import tolerance as tol
from minilora.testing.strategies import adam_problems, lora_problems, make_adam_problem, make_problem

# --------------------------------------------------------------------------- the constants


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16"])
def test_unit_roundoff_is_half_the_machine_epsilon(dtype: str) -> None:
    assert unit_roundoff(dtype) == np.finfo(dtype).eps / 2
    assert unit_roundoff(np.dtype(dtype)) == unit_roundoff(np.zeros(1, dtype)) == unit_roundoff(dtype)


def test_bfloat16_unit_roundoff_from_its_rounding() -> None:
    u = unit_roundoff("bfloat16")
    # 1 + u is a tie between 1 and the next bfloat16 (ties to even: 1); 1 + 2u is representable
    assert round_to(1 + u, "bfloat16") == 1.0
    assert round_to(1 + 2 * u, "bfloat16") == 1 + 2 * u
    assert round_to(1 + 1.5 * u, "bfloat16") == 1 + 2 * u


@pytest.mark.compare
def test_bfloat16_matches_torch() -> None:
    torch = require("torch")
    assert unit_roundoff(torch.bfloat16) == torch.finfo(torch.bfloat16).eps / 2
    assert dtype_name(torch.float16) == "float16" and dtype_name(torch.float64) == "float64"
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.standard_normal(2000) * 10.0 ** rng.uniform(-30, 30, 2000),
                             1 + np.arange(-64, 64) * 2.0**-9,  # ties and near-ties around 1
                             [0.0, -0.0, np.inf, -np.inf, 3.4e38, 2.0**-130]])
    expected = torch.from_numpy(values).to(torch.bfloat16).to(torch.float64).numpy()
    np.testing.assert_array_equal(round_to(values, "bfloat16"), expected)


def test_dtype_name_refuses_other_types() -> None:
    with pytest.raises(ml.MiniLoraTypeError, match="float64, float32, float16, bfloat16"):
        dtype_name("int32")
    with pytest.raises(ml.MiniLoraTypeError):
        unit_roundoff(np.zeros(2, dtype=np.int64))


@pytest.mark.parametrize("k", [0, 1, 7, 100])
@pytest.mark.parametrize("dtype", list(UNIT_ROUNDOFF))
def test_gamma_formula(k: int, dtype: str) -> None:
    u = UNIT_ROUNDOFF[dtype]
    if k * u >= 1:
        return
    assert gamma(k, dtype) == pytest.approx(k * u / (1 - k * u), rel=1e-15)
    assert gamma(k, dtype) >= k * u


def test_gamma_refuses_a_meaningless_bound() -> None:
    with pytest.raises(ml.MiniLoraValueError, match="256 chained roundings in bfloat16"):
        gamma(256, "bfloat16")  # 256 * 2^-8 = 1
    # accumulating in float32 and storing in bfloat16 has a bound again
    bound = dot_bound(256, np.ones(1), "bfloat16", accumulate="float32")
    # one rounding of bfloat16 per stored intermediate (one by default)
    assert bound[0] == pytest.approx(SAFETY * (gamma(256, "float32") + gamma(1, "bfloat16")) + SAFETY * 256 * 2.0**-149
                                     + SAFETY * 2.0**-133)
    five = dot_bound(256, np.ones(1), "bfloat16", accumulate="float32", stores=5)
    assert five[0] > 4.9 * gamma(1, "bfloat16") * SAFETY


# --------------------------------------------------------------------------- dot products


@given(n=st.integers(1, 300), seed=st.integers(0, 2**32 - 1), dtype=st.sampled_from(["float32", "float16"]))
def test_dot_bound_holds_for_sequential_sums(n: int, seed: int, dtype: str) -> None:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n).astype(dtype)
    w = rng.standard_normal(n).astype(dtype)
    acc = np.zeros((), dtype)
    for xi, wi in zip(x, w, strict=True):  # the worst order for rounding: one long chain
        acc = (acc + xi * wi).astype(dtype)
    exact = math.fsum(float(a) * float(b) for a, b in zip(x, w, strict=True))  # exact products, one rounding
    magnitude = float(np.abs(x.astype(float)) @ np.abs(w.astype(float)))
    assert abs(float(acc) - exact) <= dot_bound(n, magnitude, dtype, safety=1.0)


# --------------------------------------------------------------------------- minilora vs itself


def _cast(a: Any, dtype: str) -> Any:
    return None if a is None else np.asarray(a, dtype=dtype)


def _in_dtype(p: Any) -> tuple[dict, dict, Any, Any, Any]:
    d = p.dtype
    params = {"W": _cast(p.W, d)}
    if p.b is not None:
        params["b"] = _cast(p.b, d)
    return params, {"A": _cast(p.A, d), "B": _cast(p.B, d)}, _cast(p.x, d), _cast(p.mask, d), _cast(p.cotangent, d)


def _outputs(p: Any, params: dict, lora: dict, x: Any, mask: Any, g: Any) -> dict:
    kw = dict(scale=p.scale, fan_in_fan_out=p.fan_in_fan_out)

    def loss(x: Any, lo: dict) -> Any:
        return anp.sum(ml.lora_dense(params, lo, x, dropout_mask=mask, **kw) * g)

    gx, gl = ml.grad(loss, argnum=(0, 1))(x, lora)
    merged = ml.merge(params, lora, **kw)
    return {"y": ml.lora_dense(params, lora, x, dropout_mask=mask, **kw), "x": gx, "A": gl["A"], "B": gl["B"],
            "W": merged["W"], "W_back": ml.unmerge(merged, lora, **kw)["W"]}


SHAPES_OF_EVERY_KIND = make_problem(lead=(2, 3), d_in=7, d_out=5, rank=5, dtype="float32", alpha=3.0, rslora=True,
                                    fan_in_fan_out=True, dropout=0.5, seed=9)


@given(problem=lora_problems(["float32", "float16"]))
@example(problem=SHAPES_OF_EVERY_KIND)
def test_minilora_in_low_precision_stays_within_the_bound(problem: Any) -> None:
    with ml.use_backend("numpy"):
        low = _outputs(problem, *_in_dtype(problem))
        exact = _outputs(problem, problem.params, problem.lora, problem.x, problem.mask, problem.cotangent)
    bounds = lora_bounds(problem.params, problem.lora, problem.x, scale=problem.scale, dtype=problem.dtype,
                         fan_in_fan_out=problem.fan_in_fan_out, dropout_mask=problem.mask,
                         cotangent=problem.cotangent)
    assert low["y"].dtype == np.dtype(problem.dtype)  # really computed in the low precision
    for key, value in low.items():
        expected = problem.W if key == "W_back" else exact[key]
        assert_lora_close(value, expected, bound=bounds[key], dtype=problem.dtype, name=key)


def test_the_bound_is_not_vacuous() -> None:
    """Over fixed random cases the worst float32 error reaches a sizeable share of its bound:
    the model is at most ~100x looser than what honest arithmetic actually does."""
    worst = {}
    with ml.use_backend("numpy"):
        for seed in range(60):
            rng = np.random.default_rng(seed)
            d_in, d_out = (int(v) for v in rng.integers(2, 13, 2))
            p = make_problem(lead=(int(rng.integers(1, 5)),), d_in=d_in, d_out=d_out,
                             rank=int(rng.integers(1, min(d_in, d_out) + 1)), dtype="float32", alpha=4.0,
                             dropout=0.5 if seed % 2 else None, seed=seed)
            low = _outputs(p, *_in_dtype(p))
            exact = _outputs(p, p.params, p.lora, p.x, p.mask, p.cotangent)
            bounds = lora_bounds(p.params, p.lora, p.x, scale=p.scale, dtype="float32", dropout_mask=p.mask,
                                 cotangent=p.cotangent)
            for key in ("y", "x", "A", "B", "W"):
                worst[key] = max(worst.get(key, 0.0), compare(low[key], exact[key], bounds[key]).ratio)
    for key, ratio in worst.items():
        assert 0.01 < ratio <= 1.0, (key, ratio)


# --------------------------------------------------------------------------- wrong implementations


def _correct(p: Any) -> np.ndarray:
    return ml.lora_dense(p.params, p.lora, p.x, scale=p.scale, fan_in_fan_out=p.fan_in_fan_out,
                         dropout_mask=p.mask)


def _buggy(bug: str, p: Any) -> np.ndarray:
    """A float32 LoRA forward with one classic bug."""
    params, lora, x, mask, _ = _in_dtype(p)
    scale, fif = p.scale, p.fan_in_fan_out
    if bug == "alpha_not_divided_by_r":
        scale = p.alpha
    elif bug == "scale_off_by_a_thousandth":
        scale = p.scale * (1 + 2.0**-10)
    elif bug == "transposed_B":
        lora = {"A": lora["A"], "B": lora["B"].T}
    elif bug == "dropped_bias":
        params = {"W": params["W"]}
    elif bug == "mask_ignored":
        mask = None
    elif bug == "W_not_transposed":  # fan_in_fan_out ignored on a square W
        fif = not fif
    return ml.lora_dense(params, lora, x, scale=scale, fan_in_fan_out=fif, dropout_mask=mask)


def _applies(bug: str, p: Any) -> bool:
    return {
        "alpha_not_divided_by_r": p.rank > 1 and not p.rslora,
        "scale_off_by_a_thousandth": True,
        "transposed_B": p.d_out == p.rank > 1,
        "dropped_bias": p.b is not None,
        "mask_ignored": p.mask is not None,
        "W_not_transposed": p.d_in == p.d_out > 1,
    }[bug]


BUGS = ["alpha_not_divided_by_r", "scale_off_by_a_thousandth", "transposed_B", "dropped_bias", "mask_ignored",
        "W_not_transposed"]
# one problem where every bug applies: square W and B, bias, mask, rank > 1
EVERY_BUG_APPLIES = make_problem(lead=(3,), d_in=4, d_out=4, rank=4, dtype="float32", alpha=8.0, dropout=0.5,
                                 seed=5)


@st.composite
def problems_for(draw: Any, bug: str) -> Any:
    """float32 problems on which ``bug`` changes the result: the shapes and options it needs."""
    d_in = draw(st.integers(2, 6))
    d_out = d_in if bug == "W_not_transposed" else draw(st.integers(2, d_in if bug == "transposed_B" else 6))
    low = 2 if bug == "alpha_not_divided_by_r" else 1
    rank = d_out if bug == "transposed_B" else draw(st.integers(low, max(low, min(d_in, d_out))))
    dropout = draw(st.sampled_from([0.1, 0.5, 0.9]) if bug == "mask_ignored" else st.none() | st.just(0.5))
    return make_problem(
        lead=tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=2))), d_in=d_in, d_out=d_out,
        rank=rank, dtype="float32", alpha=draw(st.sampled_from([1.0, 3.0, 8.0, -2.0])),
        rslora=bug != "alpha_not_divided_by_r" and draw(st.booleans()), fan_in_fan_out=draw(st.booleans()),
        bias=bug == "dropped_bias" or draw(st.booleans()), dropout=dropout, seed=draw(st.integers(0, 2**32 - 1)),
    )


@pytest.mark.parametrize("bug", BUGS)
@given(data=st.data())
def test_the_bound_catches_wrong_implementations(bug: str, data: Any) -> None:
    """Whenever a bug moves some output by more than 1e-4 of that output's magnitude (some
    50x what float32 rounding may do at these sizes; a bug that changes nothing can be seen by
    no test), the float32 bound flags it, down to a scale wrong in its 10th bit."""
    problem = data.draw(problems_for(bug), label="problem")
    assert _applies(bug, problem)
    with ml.use_backend("numpy"):
        right = _correct(problem)
        wrong = _buggy(bug, problem)
    (k, magnitude) = lora_magnitudes(problem.params, problem.lora, problem.x, scale=problem.scale,
                                     fan_in_fan_out=problem.fan_in_fan_out, dropout_mask=problem.mask)["y"]
    effect = np.abs(np.asarray(wrong, dtype=np.float64) - right) - 2 * dot_bound(k, magnitude, "float32", safety=1)
    assume(np.any(effect > 1e-4 * magnitude))
    bounds = lora_bounds(problem.params, problem.lora, problem.x, scale=problem.scale, dtype="float32",
                         fan_in_fan_out=problem.fan_in_fan_out, dropout_mask=problem.mask)
    with pytest.raises(ToleranceError):
        assert_lora_close(wrong, right, bound=bounds["y"], dtype="float32")


@pytest.mark.parametrize("bug", BUGS)
def test_each_bug_is_caught_on_a_plain_problem(bug: str) -> None:
    p = EVERY_BUG_APPLIES
    assert _applies(bug, p)
    with ml.use_backend("numpy"):
        right, wrong = _correct(p), _buggy(bug, p)
    bounds = lora_bounds(p.params, p.lora, p.x, scale=p.scale, dtype="float32", dropout_mask=p.mask)
    result = compare(wrong, right, bounds["y"])
    assert not result.passed and result.ratio > 100, (bug, result)


# --------------------------------------------------------------------------- Adam


def _adam(p: Any, params: dict, grads: list, **override: Any) -> dict:
    options = {**p.options, **override}
    bias_correction = options.pop("bias_correction", True)
    if not bias_correction:  # the bug: lr used as is, v not corrected
        b1, b2 = options["betas"]
        m = {k: np.zeros_like(v) for k, v in params.items()}
        v = {k: np.zeros_like(a) for k, a in params.items()}
        for g in grads:
            for k in params:
                m[k] = b1 * m[k] + (1 - b1) * g[k]
                v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
                params = {**params, k: params[k] - options["lr"] * m[k] / (np.sqrt(v[k]) + options["eps"])}
        return params
    state = ml.adam_init(params, amsgrad=options["amsgrad"])
    for g in grads:
        params, state = ml.adam_step(params, g, state, **options)
    return params


L2_DECAY = make_adam_problem(d_in=5, d_out=4, rank=3, steps=8, dtype="float32", weight_decay=0.01, seed=3)


@given(problem=adam_problems(["float32"]))
@example(problem=L2_DECAY)
def test_adam_in_float32_stays_within_its_bound(problem: Any) -> None:
    with ml.use_backend("numpy"):
        low = _adam(problem, {k: v.astype(np.float32) for k, v in problem.params.items()},
                    [{k: v.astype(np.float32) for k, v in g.items()} for g in problem.grads])
        exact = _adam(problem, problem.params, list(problem.grads))
    bounds = adam_bounds(problem.params, list(problem.grads), dtype="float32", **problem.options)
    for k in ("A", "B"):
        assert low[k].dtype == np.float32
        assert_lora_close(low[k], exact[k], bound=bounds[k], dtype="float32", name=k)


@pytest.mark.parametrize("steps", [1, 5])
def test_adam_bound_catches_a_missing_bias_correction(steps: int) -> None:
    p = make_adam_problem(d_in=4, d_out=3, rank=2, steps=steps, dtype="float32", lr=1e-2, seed=11)
    with ml.use_backend("numpy"):
        wrong = _adam(p, p.params, list(p.grads), bias_correction=False)
        right = _adam(p, p.params, list(p.grads))
    bounds = adam_bounds(p.params, list(p.grads), dtype="float32", **p.options)
    assert not compare(wrong["A"], right["A"], bounds["A"]).passed


# --------------------------------------------------------------------------- assert_lora_close


def test_assert_lora_close_names_the_worst_element() -> None:
    expected = np.arange(12.0).reshape(3, 4)
    actual = expected.copy()
    actual[1, 2] += 0.5
    actual[2, 0] += 0.01
    bound = np.full_like(expected, 1e-3)
    with pytest.raises(ToleranceError) as info:
        assert_lora_close(actual, expected, bound=bound, dtype="float32")
    text = str(info.value)
    assert "y[1, 2]" in text and "2 of 12 elements exceed the bound" in text
    assert f"got {float(actual[1, 2])!r}, expected {float(expected[1, 2])!r}" in text
    assert re.search(r"error 0\.5 > bound 0\.001 \(500x the bound\)", text), text
    assert "float32" in text
    within = assert_lora_close(expected + 5e-4, expected, bound=bound, name="W")
    assert within.passed and within.ratio == pytest.approx(0.5)


def test_assert_lora_close_builds_the_bound_from_k_and_magnitude() -> None:
    M = np.array([1.0, 10.0])
    b = dot_bound(10, M, "float32") + dot_bound(10, M, "float64")
    assert_lora_close(M + 0.9 * b, M, dtype="float32", k=10, magnitude=M)
    with pytest.raises(ToleranceError, match=r"y\[1\]"):
        assert_lora_close(M + [0.0, 1.1 * b[1]], M, dtype="float32", k=10, magnitude=M)
    with pytest.raises(ml.MiniLoraValueError, match="needs bound="):
        assert_lora_close(M, M)


@pytest.mark.parametrize(("actual", "expected", "passes"), [
    ([np.nan, 1.0], [np.nan, 1.0], True),
    ([np.nan, 1.0], [0.0, 1.0], False),
    ([np.inf, 1.0], [np.inf, 1.0], True),
    ([np.inf, 1.0], [-np.inf, 1.0], False),
    ([1.0, 2.0], [1.0, 2.0 + 1e-20], True),
])
def test_compare_handles_non_finite_values(actual: list, expected: list, passes: bool) -> None:
    assert compare(actual, expected, 1e-12).passed is passes


def test_compare_reports_a_shape_mismatch() -> None:
    result = compare(np.zeros((2, 3)), np.zeros((3, 2)), 1.0, name="dA")
    assert not result.passed and "has shape (2, 3); expected (3, 2)" in result.describe()
    with pytest.raises(ToleranceError, match="dA: has shape"):
        assert_lora_close(np.zeros((2, 3)), np.zeros((3, 2)), bound=1.0, name="dA")


def test_zero_bound_needs_exact_equality() -> None:
    assert compare(np.zeros(3), np.zeros(3), 0.0).passed
    r = compare(np.array([0.0, 1e-300, 0.0]), np.zeros(3), 0.0, name="B")
    assert not r.passed and r.index == (1,) and math.isinf(r.ratio) and "infinitely" in r.describe()


# --------------------------------------------------------------------------- the strategies


@given(problem=lora_problems())
def test_problems_are_exact_in_their_dtype_and_well_scaled(problem: Any) -> None:
    p = problem
    arrays = {"x": p.x, "W": p.W, "A": p.A, "B": p.B, "g": p.cotangent, "b": p.b, "mask": p.mask}
    for name, a in arrays.items():
        if a is None:
            continue
        assert a.dtype == np.float64
        np.testing.assert_array_equal(round_to(a, p.dtype), a, err_msg=name)  # nothing left to round
        if name != "mask":
            nonzero = np.abs(a[a != 0])
            assert np.all(nonzero >= 2.0**-8) and np.all(nonzero <= 8.0), name  # no subnormal, no overflow
    assert p.A.shape == (p.rank, p.d_in) and p.B.shape == (p.d_out, p.rank) and 1 <= p.rank <= min(p.d_in, p.d_out)
    assert p.W.shape == ((p.d_in, p.d_out) if p.fan_in_fan_out else (p.d_out, p.d_in))
    assert p.cotangent.shape == (*p.lead, p.d_out) and p.x.shape == (*p.lead, p.d_in)
    if p.mask is not None:
        keep = float(round_to(1 / (1 - p.dropout), p.dtype)) if p.dropout < 1 else 0.0
        assert set(np.unique(p.mask)) <= {0.0, keep}
    assert p.scale == ml.lora_scale(p.alpha, p.rank, rslora=p.rslora)
    assert p.describe()


def test_strategies_reach_the_edge_cases() -> None:
    from minilora.testing.strategies import lora_shapes, sample

    shapes = sample(lora_shapes(max_dim=6), 60, 0)
    assert any(s["rank"] == 1 for s in shapes)
    assert any(s["rank"] == min(s["d_in"], s["d_out"]) > 1 for s in shapes)
    assert any(s["lead"] == (1,) for s in shapes)
    assert any(len(s["lead"]) == 2 for s in shapes)
    problems = sample(lora_problems(), 60, 1)
    assert {p.dtype for p in problems} == set(UNIT_ROUNDOFF)
    assert any(p.rslora for p in problems) and any(p.fan_in_fan_out for p in problems)
    assert any(p.mask is not None for p in problems) and any(p.b is None for p in problems)
    # the same seed gives the same problems
    again = sample(lora_problems(), 60, 1)
    assert [p.describe() for p in again] == [p.describe() for p in problems]
    assert all(np.array_equal(p.x, q.x) for p, q in zip(again, problems, strict=True))


@given(data=st.data(), dtype=st.sampled_from(list(UNIT_ROUNDOFF)))
def test_element_strategies(data: Any, dtype: str) -> None:
    from minilora.testing.strategies import dropout_masks, well_scaled_arrays

    a = data.draw(well_scaled_arrays((3, 4), dtype))
    assert a.shape == (3, 4)
    np.testing.assert_array_equal(round_to(a, dtype), a)
    assert np.all((a == 0) | ((np.abs(a) >= 2.0**-8) & (np.abs(a) <= 8.0)))
    p = data.draw(st.sampled_from([0.1, 0.5, 1.0]))
    mask = data.draw(dropout_masks((2, 5), p, dtype))
    keep = float(round_to(1 / (1 - p), dtype)) if p < 1 else 0.0
    assert set(np.unique(mask)) <= {0.0, keep}


@pytest.mark.parametrize(("call", "error", "names"), [
    (lambda: tol.gamma("x", "float32"), MiniLoraValueError, "k must be a non-negative integer"),
    (lambda: tol.gamma(1.5, "float32"), MiniLoraValueError, "k must be a non-negative integer"),
    (lambda: tol.gamma(True, "float32"), MiniLoraValueError, "k must be a non-negative integer"),
    (lambda: tol.gamma(3, None), MiniLoraTypeError, "dtype must be one of"),
    (lambda: tol.probable_gamma(3, "float32", None), MiniLoraTypeError, "failure must be a real number"),
    (lambda: tol.probable_gamma(3, "float32", 2.0), MiniLoraValueError, "failure must be < 1.0"),
    (lambda: tol.dot_bound(3, "abc", "float32"), MiniLoraTypeError, "magnitude must be real numbers"),
    (lambda: tol.dot_bound(3, 1.0, "float32", stores=-1), MiniLoraValueError, "stores must be a non-negative"),
    (lambda: tol.dot_bound(3, 1.0, "float32", safety="2"), MiniLoraTypeError, "safety must be a real number"),
    (lambda: tol.round_to("abc", "float32"), MiniLoraTypeError, "a must be real numbers"),
    (lambda: tol.round_to([1.0, {}], "float16"), MiniLoraTypeError, "a must be real numbers"),
    (lambda: tol.round_to(1.0, "int8"), MiniLoraTypeError, "dtype must be one of"),
])
def test_junk_arguments_are_library_errors_naming_the_argument(call: Any, error: type, names: str) -> None:
    """The bounds' building blocks are public: a junk argument is a library error that names it,
    not NumPy's TypeError/ValueError from deep inside."""
    with pytest.raises(error, match=names):
        call()
