"""LoRA problems: one layer with its inputs, or Adam steps with their gradients, as plain data.

The arrays are float64 NumPy arrays whose values are exactly representable in the problem's
``dtype``, so the implementation under test and the float64 oracle see the same numbers. Values
are well scaled: standard normal, magnitudes below 2^-8 flushed to zero (never subnormal),
nothing near overflow even in float16. ``strategies`` draws these with hypothesis; this module
needs NumPy only.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from minilora._checks import check_bool
from minilora.layers import lora_scale
from minilora.testing.tolerance import UNIT_ROUNDOFF, round_to

__all__ = ["DTYPES", "LoraProblem", "AdamProblem", "make_problem", "make_adam_problem", "relabel"]

DTYPES = tuple(UNIT_ROUNDOFF)
FLUSH = 2.0**-8  # smaller magnitudes become 0: no subnormal ever reaches an implementation
LIMIT = 8.0  # largest magnitude: sums of products stay far from float16's 65504


@dataclass(frozen=True)
class LoraProblem:
    """One LoRA layer and its inputs. Shapes as in ``minilora.lora_dense``:
    x (*lead, d_in), W (d_out, d_in) or (d_in, d_out) with fan_in_fan_out, b (d_out,) or None,
    A (r, d_in), B (d_out, r) (nonzero, so every gradient is exercised), mask like x or None
    (inverted dropout with probability ``dropout``), cotangent like y (the upstream gradient).
    """

    x: np.ndarray
    W: np.ndarray
    b: np.ndarray | None
    A: np.ndarray
    B: np.ndarray
    mask: np.ndarray | None
    cotangent: np.ndarray
    alpha: float
    rank: int
    rslora: bool = False
    fan_in_fan_out: bool = False
    dropout: float | None = None
    dtype: str = "float64"
    label: str = ""

    @property
    def scale(self) -> float:
        """alpha / r, or alpha / sqrt(r) with rslora (a Python float: never rounded)."""
        return lora_scale(self.alpha, self.rank, rslora=self.rslora)

    @property
    def d_in(self) -> int:
        return self.A.shape[1]

    @property
    def d_out(self) -> int:
        return self.B.shape[0]

    @property
    def lead(self) -> tuple[int, ...]:
        return tuple(self.x.shape[:-1])

    @property
    def params(self) -> dict:
        return {"W": self.W} if self.b is None else {"W": self.W, "b": self.b}

    @property
    def lora(self) -> dict:
        return {"A": self.A, "B": self.B}

    def describe(self) -> str:
        bits = [
            f"x {tuple(self.x.shape)}", f"d_in {self.d_in}", f"d_out {self.d_out}", f"rank {self.rank}",
            f"alpha {self.alpha:g}", f"scale {self.scale:.6g}",
        ]
        bits += [flag for flag, on in (("rslora", self.rslora), ("fan_in_fan_out", self.fan_in_fan_out),
                                       ("no bias", self.b is None)) if on]
        if self.dropout is not None:
            bits.append(f"dropout mask p={self.dropout:g}")
        return (f"{self.label}: " if self.label else "") + ", ".join(bits)


@dataclass(frozen=True)
class AdamProblem:
    """Adam/AdamW steps on a LoRA layer's factors {"A": (r, d_in), "B": (d_out, r)}, fed the
    fixed gradient sequence ``grads`` (so the optimizer is checked apart from the gradients).
    ``options`` are ``minilora.adam_step``'s keywords: lr, betas, eps, weight_decay,
    decoupled (True: AdamW), amsgrad, maximize."""

    A: np.ndarray
    B: np.ndarray
    grads: tuple[dict, ...]
    options: dict = field(default_factory=dict)
    alpha: float = 1.0
    dtype: str = "float64"
    label: str = ""

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def params(self) -> dict:
        return {"A": self.A, "B": self.B}

    def describe(self) -> str:
        o = self.options
        name = "AdamW" if o.get("decoupled") else "Adam"
        extra = (", amsgrad" if o.get("amsgrad") else "") + (", maximize" if o.get("maximize") else "")
        if o.get("weight_decay") and not o.get("decoupled"):
            extra += " (L2)"
        return ((f"{self.label}: " if self.label else "") + f"{name} {len(self.grads)} steps, A {self.A.shape}, "
                f"B {self.B.shape}, lr {o.get('lr', 1e-3):g}, betas {tuple(o.get('betas', (0.9, 0.999)))}, "
                f"eps {o.get('eps', 1e-8):g}, weight_decay {o.get('weight_decay', 0.0):g}{extra}")


def _values(rng: np.random.Generator, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    v = np.clip(rng.standard_normal(shape), -LIMIT, LIMIT)
    v[np.abs(v) < FLUSH] = 0.0
    return round_to(v, dtype)



def make_problem(
    *,
    lead: tuple[int, ...],
    d_in: int,
    d_out: int,
    rank: int,
    dtype: str = "float64",
    alpha: float = 1.0,
    rslora: bool = False,
    fan_in_fan_out: bool = False,
    bias: bool = True,
    dropout: float | None = None,
    seed: int = 0,
    label: str = "",
) -> LoraProblem:
    """A ``LoraProblem`` with values from ``np.random.default_rng(seed)``, rounded to dtype."""
    rslora, fan_in_fan_out = check_bool(rslora, "rslora"), check_bool(fan_in_fan_out, "fan_in_fan_out")
    bias = check_bool(bias, "bias")
    rng = np.random.default_rng(seed)
    x = _values(rng, (*lead, d_in), dtype)
    W = _values(rng, (d_in, d_out) if fan_in_fan_out else (d_out, d_in), dtype)
    b = _values(rng, (d_out,), dtype) if bias else None
    A = _values(rng, (rank, d_in), dtype)
    B = _values(rng, (d_out, rank), dtype)
    mask = None
    if dropout is not None:
        keep = rng.random((*lead, d_in)) >= dropout
        mask = round_to(np.where(keep, 1.0 / (1.0 - dropout) if dropout < 1 else 0.0, 0.0), dtype)
    cotangent = _values(rng, (*lead, d_out), dtype)
    return LoraProblem(x, W, b, A, B, mask, cotangent, float(alpha), rank, rslora, fan_in_fan_out,
                       dropout, dtype, label)


def make_adam_problem(
    *,
    d_in: int,
    d_out: int,
    rank: int,
    steps: int = 5,
    dtype: str = "float64",
    decoupled: bool = False,
    weight_decay: float = 0.0,
    amsgrad: bool = False,
    maximize: bool = False,
    lr: float = 1e-2,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    decades: tuple[float, float] = (-1.3, 0.7),
    zeros: float = 0.0,
    lora_first_step: bool = False,
    seed: int = 0,
    label: str = "",
) -> AdamProblem:
    """An ``AdamProblem`` whose gradients have magnitudes 10^U(decades) (default |g| in
    [0.05, 5]; ``decades=(-8, -2)`` reaches 1e-8, where eps decides the step), a fraction
    ``zeros`` of exact zeros, and with ``lora_first_step`` dA = 0 exactly at step 1 (LoRA's first
    step: B = 0, so the gradient of A vanishes). Zeros are not drawn in float16, where eps
    rounds to 0 and a zero gradient gives 0/0."""
    decoupled, amsgrad = check_bool(decoupled, "decoupled"), check_bool(amsgrad, "amsgrad")
    rng = np.random.default_rng(seed)
    A = _values(rng, (rank, d_in), dtype)
    B = _values(rng, (d_out, rank), dtype)
    lo, hi = decades
    grads = []
    for t in range(steps):
        step = {}
        for key, shape in (("A", A.shape), ("B", B.shape)):
            g = rng.choice([-1.0, 1.0], shape) * 10.0 ** rng.uniform(lo, hi, shape)
            if zeros and dtype != "float16":
                g[rng.random(shape) < zeros] = 0.0
            if lora_first_step and t == 0 and key == "A" and dtype != "float16":
                g[...] = 0.0
            step[key] = round_to(g, dtype)
        grads.append(step)
    options = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, decoupled=decoupled,
                   amsgrad=amsgrad, maximize=maximize)
    return AdamProblem(A, B, tuple(grads), options, dtype=dtype, label=label)


def relabel(problem: Any, label: str) -> Any:
    """A copy of a problem with another label."""
    return replace(problem, label=label)
