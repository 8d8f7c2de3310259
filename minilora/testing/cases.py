"""The cases of ``minilora check``: fixed edge cases run at every seed, and seeded hypothesis
draws, each dtype its own (``dtype_seed``), for the layer properties and for Adam.

The fixed cases are chosen to find structural bugs whatever the seed: square layers with d > 1
(where A and B swapped, fan_in_fan_out ignored or a missing transpose keep every shape right),
r = d_in and r = d_out, two lead dimensions, 20 rows, a width of 37 (no tile size) and one
realistic width, 1024. The Adam cases cover L2 decay, amsgrad, maximize, eps in {1e-8, 1e-6,
1e-3} with gradients down to 1e-8, exact zeros and LoRA's first step (dA = 0).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from minilora.testing.problems import DTYPES, AdamProblem, LoraProblem, make_adam_problem, make_problem

__all__ = ["EDGE_CASES", "ADAM_EDGE_CASES", "edge_problems", "dtype_seed", "layer_problems", "adam_cases",
           "needed_optimizer_features"]


# Fixed cases, run at every seed: each is a shape where some structural bug keeps every shape
# right and only the numbers tell (square layers: A and B swapped, fan_in_fan_out ignored, a
# missing transpose; r = d_in or d_out: a factor transposed; many rows and odd widths: tiling).
EDGE_CASES = (
    dict(label="edge: rank 1", lead=(2,), d_in=5, d_out=3, rank=1, alpha=4.0, seed=101),
    dict(label="edge: r = d_in", lead=(3,), d_in=4, d_out=6, rank=4, alpha=8.0, rslora=True,
         fan_in_fan_out=True, bias=False, seed=102),
    dict(label="edge: r = d_out", lead=(3,), d_in=7, d_out=3, rank=3, alpha=6.0, seed=105),
    dict(label="edge: batch of one", lead=(1,), d_in=3, d_out=2, rank=2, alpha=16.0, dropout=0.5, seed=103),
    dict(label="edge: two lead dimensions", lead=(2, 3), d_in=6, d_out=5, rank=3, alpha=3.0, dropout=0.1,
         fan_in_fan_out=True, seed=104),
    dict(label="edge: square", lead=(4,), d_in=6, d_out=6, rank=2, alpha=4.0, seed=106),
    dict(label="edge: square, fan_in_fan_out", lead=(3,), d_in=5, d_out=5, rank=3, alpha=2.0,
         fan_in_fan_out=True, seed=107),
    dict(label="edge: square, rank = d", lead=(2, 2), d_in=4, d_out=4, rank=4, alpha=8.0, rslora=True,
         fan_in_fan_out=True, dropout=0.5, seed=108),
    dict(label="edge: 20 rows", lead=(5, 4), d_in=9, d_out=7, rank=2, alpha=16.0, dropout=0.1, seed=109),
    dict(label="edge: d_in 37 (no tile size)", lead=(3,), d_in=37, d_out=19, rank=5, alpha=10.0,
         fan_in_fan_out=True, seed=110),
    dict(label="edge: width 1024", lead=(2, 4), d_in=1024, d_out=1024, rank=16, alpha=32.0, dropout=0.1,
         seed=111),
)
ADAM_EDGE_CASES: tuple[dict[str, Any], ...] = (
    dict(label="edge: Adam, torch defaults", d_in=4, d_out=3, rank=2, steps=5, lr=1e-3, seed=201),
    dict(label="edge: AdamW, amsgrad", d_in=3, d_out=5, rank=1, steps=6, lr=1e-2, decoupled=True,
         weight_decay=0.1, amsgrad=True, seed=202),
    dict(label="edge: Adam, L2 decay", d_in=5, d_out=4, rank=2, steps=6, lr=1e-1, weight_decay=0.1, seed=203),
    dict(label="edge: Adam, L2 decay, amsgrad", d_in=4, d_out=4, rank=3, steps=5, lr=1e-1, weight_decay=0.1,
         amsgrad=True, betas=(0.5, 0.99), seed=204),
    dict(label="edge: Adam, maximize", d_in=4, d_out=3, rank=2, steps=4, lr=1e-1, maximize=True, seed=205),
    dict(label="edge: AdamW, maximize", d_in=3, d_out=3, rank=2, steps=4, lr=1e-1, decoupled=True,
         weight_decay=0.01, maximize=True, seed=206),
    dict(label="edge: eps 1e-3, small gradients", d_in=4, d_out=4, rank=2, steps=5, lr=1e-1, eps=1e-3,
         decades=(-4.0, -2.0), seed=207),
    dict(label="edge: eps 1e-6, gradients to 1e-8", d_in=5, d_out=3, rank=2, steps=5, lr=1e-1, eps=1e-6,
         decades=(-8.0, -5.0), seed=208),
    dict(label="edge: eps 1e-8, gradients to 1e-8, zeros", d_in=4, d_out=5, rank=2, steps=5, lr=1e-1, eps=1e-8,
         decades=(-8.0, -6.0), zeros=0.25, seed=209),
    dict(label="edge: LoRA's first step (dA = 0)", d_in=6, d_out=4, rank=2, steps=3, lr=1e-1,
         lora_first_step=True, decoupled=True, weight_decay=0.01, seed=210),
)


def _restrict(spec: dict, features: frozenset) -> dict:
    spec = dict(spec)
    if "fan_in_fan_out" not in features:
        spec["fan_in_fan_out"] = False
    if "rslora" not in features:
        spec["rslora"] = False
    if "dropout" not in features:
        spec["dropout"] = None
    if "no_bias" not in features:
        spec["bias"] = True
    if "scale" not in features:  # a layer without alpha: scale 1
        spec["alpha"], spec["rslora"] = float(spec["rank"]), False
    return spec


def edge_problems(dtype: str, features: frozenset = frozenset({"fan_in_fan_out", "rslora", "dropout", "no_bias",
                                                               "scale"})) -> list[LoraProblem]:
    """The fixed edge cases in ``dtype``, with unsupported options switched off."""
    return [make_problem(**_restrict(spec, features), dtype=dtype) for spec in EDGE_CASES]


def dtype_seed(seed: int, dtype: str) -> int:
    """The hypothesis seed of one dtype's cases: each dtype draws its own shapes."""
    return seed * len(DTYPES) + DTYPES.index(dtype)


def layer_problems(dtype: str, features: frozenset, count: int, seed: int) -> list[LoraProblem]:
    from minilora.testing.strategies import lora_problems, relabel, sample

    def fixed(name: str) -> bool | None:
        return None if name in features else False

    strategy = lora_problems(
        [dtype], fan_in_fan_out=fixed("fan_in_fan_out"), rslora=fixed("rslora" if "scale" in features else ""),
        dropout=fixed("dropout"), bias=None if "no_bias" in features else True,
    )
    drawn = sample(strategy, count, dtype_seed(seed, dtype)) if count else []
    if "scale" not in features:  # a layer without alpha: scale 1
        drawn = [replace(p, alpha=float(p.rank)) for p in drawn]
    return [relabel(p, f"hypothesis #{i + 1}") for i, p in enumerate(drawn)]


def adam_cases(dtype: str, count: int, seed: int) -> list[AdamProblem]:
    from minilora.testing.strategies import adam_problems, relabel, sample

    edges = [make_adam_problem(**spec, dtype=dtype) for spec in ADAM_EDGE_CASES]
    if dtype == "bfloat16":  # a step below the parameter's rounding cannot be told from none
        edges = [replace(p, options={**p.options, "lr": max(p.options["lr"], 1e-1)}) for p in edges]
    drawn = sample(adam_problems([dtype]), count, dtype_seed(seed, dtype)) if count else []
    return edges + [relabel(p, f"hypothesis #{i + 1}") for i, p in enumerate(drawn)]


def needed_optimizer_features(p: AdamProblem) -> list[str]:
    """The OPTIMIZER_FEATURES an Adam problem uses."""
    o = p.options
    out = []
    if o.get("amsgrad"):
        out.append("amsgrad")
    if o.get("weight_decay") and not o.get("decoupled"):
        out.append("l2")
    if o.get("decoupled"):
        out.append("decoupled")
    if o.get("maximize"):
        out.append("maximize")
    return out
