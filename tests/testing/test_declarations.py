"""The declarations the built-in flax and keras targets needed, checked with NumPy adapters alone:
a layer without alpha ("scale" not in features) gets cases with s = 1; ``adam_eps = "hat"`` is
checked against Kingma and Ba's epsilon-hat written out here, and refused with the valid list when
unknown; a narrower adapter or accumulation dtype widens the bounds by what rounding to it costs,
so an honest float32-factor layer passes under a float64 check while an undeclared one fails."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

import minilora as ml
from minilora.testing.adam_tolerance import adam_bounds
from minilora.testing.adapters import ADAM_EPS, FEATURES, TargetError, load_adapter
from minilora.testing.cases import edge_problems, layer_problems
from minilora.testing.conformance import check
from minilora.testing.problems import make_adam_problem, make_problem
from minilora.testing.tolerance import lora_bounds, round_to


def test_a_layer_without_alpha_gets_cases_with_scale_one() -> None:
    features = FEATURES - {"scale"}
    problems = edge_problems("float64", features) + layer_problems("float64", features, 10, 0)
    assert problems and all(p.scale == 1.0 and not p.rslora and p.alpha == p.rank for p in problems)
    with_scale = edge_problems("float64", FEATURES)
    assert any(p.scale != 1.0 for p in with_scale)


class EpsHatAdam:
    """Adam with Kingma and Ba's epsilon-hat (Keras): p -= lr sqrt(1-b2^t)/(1-b1^t) m/(sqrt(v)+eps)."""

    dtypes = ("float64",)
    optimizer_features = frozenset({"amsgrad", "decoupled"})

    def __init__(self, adam_eps: str = "hat") -> None:
        self.adam_eps = adam_eps

    def forward(self, p: Any) -> Any:
        return ml.lora_dense(p.params, p.lora, p.x, scale=p.scale, fan_in_fan_out=p.fan_in_fan_out,
                             dropout_mask=p.mask)

    def grads(self, p: Any) -> dict:
        raise NotImplementedError

    def adam(self, p: Any) -> dict:
        o = p.options
        b1, b2 = o["betas"]
        out = {}
        for k in ("A", "B"):
            q = np.array(p.params[k])
            m, v, vmax = np.zeros_like(q), np.zeros_like(q), np.zeros_like(q)
            for t, g in enumerate(p.grads, start=1):
                if o["decoupled"]:
                    q = q * (1 - o["lr"] * o["weight_decay"])
                m = b1 * m + (1 - b1) * g[k]
                v = b2 * v + (1 - b2) * g[k] ** 2
                vmax = np.maximum(vmax, v)
                alpha = o["lr"] * math.sqrt(1 - b2**t) / (1 - b1**t)
                q = q - alpha * m / (np.sqrt(vmax if o["amsgrad"] else v) + o["eps"])
            out[k] = q
        return out


def test_epsilon_hat_is_checked_as_declared_and_fails_undeclared() -> None:
    declared = check(EpsHatAdam("hat"), properties=["adam"], max_examples=10).result("adam", "float64")
    assert declared.passed and declared.cases >= 5, declared.message()
    undeclared = check(EpsHatAdam("torch"), properties=["adam"], max_examples=10).result("adam", "float64")
    assert not undeclared.passed  # the eps 1e-3 and 1e-6 cases tell the two apart
    assert load_adapter(EpsHatAdam("hat")).adam_eps in ADAM_EPS


def test_an_unknown_adam_eps_is_refused_with_the_valid_list() -> None:
    with pytest.raises(TargetError, match="adam_eps must be one of torch, hat; got 'inside'"):
        load_adapter(EpsHatAdam("inside"))


def test_adam_bounds_take_one_eps_per_step_and_charge_rounded_inputs() -> None:
    p = make_adam_problem(d_in=4, d_out=3, rank=2, steps=4, eps=1e-3, decades=(-4.0, -2.0), seed=3)
    o = {k: v for k, v in p.options.items() if k != "eps"}
    same = adam_bounds(p.params, list(p.grads), dtype="float32", eps=[1e-3] * 4, **o)
    one = adam_bounds(p.params, list(p.grads), dtype="float32", eps=1e-3, **o)
    assert all(np.array_equal(same[k], one[k]) for k in one)
    rounded = adam_bounds(p.params, list(p.grads), dtype="float32", eps=1e-3, inputs="float32", **o)
    assert all(np.all(rounded[k] > one[k]) for k in one)
    with pytest.raises(ValueError, match="one per step"):
        adam_bounds(p.params, list(p.grads), dtype="float32", eps=[1e-3], **o)


class Float32Factors:
    """A float64 layer whose LoRA factors are float32 (as Keras keeps them), declared or not."""

    dtypes = ("float64",)

    def __init__(self, declare: bool) -> None:
        self.precision = {"float64": {"adapter": "float32"}} if declare else {}

    def _lora(self, p: Any) -> dict:
        return {"A": round_to(p.A, "float32"), "B": round_to(p.B, "float32")}

    def forward(self, p: Any) -> Any:
        return ml.lora_dense(p.params, self._lora(p), p.x, scale=p.scale, fan_in_fan_out=p.fan_in_fan_out,
                             dropout_mask=p.mask)

    def grads(self, p: Any) -> dict:
        import autograd.numpy as anp

        def loss(x: Any, lora: dict) -> Any:
            y = ml.lora_dense(p.params, lora, x, scale=p.scale, fan_in_fan_out=p.fan_in_fan_out, dropout_mask=p.mask)
            return anp.sum(y * p.cotangent)

        gx, gl = ml.grad(loss, argnum=(0, 1))(p.x, self._lora(p))
        return {"x": gx, "A": gl["A"], "B": gl["B"]}


def test_a_narrower_adapter_dtype_is_charged_and_required() -> None:
    props = ["forward", "grad_x", "grad_B"]
    honest = check(Float32Factors(True), properties=props, max_examples=6)
    assert honest.passed, honest.failures()
    lying = check(Float32Factors(False), properties=props, max_examples=6)
    assert {r.property for r in lying.results if not r.passed} == set(props)
    p = make_problem(lead=(3,), d_in=6, d_out=4, rank=2, alpha=2.0, seed=5)
    kw: dict[str, Any] = dict(scale=p.scale, dtype="float64", cotangent=p.cotangent)
    plain = lora_bounds(p.params, p.lora, p.x, **kw)
    narrow = lora_bounds(p.params, p.lora, p.x, adapter="float32", **kw)
    assert all(np.all(narrow[k] > plain[k]) for k in ("y", "x", "A", "B", "W"))
    assert np.array_equal(narrow["b"], plain["b"])  # the bias' gradient never meets A or B
    acc = lora_bounds(p.params, p.lora, p.x, accumulate="float32", **kw)
    assert np.all(acc["y"] > 1e6 * plain["y"])  # float32 sums: a float32-sized bound
