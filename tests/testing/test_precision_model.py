"""The probabilistic bound beside the worst-case one, and the hint when a failure fits a lower
precision than the adapter declared (issue 13, item 3)."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from minilora.errors import MiniLoraValueError
from minilora.testing import dot_bound, gamma, probable_gamma, round_to
from minilora.testing.conformance import check

sys.path.insert(0, str(Path(__file__).parent))
from numpy_adapter import NumpyAdapter  # noqa: E402


def test_probable_gamma_is_the_higham_mary_formula() -> None:
    u, k, f = 2.0**-8, 1024, 1e-9
    lam = math.sqrt(2 * math.log(2 * k / f)) / (1 - u)
    assert probable_gamma(k, "bfloat16", failure=f) == pytest.approx(math.expm1(lam * math.sqrt(k) * u + k * u * u / (1 - u)), rel=1e-15)
    assert probable_gamma(0, "float32") == 0.0
    # sqrt(k) growth: it is below the worst case wherever k u is not tiny, and exists where gamma does not
    assert probable_gamma(200, "bfloat16") < gamma(200, "bfloat16")
    with pytest.raises(MiniLoraValueError):
        gamma(1024, "bfloat16")
    assert math.isfinite(probable_gamma(1024, "bfloat16"))


@pytest.mark.parametrize("bad", [0.0, 1.0, -1e-3, 2.0])
def test_probable_gamma_refuses_a_failure_that_is_not_a_probability(bad: float) -> None:
    with pytest.raises(MiniLoraValueError, match="failure"):
        probable_gamma(10, "float32", failure=bad)


def test_dot_bound_refuses_an_unknown_model_naming_it() -> None:
    with pytest.raises(MiniLoraValueError, match="model must be one of worst, probable"):
        dot_bound(4, 1.0, "float32", model="typical")


def _chained_dot(x: np.ndarray, w: np.ndarray, dtype: str) -> np.ndarray:
    """x @ w with every product and every partial sum rounded to ``dtype`` (no wider accumulator)."""
    acc = np.zeros((x.shape[0], w.shape[1]))
    for k in range(x.shape[1]):
        acc = round_to(acc + round_to(np.outer(x[:, k], w[k]), dtype), dtype)
    return acc


def test_the_probable_bound_holds_for_honest_float16_sums_and_sees_what_the_worst_case_cannot() -> None:
    # float16 sums of 1024 positive terms with no wider accumulator: the worst case allows an error
    # of 2 gamma_1024 M = 2.0 M (k u = 1/2), the probabilistic bound about a quarter of that
    rng = np.random.default_rng(0)
    k = 1024
    x = round_to(np.abs(rng.standard_normal((8, k))), "float16")
    w = round_to(np.abs(rng.standard_normal((k, 8))), "float16")
    exact, M = x @ w, np.abs(x) @ np.abs(w)
    probable, worst = dot_bound(k, M, "float16", model="probable"), dot_bound(k, M, "float16")
    assert np.all(probable < 0.15 * worst)
    assert np.all(np.abs(_chained_dot(x, w, "float16") - exact) <= probable)
    # a sum that drops its last 30% of terms: the worst case passes it, the probable bound does not
    short = x[:, : int(0.7 * k)] @ w[: int(0.7 * k)]
    assert np.all(np.abs(short - exact) <= worst)
    assert np.all(np.abs(short - exact) > probable)


def test_honest_bfloat16_sums_where_no_worst_case_exists_stay_within_the_probable_bound() -> None:
    rng = np.random.default_rng(1)
    k = 512
    x = round_to(rng.standard_normal((8, k)), "bfloat16")
    w = round_to(rng.standard_normal((k, 8)), "bfloat16")
    with pytest.raises(MiniLoraValueError):
        dot_bound(k, 1.0, "bfloat16")
    bound = dot_bound(k, np.abs(x) @ np.abs(w), "bfloat16", model="probable")
    assert np.all(np.abs(_chained_dot(x, w, "bfloat16") - x @ w) <= bound)


class Bf16Throughout(NumpyAdapter):
    """An honest bfloat16 layer (factors and sums in bfloat16 as declared by default): at width
    1024 no worst-case bound exists for it, so its cases are judged on the probabilistic bound."""

    dtypes = ("bfloat16",)


def test_cases_without_a_worst_case_bound_are_judged_on_the_probable_one_and_say_so() -> None:
    report = check(Bf16Throughout(), properties=("forward", "grad_A"), max_examples=2, seed=0)
    rows = {r.property: r for r in report.results}
    for prop in ("forward", "grad_A"):
        row = rows[prop]
        assert row.verdict == "pass", row.message()
        assert row.probable >= 1  # the width-1024 edge case at least
        assert row.to_dict()["probabilistic_bound_cases"] == row.probable
        assert any("probabilistic bound" in c["case"] for c in row.case_results)
    assert "on the probabilistic bound" in report.table()


class StoresGradientsNarrowerThanDeclared(NumpyAdapter):
    """Declares float32 factors and float32 sums under a bfloat16 base (as PEFT does) but hands back
    gradients rounded to bfloat16: a precision lie that fits bfloat16's own bounds."""

    dtypes = ("bfloat16",)
    precision = {"bfloat16": {"adapter": "float32", "accumulate": "float32"}}

    def grads(self, p: Any) -> dict:
        g = super().grads(p)
        return {**g, "A": round_to(g["A"], "bfloat16")}


def test_a_failure_that_fits_the_storage_dtype_hints_at_the_declaration() -> None:
    report = check(StoresGradientsNarrowerThanDeclared(), properties=("grad_A",), max_examples=4, seed=0)
    (row,) = report.results
    assert row.verdict == "FAIL"
    assert row.hint is not None and "fits bfloat16 arithmetic" in row.hint and "declares adapter=float32" in row.hint
    assert "Hint:" in row.message()
    assert row.to_dict()["hint"] == row.hint


class WrongByHalf(StoresGradientsNarrowerThanDeclared):
    """A bug far beyond any bfloat16 rounding (dA 1.5x too large): no precision hint. (A bug
    within bfloat16's bound, dA 2% too large say, gets the hint: it would be a precision lie's
    size, and the hint asks rather than concludes.)"""

    def grads(self, p: Any) -> dict:
        g = NumpyAdapter.grads(self, p)
        return {**g, "A": round_to(g["A"] * 1.5, "float32")}


def test_a_failure_beyond_the_storage_dtype_gets_no_precision_hint() -> None:
    report = check(WrongByHalf(), properties=("grad_A",), max_examples=4, seed=0)
    (row,) = report.results
    assert row.verdict == "FAIL"
    assert row.hint is None


@pytest.mark.compare
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_peft_with_dA_two_percent_off_under_a_half_precision_base_fails(dtype: str) -> None:
    # PEFT keeps lora_A/B in float32 under a half base and says so (its ``precision``): its dA is
    # then held to float32's bound, and a 2% error (which the storage dtype's bound used to hide)
    # fails; the honest PEFT passes the same cases
    from minilora.testing.adapters.peft_adapter import PeftAdapter

    class Peft2PercentOff(PeftAdapter):
        def grads(self, problem: Any) -> dict:
            g = super().grads(problem)
            return {**g, "A": np.asarray(g["A"]) * 1.02}

    kw: dict[str, Any] = dict(dtypes=(dtype,), properties=("grad_A",), max_examples=3, seed=0)
    assert check(PeftAdapter(), **kw).passed
    (row,) = check(Peft2PercentOff(), **kw).results
    assert row.verdict == "FAIL", row.message()
