"""The problems of the variant properties of ``minilora check``: a DoRA layer, a LoRA embedding
and a trainable-set question, as plain data (NumPy only), with their fixed and seeded cases.

    DoraProblem       a ``LoraProblem`` plus the magnitude m (d_out,): the DoRA layer
                      y = x W^T + b + (c - 1)(xm W^T) + c s (xm A^T) B^T, c = m / ||W + s B A||_row
                      (``minilora.dora_dense``; PEFT ``use_dora=True``)
    EmbeddingProblem  ids (*lead,) int64 in [0, num), W (num, dim), A (r, num), B (dim, r),
                      cotangent (*lead, dim): y = W[ids] + s A^T[ids] B^T (``minilora.lora_embedding``)
    TrainableProblem  a stack of named Linear layers, the ones that carry LoRA, PEFT's ``bias``
                      mode and ``use_dora``: which parameters train (``minilora.split_trainable``)

The float arrays are float64 holding values exact in ``dtype``, as in ``minilora.testing.problems``.
The magnitude is drawn away from the row norm (m = ||W + s B A||_row times U(0.5, 1.5)): at
m = norm (a fresh DoRA layer) c = 1 and a bias scaled by c, a norm over the wrong axis or a
dropped magnitude all go unseen; after training m has moved, and so it has here. A is nonzero in
the embedding problems (a fresh one has A = 0, which hides every bug of the adapter branch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from minilora.errors import MiniLoraValueError
from minilora.layers import lora_scale
from minilora.testing.cases import _restrict
from minilora.testing.problems import LoraProblem, _values, make_problem
from minilora.testing.tolerance import round_to

__all__ = [
    "DoraProblem",
    "EmbeddingProblem",
    "TrainableProblem",
    "BIAS_MODES",
    "TRAINABLE_KINDS",
    "make_dora_problem",
    "make_embedding_problem",
    "DORA_EDGE_CASES",
    "EMBEDDING_EDGE_CASES",
    "TRAINABLE_LAYOUTS",
    "dora_cases",
    "embedding_cases",
    "trainable_cases",
]

BIAS_MODES = ("none", "all", "lora_only")
# the names a trainable set is written in: "<layer>.<kind>"
TRAINABLE_KINDS = ("W", "b", "A", "B", "m")


@dataclass(frozen=True)
class DoraProblem(LoraProblem):
    """A DoRA layer: every field of ``LoraProblem`` (x, W, b, A, B, mask, cotangent, alpha, rank,
    rslora, fan_in_fan_out, dropout, dtype, label) and ``magnitude`` m (d_out,), positive."""

    magnitude: Any = None

    def describe(self) -> str:
        return super().describe() + ", DoRA"


@dataclass(frozen=True)
class EmbeddingProblem:
    """LoRA on an embedding table: ids (*lead,) int64, W (num, dim), A (r, num) nonzero,
    B (dim, r), cotangent (*lead, dim); scale alpha / r (alpha / sqrt(r) with rslora)."""

    ids: np.ndarray
    W: np.ndarray
    A: np.ndarray
    B: np.ndarray
    cotangent: np.ndarray
    alpha: float
    rank: int
    rslora: bool = False
    dtype: str = "float64"
    label: str = ""

    @property
    def scale(self) -> float:
        return lora_scale(self.alpha, self.rank, rslora=self.rslora)

    @property
    def num_embeddings(self) -> int:
        return self.W.shape[0]

    @property
    def dim(self) -> int:
        return self.W.shape[1]

    @property
    def lead(self) -> tuple[int, ...]:
        return tuple(self.ids.shape)

    def describe(self) -> str:
        text = (f"ids {tuple(self.ids.shape)}, num_embeddings {self.num_embeddings}, dim {self.dim}, "
                f"rank {self.rank}, alpha {self.alpha:g}, scale {self.scale:.6g}" + (", rslora" if self.rslora else ""))
        return (f"{self.label}: " if self.label else "") + text


@dataclass(frozen=True)
class TrainableProblem:
    """Which parameters train: ``layers`` ((name, d_in, d_out, has_bias), ...) applied in order
    (a plain stack of ``nn.Linear``s, no activation), LoRA (rank, alpha) on the layers named in
    ``targets``, PEFT's ``bias`` mode ("none" | "all" | "lora_only") and ``dora``
    (``use_dora``). The answer is a set of "<layer>.<kind>" names, kind in ``TRAINABLE_KINDS``:
    W and b the base layer's weight and bias, A and B the LoRA factors, m DoRA's magnitude."""

    layers: tuple[tuple[str, int, int, bool], ...]
    targets: tuple[str, ...]
    bias: str = "none"
    dora: bool = False
    rank: int = 2
    alpha: float = 4.0
    label: str = ""

    def describe(self) -> str:
        shown = ", ".join(f"{n} {i}->{o}{'' if b else ' (no bias)'}" for n, i, o, b in self.layers)
        return ((f"{self.label}: " if self.label else "") + f"layers [{shown}], LoRA on {list(self.targets)}, "
                f"bias={self.bias!r}" + (", use_dora" if self.dora else ""))


def make_dora_problem(*, seed: int = 0, magnitude_factor: float | None = None, **kwargs: Any) -> DoraProblem:
    """A ``DoraProblem``: ``make_problem``'s layer (same keywords) and m = ||W + s B A||_row
    times U(0.5, 1.5) (or times ``magnitude_factor``, every row's c then that factor), rounded
    to the dtype."""
    import minilora as ml
    from minilora.variants import dora_magnitude

    p = make_problem(seed=seed, **kwargs)
    rng = np.random.default_rng(seed + 7919)
    with ml.use_backend("numpy"):
        norm = np.asarray(dora_magnitude(p.params, p.lora, scale=p.scale, fan_in_fan_out=p.fan_in_fan_out))
    if not np.all(norm > 0):
        raise MiniLoraValueError(f"make_dora_problem: a row of W + s B A is zero (seed {seed}); pick another seed")
    factor = rng.uniform(0.5, 1.5, norm.shape) if magnitude_factor is None else float(magnitude_factor)
    m = round_to(norm * factor, p.dtype)
    fields = {f: getattr(p, f) for f in p.__dataclass_fields__}
    return DoraProblem(**fields, magnitude=m)


def make_embedding_problem(*, lead: tuple[int, ...], num_embeddings: int, dim: int, rank: int,
                           dtype: str = "float64", alpha: float = 1.0, rslora: bool = False, seed: int = 0,
                           label: str = "") -> EmbeddingProblem:
    """An ``EmbeddingProblem`` from ``np.random.default_rng(seed)``; the ids repeat (so dA sums
    over occurrences) whenever there are more of them than rows."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, num_embeddings, size=lead).astype(np.int64)
    W = _values(rng, (num_embeddings, dim), dtype)
    A = _values(rng, (rank, num_embeddings), dtype)
    B = _values(rng, (dim, rank), dtype)
    cotangent = _values(rng, (*lead, dim), dtype)
    return EmbeddingProblem(ids, W, A, B, cotangent, float(alpha), rank, bool(rslora), dtype, label)


# fixed cases run at every seed: square layers (a norm over the wrong axis keeps the shape
# right), fan_in_fan_out, dropout (PEFT recomputes the base on the dropped input), no bias
DORA_EDGE_CASES: tuple[dict[str, Any], ...] = (
    dict(label="edge: DoRA, square", lead=(4,), d_in=6, d_out=6, rank=2, alpha=4.0, seed=301),
    dict(label="edge: DoRA, square, fan_in_fan_out", lead=(3,), d_in=5, d_out=5, rank=3, alpha=2.0,
         fan_in_fan_out=True, seed=302),
    dict(label="edge: DoRA, r = d_in, rslora", lead=(3,), d_in=4, d_out=6, rank=4, alpha=8.0, rslora=True,
         seed=303),
    dict(label="edge: DoRA, two lead dimensions, dropout", lead=(2, 3), d_in=6, d_out=5, rank=3, alpha=3.0,
         dropout=0.25, seed=304),
    dict(label="edge: DoRA, no bias", lead=(5,), d_in=7, d_out=3, rank=2, alpha=6.0, bias=False, seed=305),
    dict(label="edge: DoRA, d_in 37, dropout, fan_in_fan_out", lead=(4,), d_in=37, d_out=19, rank=5, alpha=10.0,
         dropout=0.1, fan_in_fan_out=True, seed=306),
    dict(label="edge: DoRA, width 256", lead=(2, 4), d_in=256, d_out=128, rank=8, alpha=16.0, seed=307),
    # c = 2 on a narrow layer: the bias is a large share of y and (c - 1) b is 100% of it, so a
    # bias wrongly scaled by c shows above bfloat16's rounding at every seed
    dict(label="edge: DoRA, c = 2, d_in 2", lead=(8,), d_in=2, d_out=4, rank=1, alpha=1.0, magnitude_factor=2.0,
         seed=308),
)
EMBEDDING_EDGE_CASES: tuple[dict[str, Any], ...] = (
    dict(label="edge: embedding, square table", lead=(7,), num_embeddings=6, dim=6, rank=2, alpha=4.0, seed=401),
    dict(label="edge: embedding, r = dim, rslora", lead=(2, 5), num_embeddings=9, dim=3, rank=3, alpha=6.0,
         rslora=True, seed=402),
    dict(label="edge: embedding, many repeats", lead=(40,), num_embeddings=5, dim=8, rank=4, alpha=8.0, seed=403),
    dict(label="edge: embedding, vocabulary 1000", lead=(3, 8), num_embeddings=1000, dim=64, rank=8,
         alpha=16.0, seed=404),
)
# the models of the trainable cases: a LoRA layer with and without bias, a layer without LoRA
# with a bias (bias="all" trains it, "lora_only" does not)
TRAINABLE_LAYOUTS: tuple[tuple[tuple[tuple[str, int, int, bool], ...], tuple[str, ...]], ...] = (
    ((("fc1", 4, 5, True), ("fc2", 5, 3, False), ("head", 3, 2, True)), ("fc1", "fc2")),
    ((("fc1", 3, 4, True), ("fc2", 4, 4, True), ("head", 4, 2, True)), ("fc2",)),
    ((("fc1", 4, 3, False), ("head", 3, 2, False)), ("fc1", "head")),
)


def _drawn_layer(rng: np.random.Generator, features: frozenset) -> dict:
    d_in, d_out = int(rng.integers(2, 25)), int(rng.integers(2, 25))
    lead = tuple(int(n) for n in rng.integers(1, 6, size=int(rng.integers(1, 3))))
    spec = dict(lead=lead, d_in=d_in, d_out=d_out, rank=int(rng.integers(1, min(d_in, d_out, 8) + 1)),
                alpha=float(rng.choice([1.0, 2.0, 8.0, 16.0, 0.5])), rslora=bool(rng.random() < 0.3),
                fan_in_fan_out=bool(rng.random() < 0.3), bias=bool(rng.random() < 0.8),
                dropout=float(rng.choice([0.1, 0.5])) if rng.random() < 0.3 else None)
    return _restrict(spec, features)


def dora_cases(dtype: str, features: frozenset, count: int, seed: int) -> list[DoraProblem]:
    """The fixed DoRA cases and ``count`` drawn ones (NumPy's generator seeded by seed and dtype)."""
    out = [make_dora_problem(**_restrict(spec, features), dtype=dtype) for spec in DORA_EDGE_CASES]
    rng = np.random.default_rng([seed, 13, len(dtype), ord(dtype[-1])])
    for i in range(count):
        spec = _drawn_layer(rng, features)
        out.append(make_dora_problem(**spec, dtype=dtype, seed=int(rng.integers(2**31)), label=f"drawn #{i + 1}"))
    return out


def embedding_cases(dtype: str, features: frozenset, count: int, seed: int) -> list[EmbeddingProblem]:
    """The fixed embedding cases and ``count`` drawn ones."""
    specs = [dict(spec) for spec in EMBEDDING_EDGE_CASES]
    rng = np.random.default_rng([seed, 17, len(dtype), ord(dtype[-1])])
    for i in range(count):
        num, dim = int(rng.integers(2, 40)), int(rng.integers(1, 20))
        specs.append(dict(lead=tuple(int(n) for n in rng.integers(1, 7, size=int(rng.integers(1, 3)))),
                          num_embeddings=num, dim=dim, rank=int(rng.integers(1, min(num, dim, 8) + 1)),
                          alpha=float(rng.choice([1.0, 4.0, 16.0])), rslora=bool(rng.random() < 0.3),
                          seed=int(rng.integers(2**31)), label=f"drawn #{i + 1}"))
    for spec in specs:
        if "rslora" not in features or "scale" not in features:
            spec["rslora"] = False
        if "scale" not in features:  # a layer without alpha: scale 1
            spec["alpha"] = float(spec["rank"])
    return [make_embedding_problem(**spec, dtype=dtype) for spec in specs]


def trainable_cases(dora: bool) -> list[TrainableProblem]:
    """Every layout in every bias mode, without DoRA and (``dora``) with it."""
    out = []
    for i, (layers, targets) in enumerate(TRAINABLE_LAYOUTS):
        for bias in BIAS_MODES:
            for use_dora in (False, True) if dora else (False,):
                out.append(TrainableProblem(layers, targets, bias, use_dora, label=f"model {i + 1}"))
    return out
