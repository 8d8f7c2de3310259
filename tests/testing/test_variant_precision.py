"""The DoRA and embedding rows in float16 / bfloat16: the bounds follow the declared precision
(``variant_bounds``: a wider ``adapter`` dtype is PEFT's mixed precision), an honest mixed-precision
DoRA written in NumPy the way PEFT computes it stays within them (and needs the base-dtype charge
on m), and the built-in torch and peft adapters pass those rows with the thresholds their
declarations imply."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from helpers import require

from minilora.testing import compare, round_to
from minilora.testing.conformance import check
from minilora.testing.tolerance import SAFETY, gamma
from minilora.testing.variant_bounds import dora_bounds, embedding_bounds
from minilora.testing.variant_checks import DORA_PROPERTIES, EMBEDDING_PROPERTIES, dora_oracle
from minilora.testing.variant_problems import dora_cases, embedding_cases

ALL = frozenset({"fan_in_fan_out", "rslora", "dropout", "no_bias"})
HALF = ("float16", "bfloat16")


@pytest.mark.parametrize("dtype", HALF)
def test_a_wider_adapter_dtype_tightens_the_factors_only(dtype: str) -> None:
    for p in dora_cases(dtype, ALL, 4, 1):
        plain = dora_bounds(p, accumulate="float32")
        mixed = dora_bounds(p, accumulate="float32", adapter="float32")
        for key in ("A", "B"):  # float32 chains from exact float32 inputs: float32-sized
            assert np.all(mixed[key] <= 1e-2 * plain[key]), (key, p.describe())
        # m keeps the base dtype's rounding of the base output it reads
        G = np.abs(p.cotangent).reshape(-1, p.d_out)
        Xm = np.abs(p.x if p.mask is None else p.x * p.mask).reshape(-1, p.d_in)
        W = np.abs(p.W.T if p.fan_in_fan_out else p.W)
        b = 0.0 if p.b is None else np.abs(p.b)
        n = np.linalg.norm((p.W.T if p.fan_in_fan_out else p.W) + p.scale * p.B @ p.A, axis=1)
        base_read = np.sum(G * (Xm @ W.T + b), axis=0) / n
        assert np.all(mixed["m"] >= SAFETY * gamma(3, dtype) * base_read)
        assert np.all(mixed["m"] <= plain["m"] * (1 + 1e-9))
        for key in ("y", "x", "W", "y_merged", "W_back"):  # stored in the base dtype: only dc shrinks
            assert np.all(mixed[key] <= plain[key] * (1 + 1e-9)) and np.max(mixed[key] / plain[key]) > 0.05, key
        # an "adapter" dtype no wider than the base (bfloat16 under float16 or bfloat16) declares nothing
        narrow = dora_bounds(p, accumulate="float32", adapter="bfloat16")
        assert all(np.array_equal(plain[k], v) for k, v in narrow.items())
    for e in embedding_cases(dtype, ALL, 3, 1):
        plain = embedding_bounds(e, accumulate="float32")
        mixed = embedding_bounds(e, accumulate="float32", adapter="float32")
        assert all(np.all(mixed[k] <= 1e-2 * plain[k]) for k in ("A", "B"))
        assert all(np.array_equal(mixed[k], plain[k]) for k in ("y", "W", "y_merged"))


def _peft_mixed_dora(p: Any) -> tuple[np.ndarray, np.ndarray]:
    """(y, dm) as PEFT computes them under a float16/bfloat16 base without dropout: the base
    output and its bias subtracted in the base dtype, everything of the adapter in float32."""
    f32 = np.float32
    x, W, A, B = (np.asarray(a, dtype=f32) for a in (p.x, p.W.T if p.fan_in_fan_out else p.W, p.A, p.B))
    b = np.zeros(p.d_out, dtype=f32) if p.b is None else np.asarray(p.b, dtype=f32)
    s = f32(p.scale)
    y0 = round_to(x @ W.T + b, p.dtype).astype(f32)  # the base layer, in the base dtype
    base = round_to(y0 - b, p.dtype).astype(f32)  # result - bias, in the base dtype
    n = np.linalg.norm(W + s * (B @ A), axis=1).astype(f32)
    c = np.asarray(p.magnitude, dtype=f32) / n
    lora = ((x @ A.T) @ B.T) * s
    y = round_to(y0 + ((c - 1) * base + c * lora), p.dtype)
    g = np.asarray(p.cotangent, dtype=f32).reshape(-1, p.d_out)
    dm = np.sum(g * (base + lora).reshape(-1, p.d_out), axis=0) / n
    return y, dm.astype(np.float64)


@pytest.mark.parametrize("dtype", HALF)
def test_an_honest_mixed_precision_dora_meets_its_bounds(dtype: str) -> None:
    seen_base_share = 0.0
    for p in dora_cases(dtype, ALL - {"dropout"}, 30, 5):
        bounds = dora_bounds(p, accumulate="float32", adapter="float32")
        oracle = dora_oracle(p)
        y, dm = _peft_mixed_dora(p)
        assert compare(y, oracle["y"], bounds["y"]).passed, p.describe()
        assert compare(dm, oracle["m"], bounds["m"]).passed, p.describe()
        # the same bound without the base-dtype charge on m: what that charge is for
        pure = dora_bounds(p, dtype="float32", accumulate="float32")["m"]
        seen_base_share = max(seen_base_share, float(np.max(np.abs(dm - oracle["m"]) / pure)))
    assert seen_base_share > 1.0  # a float32-only bound on dm would reject this honest computation


# --------------------------------------------------------------------------- the real frameworks


@pytest.mark.compare
@pytest.mark.parametrize("target", ["torch", "peft"])
def test_the_frameworks_pass_the_half_precision_variant_rows(target: str) -> None:
    require("peft" if target == "peft" else "torch")
    report = check(target, max_examples=3, seed=5, dtypes=list(HALF),
                   properties=[*DORA_PROPERTIES, *EMBEDDING_PROPERTIES])
    assert not report.failures(), report.failures()
    assert {(r.property, r.dtype) for r in report.results} == {
        (prop, dt) for prop in (*DORA_PROPERTIES, *EMBEDDING_PROPERTIES) for dt in HALF}
    assert all(r.verdict == "pass" and r.not_covered == 0 for r in report.results)
    for dt in HALF:
        for prop in ("dora_grad_A", "dora_grad_B", "embedding_grad_A", "embedding_grad_B"):
            threshold = report.result(prop, dt).threshold
            if target == "peft":  # float32 factors declared: a float32-sized threshold
                assert threshold < 1e-4, (prop, dt, threshold)
            else:  # stored in the base dtype
                assert threshold > 1e-3, (prop, dt, threshold)


@pytest.mark.compare
def test_peft_with_a_slightly_wrong_dora_gradient_fails_in_half_precision() -> None:
    """The issue's complaint for LoRA (PEFT with dA scaled by 1.02 passed under its base's bounds),
    for DoRA: with the float32 declaration, dA 0.1% too large fails in float16 and bfloat16."""
    require("peft")
    from minilora.testing.adapters.peft_adapter import PeftAdapter

    class PeftDoraGradAOff(PeftAdapter):
        def dora_grads(self, problem: Any) -> dict:
            out = super().dora_grads(problem)
            return {**out, "A": out["A"] * 1.001}

    report = check(PeftDoraGradAOff, dtypes=list(HALF), properties=["dora_grad_A"], max_examples=2, seed=0)
    assert [r.verdict for r in report.results] == ["FAIL", "FAIL"]


@pytest.mark.compare
def test_a_precision_lie_in_the_variant_rows_earns_the_hint() -> None:
    """A failure within the storage dtype's own bounds gets the precision hint (as the LoRA rows
    do); a wrong formula, whose error no precision explains, does not."""
    require("torch")
    import planted_variants as pv

    report = check(pv.DoraPrecisionLie, dtypes=["float16"], properties=["dora_grad_A"], max_examples=2, seed=1)
    row = report.result("dora_grad_A", "float16")
    assert row.verdict == "FAIL" and row.hint is not None and "declares adapter=float32" in row.hint
    report = check(pv.EmbeddingPrecisionLie, dtypes=["bfloat16"], properties=["embedding_grad_B"], max_examples=2)
    assert report.result("embedding_grad_B", "bfloat16").hint is not None
    row = check(pv.DoraBiasScaled, dtypes=["float16"], properties=["dora_forward"], max_examples=2).result(
        "dora_forward", "float16")
    assert row.verdict == "FAIL" and row.hint is None


@pytest.mark.compare
@pytest.mark.parametrize("dtype", HALF)
def test_peft_keeps_the_dora_factors_and_magnitude_in_float32(dtype: str) -> None:
    """The premise of PeftAdapter's declaration (adapter float32): under a float16/bfloat16 base,
    lora_A, lora_B and lora_magnitude_vector are float32, and the layer's output is in the base dtype."""
    require("peft")
    import torch

    from minilora.testing.adapters.peft_adapter import PeftAdapter

    adapter = PeftAdapter()
    p = dora_cases(dtype, ALL, 0, 0)[0]
    model, layer, params = adapter._dora_model(p)
    assert {k: v.dtype for k, v in params.items()} == {"A": torch.float32, "B": torch.float32, "m": torch.float32}
    assert layer.base_layer.weight.dtype == getattr(torch, dtype)
    assert model(adapter.tensor(p.x, dtype)).dtype == getattr(torch, dtype)
