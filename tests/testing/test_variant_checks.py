"""The DoRA, embedding and trainable-set properties of ``minilora check``: a correct adapter passes
them, a missing method is n/a (never a pass), a wrong answer, a wrong shape or a raise is a failure
row, the DoRA bound holds for an honest float32 computation even where the row norm cancels, and
PEFT, torch and loralib pass them for real while the planted bugs fail."""

from __future__ import annotations

import numpy as np
import numpy_adapter as na
import pytest
from helpers import require

from minilora.errors import MiniLoraValueError
from minilora.testing import compare, round_to
from minilora.testing.adapters import TargetError, load_adapter
from minilora.testing.conformance import check
from minilora.testing.variant_bounds import dora_bounds, dora_factor_error
from minilora.testing.variant_checks import (
    DORA_PROPERTIES,
    EMBEDDING_PROPERTIES,
    VARIANT_PROPERTIES,
    dora_oracle,
    trainable_oracle,
)
from minilora.testing.variant_problems import (
    TrainableProblem,
    dora_cases,
    embedding_cases,
    make_dora_problem,
    trainable_cases,
)

ALL = frozenset({"fan_in_fan_out", "rslora", "dropout", "no_bias"})


def test_a_correct_adapter_passes_every_variant_row() -> None:
    report = check(na.NumpyAdapter, max_examples=5, properties=VARIANT_PROPERTIES)
    assert [(r.property, r.dtype) for r in report.results] == [
        (p, d) for p in VARIANT_PROPERTIES for d in (("any",) if p == "trainable" else ("float64", "float32"))]
    assert all(r.verdict == "pass" and r.cases > 0 for r in report.results), report.failures()
    for r in report.results:  # every numeric row could have seen an error of a few float32 roundings
        if r.property != "trainable":
            assert 0 < r.threshold < (1e-4 if r.dtype == "float32" else 1e-12), (r.property, r.dtype, r.threshold)


def test_missing_variant_methods_are_na_never_pass() -> None:
    report = check(na.NoVariants, max_examples=1, dtypes=["float64"])
    rows = [r for r in report.results if r.property in VARIANT_PROPERTIES]
    assert rows and all(r.verdict == "n/a" and r.cases == 0 for r in rows)
    assert "no dora_forward() method" in report.result("dora_forward", "float64").message()
    assert report.passed  # the plain-LoRA rows pass; n/a is no failure


class DoraWrongShape(na.NumpyAdapter):
    def dora_forward(self, p):  # type: ignore[no-untyped-def]
        return super().dora_forward(p)[..., :-1]


class EmbeddingRaises(na.NumpyAdapter):
    def embedding_grads(self, p):  # type: ignore[no-untyped-def]
        if p.num_embeddings == p.dim:
            raise RuntimeError("square tables are not supported")
        return super().embedding_grads(p)


class MagnitudeGradOff(na.NumpyAdapter):
    def dora_grads(self, p):  # type: ignore[no-untyped-def]
        out = super().dora_grads(p)
        return {**out, "m": out["m"] * 1.001}


class BiasUnderNone(na.NumpyAdapter):
    def trainable(self, p):  # type: ignore[no-untyped-def]
        out = super().trainable(p)
        return out | {f"{n}.b" for n, _, _, b in p.layers if b and n in p.targets}


def test_wrong_answers_shapes_and_raises_are_failure_rows() -> None:
    report = check(DoraWrongShape, max_examples=2, dtypes=["float64"], properties=["dora_forward", "dora_grad_x"])
    row = report.result("dora_forward", "float64")
    assert row.verdict == "FAIL" and row.failed_cases == row.cases and "has shape" in row.message()
    assert report.result("dora_grad_x", "float64").verdict == "pass"

    row = check(EmbeddingRaises, max_examples=2, dtypes=["float32"],
                properties=["embedding_grad_A"]).result("embedding_grad_A", "float32")
    square = sum(p.num_embeddings == p.dim for p in embedding_cases("float32", ALL, 2, 0))
    assert row.verdict == "FAIL" and row.raised == row.failed_cases == square < row.cases
    assert "square tables" in row.message()

    # a magnitude gradient off by 0.1% is 100 times what the float32 bound allows
    row = check(MagnitudeGradOff, max_examples=2, dtypes=["float32"],
                properties=["dora_grad_m"]).result("dora_grad_m", "float32")
    assert row.verdict == "FAIL" and row.failed_cases == row.cases and "dm" in row.message()

    row = check(BiasUnderNone, properties=["trainable"]).result("trainable", "any")
    # bias="none" in the 2 layouts whose LoRA layers have a bias, with and without DoRA
    assert row.verdict == "FAIL" and row.failed_cases == 4
    assert "which PEFT freezes" in row.message() and "fc1.b" in row.message()


def test_variant_declarations_are_validated() -> None:
    class BadFeatures(na.NumpyAdapter):
        dora_features = ("dropuot",)

    class BadDtypes(na.NumpyAdapter):
        variant_dtypes = ("float16",)

    with pytest.raises(TargetError, match=r"dora_features lists unknown names \['dropuot'\]; valid: dropout"):
        load_adapter(BadFeatures)
    with pytest.raises(TargetError, match=r"variant_dtypes lists unknown names \['float16'\]; valid: float64"):
        load_adapter(BadDtypes)


def test_the_problems_exercise_what_the_bugs_hide_behind() -> None:
    for p in dora_cases("float32", ALL, 10, 0):
        n = np.linalg.norm((p.W.T if p.fan_in_fan_out else p.W) + p.scale * p.B @ p.A, axis=1)
        c = p.magnitude / n
        assert np.all(c > 0.45) and np.all(c < 1.55) and np.max(np.abs(c - 1)) > 0.05  # m is off the norm
        assert np.array_equal(p.magnitude, round_to(p.magnitude, "float32"))
    assert any(p.d_in == p.d_out for p in dora_cases("float64", ALL, 0, 0))
    assert any(p.fan_in_fan_out and p.d_in == p.d_out for p in dora_cases("float64", ALL, 0, 0))
    embeddings = embedding_cases("float64", ALL, 5, 1)
    assert all(np.any(p.A != 0) for p in embeddings)
    assert any(len(np.unique(p.ids)) < p.ids.size for p in embeddings)  # repeated ids: dA sums them
    assert any(p.num_embeddings == p.dim for p in embeddings)
    assert len(trainable_cases(dora=True)) == 18 and len(trainable_cases(dora=False)) == 9


def test_the_trainable_oracle_follows_peft_rules() -> None:
    layers = (("fc1", 4, 5, True), ("fc2", 5, 3, False), ("head", 3, 2, True))
    lora = {"fc1.A", "fc1.B", "fc2.A", "fc2.B"}
    assert trainable_oracle(TrainableProblem(layers, ("fc1", "fc2"), "none")) == lora
    assert trainable_oracle(TrainableProblem(layers, ("fc1", "fc2"), "all")) == lora | {"fc1.b", "head.b"}
    assert trainable_oracle(TrainableProblem(layers, ("fc1", "fc2"), "lora_only")) == lora | {"fc1.b"}
    assert trainable_oracle(TrainableProblem(layers, ("fc1", "fc2"), "none", dora=True)) == lora | {"fc1.m", "fc2.m"}


def _float32_dora(p) -> np.ndarray:  # type: ignore[no-untyped-def]
    """DoRA's forward computed in float32 throughout with NumPy (no mask)."""
    f = np.float32
    x, W, A, B, m, b = (np.asarray(a, dtype=f) for a in (p.x, p.W, p.A, p.B, p.magnitude, p.b))
    V = W + f(p.scale) * (B @ A)
    c = m / np.sqrt(np.sum(V * V, axis=1))
    return (c * (x @ W.T + f(p.scale) * ((x @ A.T) @ B.T)) + b).astype(np.float64)


def test_the_dora_bound_holds_where_the_row_norm_cancels() -> None:
    """W's row nearly the negative of s B A's: the norm is computed from a small difference, its
    relative error grows with the condition number, and the bound grows with it."""
    p = make_dora_problem(lead=(3,), d_in=16, d_out=4, rank=2, alpha=2.0, dtype="float32", seed=11)
    W = p.W.copy()
    W[0] = round_to(-(p.scale * p.B @ p.A)[0] * (1 + 2.0**-10), "float32")  # row 0 cancels to 1e-3 of itself
    from dataclasses import replace

    p = replace(p, W=W, magnitude=round_to(np.abs(p.magnitude), "float32"))
    dc = dora_factor_error(p.W, p.A, p.B, scale=p.scale, dtype="float32")
    assert dc[0] > 100 * dc[1:].max()  # the cancelling row is charged for it
    bounds = dora_bounds(p)
    assert compare(_float32_dora(p), dora_oracle(p)["y"], bounds["y"]).passed
    W[0] = -(p.scale * p.B @ p.A)[0]  # exactly zero in float64: no bound exists, refused
    with pytest.raises(MiniLoraValueError, match="no error bound for DoRA's row norm"):
        dora_factor_error(W, p.A, p.B, scale=p.scale, dtype="float32")


def test_an_honest_float32_dora_is_within_its_bounds() -> None:
    for p in dora_cases("float32", frozenset({"rslora"}), 20, 3):
        assert compare(_float32_dora(p), dora_oracle(p)["y"], dora_bounds(p)["y"]).passed, p.describe()


# --------------------------------------------------------------------------- the real frameworks


@pytest.mark.compare
@pytest.mark.parametrize("target", ["torch", "peft", "loralib"])
def test_the_frameworks_pass_the_variant_rows(target: str) -> None:
    require("loralib" if target == "loralib" else "peft" if target == "peft" else "torch")
    report = check(target, max_examples=3, seed=2, properties=VARIANT_PROPERTIES)
    assert not report.failures(), report.failures()
    verdicts = {r.property: r.verdict for r in report.results}
    for prop in DORA_PROPERTIES:
        assert verdicts[prop] == ("n/a" if target == "loralib" else "pass")
    assert all(verdicts[p] == "pass" for p in (*EMBEDDING_PROPERTIES, "trainable"))


@pytest.mark.compare
def test_the_planted_variant_bugs_fail_on_the_edge_cases_alone() -> None:
    """At max_examples=0 (no drawn case at all) every planted variant bug fails every row it
    shows in, in float64 and float32: the fixed cases find them at any seed."""
    require("torch")
    import planted_variants as pv

    for bug, props in pv.VARIANT_BUGS.items():
        report = check(bug, max_examples=0, properties=sorted(props))
        assert {r.property for r in report.results} == props
        missed = [(r.property, r.dtype) for r in report.results if not r.failed]
        assert not missed, (bug.__name__, missed)
    for honest in pv.VARIANT_HONEST:
        report = check(honest, max_examples=10, seed=4, properties=VARIANT_PROPERTIES)
        assert report.passed and not report.failures(), (honest.__name__, report.failures())
