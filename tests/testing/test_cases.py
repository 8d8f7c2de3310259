"""The cases of ``minilora check`` (minilora.testing.cases): the fixed edge cases hold the shapes
where structural bugs hide, every dtype draws its own shapes, the drawn shapes are mostly square
or wider than 1, and the Adam cases reach L2 decay, maximize, every eps, tiny and zero gradients;
in bfloat16 each case can tell an update from none."""

from __future__ import annotations

import math

import numpy as np
import pytest

import minilora as ml
from minilora.testing.adam_tolerance import adam_bounds
from minilora.testing.cases import (
    ADAM_EDGE_CASES,
    EDGE_CASES,
    adam_cases,
    dtype_seed,
    edge_problems,
    layer_problems,
    needed_optimizer_features,
)
from minilora.testing.strategies import EPSILONS

ALL = frozenset({"fan_in_fan_out", "rslora", "dropout", "no_bias"})


def test_the_edge_cases_hold_every_structural_shape() -> None:
    ps = edge_problems("float64", ALL)
    square = [p for p in ps if p.d_in == p.d_out and p.d_in > 1]
    assert any(p.fan_in_fan_out for p in square) and any(not p.fan_in_fan_out for p in square)
    assert any(p.rank == p.d_in < p.d_out for p in ps) and any(p.rank == p.d_out < p.d_in for p in ps)
    assert any(len(p.lead) == 2 and min(p.lead) > 1 for p in ps)
    assert any(math.prod(p.lead) > 16 for p in ps)
    assert any(p.d_in > 16 and all(p.d_in % t for t in (2, 4, 8, 16, 32)) for p in ps)
    assert any(p.d_in >= 1024 for p in ps)
    assert len(ps) == len(EDGE_CASES)


def test_options_an_adapter_lacks_are_switched_off() -> None:
    ps = edge_problems("float32", frozenset())
    assert not any(p.fan_in_fan_out or p.rslora or p.mask is not None or p.b is None for p in ps)


def test_each_dtype_draws_its_own_shapes() -> None:
    seeds = {dtype_seed(s, d) for s in range(10) for d in ("float64", "float32", "float16", "bfloat16")}
    assert len(seeds) == 40
    shapes = {d: [(p.lead, p.d_in, p.d_out, p.rank) for p in layer_problems(d, ALL, 20, 0)]
              for d in ("float64", "float32")}
    assert shapes["float64"] != shapes["float32"]


def test_drawn_shapes_are_square_often_and_one_wide_rarely() -> None:
    ps = [p for s in range(3) for p in layer_problems("float64", ALL, 40, s)]
    square = sum(p.d_in == p.d_out > 1 for p in ps) / len(ps)
    thin = sum(p.d_in == 1 or p.d_out == 1 for p in ps) / len(ps)
    assert square > 0.2 and thin < 0.35, (square, thin)  # it was 0 and 0.5 before the edge cases


def test_adam_cases_cover_every_option() -> None:
    ps = adam_cases("float32", 40, 0)
    need = [set(needed_optimizer_features(p)) for p in ps]
    assert any("l2" in n for n in need) and any("maximize" in n for n in need)
    assert any("amsgrad" in n and "l2" in n for n in need)
    assert {p.options["eps"] for p in ps} >= set(EPSILONS)
    grads = np.concatenate([np.abs(g[k]).ravel() for p in ps for g in p.grads for k in "AB"])
    assert (grads == 0).any() and grads[grads > 0].min() < 1e-7
    assert any(np.all(p.grads[0]["A"] == 0) for p in ps)  # LoRA's first step
    assert len([p for p in ps if p.label.startswith("edge")]) == len(ADAM_EDGE_CASES)


@pytest.mark.parametrize("seed", range(3))
def test_every_bfloat16_adam_case_rejects_no_update(seed: int) -> None:
    """Returning the parameters unchanged fails every bfloat16 case (the update is larger than
    the bound somewhere), so a bfloat16 pass says the update itself was right."""
    for p in adam_cases("bfloat16", 20, seed):
        params = p.params
        state = ml.adam_init(params, amsgrad=p.options["amsgrad"])
        for g in p.grads:
            params, state = ml.adam_step(params, g, state, **p.options)
        bounds = adam_bounds(p.params, list(p.grads), dtype="bfloat16", **p.options)
        seen = any(np.any(np.abs(params[k] - p.params[k]) > bounds[k]) for k in "AB")
        assert seen, p.describe()
