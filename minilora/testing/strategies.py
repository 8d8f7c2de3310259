"""Hypothesis strategies for LoRA problems, for minilora's tests and for yours.

    from hypothesis import given
    from minilora.testing.strategies import lora_problems

    @given(lora_problems(dtypes=["float32"]))
    def test_my_lora(problem):
        y = my_lora(problem.x, problem.W, problem.b, problem.A, problem.B, problem.scale)
        ...

A ``LoraProblem`` holds float64 NumPy arrays whose values are exactly representable in its
``dtype`` (so the implementation under test and the float64 oracle see the same numbers).
Values are well scaled: standard normal, with magnitudes below 2^-8 flushed to zero (never
subnormal) and nothing near overflow, even in float16. The shapes are drawn by hypothesis
(and shrink); the values come from a NumPy generator seeded by hypothesis, which keeps
drawing fast.

This is the only module of minilora that imports hypothesis; the problems themselves (and
``make_problem`` for fixed cases) live in ``minilora.testing.problems``, which needs NumPy only.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from minilora.testing.problems import (
    DTYPES,
    FLUSH,
    LIMIT,
    AdamProblem,
    LoraProblem,
    make_adam_problem,
    make_problem,
    relabel,
)
from minilora.testing.tolerance import round_to

__all__ = [
    "DTYPES",
    "LoraProblem",
    "AdamProblem",
    "dtypes",
    "lora_shapes",
    "shapes_from",
    "well_scaled_floats",
    "well_scaled_arrays",
    "dropout_masks",
    "lora_problems",
    "adam_problems",
    "make_problem",
    "make_adam_problem",
    "sample",
    "relabel",
]

# ---------------------------------------------------------------- building blocks


def dtypes(allowed: Any = DTYPES) -> st.SearchStrategy[str]:
    """One of 'float64', 'float32', 'float16', 'bfloat16' (or of ``allowed``)."""
    return st.sampled_from(tuple(allowed))


def lora_shapes(max_dim: int = 12, max_batch: int = 4, max_lead_dims: int = 2) -> st.SearchStrategy[dict]:
    """{"lead", "d_in", "d_out", "rank"}: sizes uniform in 2..max_dim (1 in one draw of eight),
    a square layer (d_in = d_out) in one of three, rank 1 and rank = min(d_in, d_out) often, and a
    batch of one whenever the lead dimensions shrink. Square layers with d > 1 are where swapped
    A and B, an ignored fan_in_fan_out or a missing transpose keep every shape right."""

    @st.composite
    def draw_shapes(draw: Any) -> dict:
        return shapes_from(np.random.default_rng(draw(st.integers(0, 2**32 - 1))), max_dim, max_batch, max_lead_dims)

    return draw_shapes()


def shapes_from(rng: np.random.Generator, max_dim: int = 12, max_batch: int = 4, max_lead_dims: int = 2) -> dict:
    """``lora_shapes``'s proportions from a NumPy generator (hypothesis favours the ends of its
    ranges and repeats itself; these proportions are what the check relies on)."""

    def size() -> int:
        return 1 if max_dim < 2 or rng.random() < 1 / 8 else int(rng.integers(2, max_dim + 1))

    lead = tuple(int(v) for v in rng.integers(1, max_batch + 1, size=int(rng.integers(1, max_lead_dims + 1))))
    d_in = size()
    d_out = d_in if rng.random() < 1 / 3 else size()
    top = min(d_in, d_out)
    rank = int(rng.choice([1, top, int(rng.integers(1, top + 1))]))
    return {"lead": lead, "d_in": d_in, "d_out": d_out, "rank": rank}


def well_scaled_floats(dtype: str = "float64", limit: float = LIMIT) -> st.SearchStrategy[float]:
    """Floats representable in ``dtype``, |v| <= limit, either 0 or >= 2^-8 in magnitude."""
    widths: dict[str, Literal[16, 32, 64]] = {"float64": 64, "float32": 32, "float16": 16, "bfloat16": 32}
    width = widths[dtype]
    base = st.floats(-limit, limit, width=width, allow_nan=False, allow_infinity=False, allow_subnormal=False)
    return base.map(lambda v: 0.0 if abs(v) < FLUSH else float(round_to(v, dtype)))


def well_scaled_arrays(shape: Any, dtype: str = "float64", limit: float = LIMIT) -> st.SearchStrategy[np.ndarray]:
    """float64 arrays of ``shape`` holding ``well_scaled_floats(dtype)`` (hypothesis draws
    every element, so they shrink well; ``lora_problems`` uses a seed instead, for speed)."""
    return hnp.arrays(np.float64, shape, elements=well_scaled_floats(dtype, limit))


def dropout_masks(shape: tuple[int, ...], p: float, dtype: str = "float64") -> st.SearchStrategy[np.ndarray]:
    """Inverted-dropout masks (entries 0 or 1/(1-p), rounded to ``dtype``) like
    ``minilora.dropout_mask``, drawn by hypothesis element by element."""
    keep = round_to(1.0 / (1.0 - p), dtype) if p < 1 else 0.0
    return hnp.arrays(np.float64, shape, elements=st.sampled_from([0.0, float(keep)]))


ALPHAS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 0.5, 3.0, -2.0)
DROPOUTS = (0.0, 0.1, 0.5, 0.9, 1.0)


def lora_problems(
    dtypes: Any = DTYPES,
    *,
    max_dim: int = 12,
    max_batch: int = 4,
    max_lead_dims: int = 2,
    fan_in_fan_out: bool | None = None,
    rslora: bool | None = None,
    bias: bool | None = None,
    dropout: bool | None = None,
) -> st.SearchStrategy[LoraProblem]:
    """LoRA problems: shapes from ``lora_shapes``, a dtype from ``dtypes``, alpha (including
    alpha != r, a negative and a non-power of two), rsLoRA, fan_in_fan_out, bias and an
    inverted-dropout mask (p in 0, 0.1, 0.5, 0.9, 1). Each option is drawn when None, or fixed
    to the given bool (``dropout=False``: no mask)."""

    def option(fixed: bool | None) -> st.SearchStrategy[bool]:
        return st.booleans() if fixed is None else st.just(fixed)

    @st.composite
    def draw_problem(draw: Any) -> LoraProblem:
        seed_value = draw(st.integers(0, 2**32 - 1))  # one seed: the shapes and the values
        shapes = shapes_from(np.random.default_rng([seed_value, 1]), max_dim, max_batch, max_lead_dims)
        p = None
        if dropout is not False and draw(option(dropout)):
            p = draw(st.sampled_from(DROPOUTS))
        return make_problem(
            **shapes,
            dtype=draw(st.sampled_from(tuple(dtypes))),
            alpha=draw(st.sampled_from(ALPHAS)),
            rslora=draw(option(rslora)),
            fan_in_fan_out=draw(option(fan_in_fan_out)),
            bias=draw(option(bias)),
            dropout=p,
            seed=seed_value,
        )

    return draw_problem()


# gradient magnitudes 10^U(lo, hi): ordinary ones, tiny ones where eps decides the step, and both
GRADIENT_DECADES = ((-1.3, 0.7), (-8.0, -2.0), (-8.0, 0.7))
EPSILONS = (1e-8, 1e-6, 1e-3)


def adam_problems(
    dtypes: Any = DTYPES,
    *,
    max_dim: int = 8,
    max_steps: int = 6,
    amsgrad: bool | None = None,
    l2: bool | None = None,  # False: Adam without decay (AdamW still decays)
    maximize: bool | None = None,
) -> st.SearchStrategy[AdamProblem]:
    """Adam with L2 decay and AdamW with decoupled decay (0, 0.01 or 0.1 each), amsgrad,
    maximize, eps in {1e-8, 1e-6, 1e-3}, momentum 0.9 or 0.5, a few steps on random factors with
    gradients down to 1e-8, exact zeros and LoRA's first step (dA = 0). ``amsgrad`` and
    ``maximize`` fix an option (None: drawn); ``l2=False`` never draws L2 decay. In bfloat16 the
    learning rate is 1e-1 and some gradients reach eps: a smaller step is below the parameter's
    own rounding, and a check that cannot tell an update from none has checked nothing."""

    def option(fixed: bool | None) -> st.SearchStrategy[bool]:
        return st.booleans() if fixed is None else st.just(fixed)

    @st.composite
    def draw_adam(draw: Any) -> AdamProblem:
        seed_value = draw(st.integers(0, 2**32 - 1))
        shapes = shapes_from(np.random.default_rng([seed_value, 1]), max_dim, 1, 1)
        dtype = draw(st.sampled_from(tuple(dtypes)))
        decoupled = draw(st.booleans())
        decay = draw(st.sampled_from([0.0, 0.01, 0.1]))
        if not decoupled and l2 is False:
            decay = 0.0
        lrs = [1e-1] if dtype == "bfloat16" else [1e-3, 1e-2, 1e-1]
        eps = draw(st.sampled_from(EPSILONS))
        # in bfloat16 some gradients must reach eps: far below it, the step is below the rounding
        decades = [d for d in GRADIENT_DECADES if dtype != "bfloat16" or d[1] >= math.log10(eps) + 1]
        return make_adam_problem(
            d_in=shapes["d_in"], d_out=shapes["d_out"], rank=shapes["rank"],
            steps=draw(st.integers(1, max_steps)),
            dtype=dtype,
            decoupled=decoupled,
            weight_decay=decay,
            amsgrad=draw(option(amsgrad)),
            maximize=draw(option(maximize)),
            lr=draw(st.sampled_from(lrs)),
            betas=draw(st.sampled_from([(0.9, 0.999), (0.5, 0.99)])),
            eps=eps,
            decades=draw(st.sampled_from(decades)),
            zeros=draw(st.sampled_from([0.0, 0.0, 0.25])),
            lora_first_step=draw(st.booleans()),
            seed=seed_value,
        )

    return draw_adam()


def sample(strategy: st.SearchStrategy, count: int, seed_value: int = 0) -> list:
    """Up to ``count`` examples of ``strategy``, the same ones for the same seed (hypothesis
    runs its generation phase, without a database; fewer come back if the space is smaller).
    Repeats are dropped: hypothesis draws the same example again now and then, and a repeated
    case checks nothing new. Hypothesis keeps its files in a temporary folder meanwhile: nothing is left in the working
    directory (no ``.hypothesis/``)."""
    import hashlib
    import pickle
    import tempfile

    from hypothesis import configuration

    drawn: list = []
    seen: set = set()

    @settings(max_examples=max(1, 5 * count), database=None, deadline=None, phases=[Phase.generate],
              derandomize=False, suppress_health_check=list(HealthCheck))
    @seed(seed_value)
    @given(strategy)
    def collect(value: Any) -> None:
        # a problem is known by its values (hypothesis varies an alpha and keeps the seed)
        data = getattr(value, "x", getattr(value, "A", value))
        key = hashlib.sha256(pickle.dumps(data)).digest()
        if key not in seen and len(drawn) < count:
            seen.add(key)
            drawn.append(value)

    previous = configuration.storage_directory()
    with tempfile.TemporaryDirectory(prefix="minilora-hypothesis-") as home:
        configuration.set_hypothesis_home_dir(home)
        try:
            collect()
        finally:
            configuration.set_hypothesis_home_dir(str(previous))
    return drawn[:count]
