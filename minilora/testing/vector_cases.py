"""The golden vectors' cases: the fixed problems of ``minilora.testing.vectors``, how minilora
computes each expected output, and its tolerance (``docs/vectors.md``).

Every valid input is a multiple of 1/32 below 4 in magnitude (``_grid``), exact in float16,
bfloat16, float32 and float64 alike.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from minilora.errors import MiniLoraValueError


class VectorsError(MiniLoraValueError):
    """A vector folder that cannot be read or does not match its manifest (names the file)."""


def _grid(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Multiples of 1/32 in [-4, 4): exact in every float dtype (at most 8 significant bits)."""
    return rng.integers(-128, 128, size=shape).astype(np.float64) / 32.0


LAYER_CASES = (
    dict(id="basic", comment="a small layer with bias, scale alpha/r = 2", lead=(3,), d_in=4, d_out=3, rank=2,
         alpha=4.0),
    dict(id="rank1", comment="rank 1", lead=(2,), d_in=5, d_out=3, rank=1, alpha=1.0),
    dict(id="full_rank", comment="rank = min(d_in, d_out), no bias", lead=(2,), d_in=3, d_out=4, rank=3,
         alpha=3.0, bias=False),
    dict(id="batch1", comment="a batch of one", lead=(1,), d_in=4, d_out=2, rank=2, alpha=8.0),
    dict(id="x3d", comment="x with two leading dimensions", lead=(2, 3), d_in=4, d_out=3, rank=2, alpha=2.0),
    dict(id="fan_in_fan_out", comment="W stored (d_in, d_out), as GPT-2's Conv1D", lead=(2,), d_in=4,
         d_out=3, rank=2, alpha=4.0, fan_in_fan_out=True),
    dict(id="rslora", comment="rsLoRA: scale alpha/sqrt(r) = 8/2 = 4", lead=(2,), d_in=5, d_out=4, rank=4,
         alpha=8.0, rslora=True),
    dict(id="dropout", comment="inverted dropout p = 0.5: mask entries 0 or 2", lead=(4,), d_in=4, d_out=3,
         rank=2, alpha=2.0, dropout=0.5),
    dict(id="scale_third", comment="scale 1/3 is not a power of two: the expected values are rounded",
         lead=(2,), d_in=3, d_out=3, rank=3, alpha=1.0),
)
ADAM_CASES = (
    dict(id="adam_defaults", comment="torch.optim.Adam defaults: lr 1e-3, betas (0.9, 0.999), eps 1e-8",
         d_in=4, d_out=3, rank=2, steps=5, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
         decoupled=False, amsgrad=False),
    dict(id="adamw", comment="AdamW: decoupled weight decay 0.1, lr 1e-2", d_in=3, d_out=2, rank=1, steps=4,
         lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, decoupled=True, amsgrad=False),
    dict(id="adam_amsgrad_l2", comment="Adam with amsgrad and L2 weight decay 0.01", d_in=2, d_out=2, rank=2,
         steps=6, lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.01, decoupled=False, amsgrad=True),
)




def _layer_case(spec: dict, seed: int) -> tuple[dict, dict]:
    """(arrays, options) of one layer case."""
    from minilora.layers import lora_scale

    rng = np.random.default_rng(seed)
    lead, d_in, d_out, r = spec["lead"], spec["d_in"], spec["d_out"], spec["rank"]
    fif = spec.get("fan_in_fan_out", False)
    a = {"x": _grid(rng, (*lead, d_in)), "W": _grid(rng, (d_in, d_out) if fif else (d_out, d_in))}
    if spec.get("bias", True):
        a["b"] = _grid(rng, (d_out,))
    a["A"] = _grid(rng, (r, d_in))
    a["B"] = _grid(rng, (d_out, r))
    p = spec.get("dropout")
    if p is not None:
        a["mask"] = np.where(rng.random((*lead, d_in)) >= p, 1.0 / (1.0 - p), 0.0)
    a["g"] = _grid(rng, (*lead, d_out))
    rslora = spec.get("rslora", False)
    options = {"alpha": spec["alpha"], "rank": r, "rslora": rslora,
               "scale": lora_scale(spec["alpha"], r, rslora=rslora), "fan_in_fan_out": fif, "dropout_p": p}
    return a, options


def _eight_bits(v: np.ndarray) -> np.ndarray:
    """``v`` rounded to 8 significant bits (bfloat16's), magnitudes below 2^-8 set to 0."""
    from minilora.testing.tolerance import round_to

    out = round_to(v, "bfloat16")
    return np.where(np.abs(out) < 2.0**-8, 0.0, out)


def _params(a: dict) -> tuple[dict, dict]:
    return {"W": a["W"], **({"b": a["b"]} if "b" in a else {})}, {"A": a["A"], "B": a["B"]}


def _run_layer(op: str, a: dict, o: dict) -> dict[str, np.ndarray]:
    """The oracle's outputs of a layer operation on inputs ``a`` and options ``o``."""
    import autograd.numpy as anp

    from minilora.layers import lora_dense, merge, unmerge
    from minilora.train import grad

    params, lora = _params(a)
    kw = dict(scale=o["scale"], fan_in_fan_out=o["fan_in_fan_out"])
    if op == "lora_dense":
        return {"y": lora_dense(params, lora, a["x"], dropout_mask=a.get("mask"), **kw)}
    if op == "lora_dense_vjp":
        def loss(x: Any, lo: dict) -> Any:
            return anp.sum(lora_dense(params, lo, x, dropout_mask=a.get("mask"), **kw) * a["g"])

        gx, gl = grad(loss, argnum=(0, 1))(a["x"], lora)
        return {"dx": gx, "dA": gl["A"], "dB": gl["B"]}
    if op == "merge":
        return {"W": merge(params, lora, **kw)["W"]}
    if op == "unmerge":
        return {"W": unmerge(params, lora, **kw)["W"]}
    raise VectorsError(f"unknown operation {op!r}")


# output name -> key in lora_magnitudes
MAGNITUDE_KEY = {"y": "y", "dx": "x", "dA": "A", "dB": "B", "W": "W"}


def _layer_tolerance(op: str, a: dict, o: dict) -> dict[str, tuple[int, np.ndarray]]:
    from minilora.testing.tolerance import lora_magnitudes

    params, lora = _params(a)
    x = a.get("x", np.zeros((1, a["A"].shape[1])))
    mags = lora_magnitudes(params, lora, x, scale=o["scale"], fan_in_fan_out=o["fan_in_fan_out"],
                           dropout_mask=a.get("mask"), cotangent=a.get("g"))
    names = {"lora_dense": ("y",), "lora_dense_vjp": ("dx", "dA", "dB"), "merge": ("W",), "unmerge": ("W",)}[op]
    return {name: mags[MAGNITUDE_KEY[name]] for name in names}


def _bound(k: int, M: np.ndarray, dtype: str) -> np.ndarray:
    from minilora.testing.tolerance import dot_bound

    return dot_bound(k, M, dtype) + dot_bound(k, M, "float64")


def _run_adam(a: dict, o: dict) -> dict[str, np.ndarray]:
    from minilora.optim import adam_init, adam_step

    params = {"A": a["A"], "B": a["B"]}
    kw = _adam_kw(o)
    state = adam_init(params, amsgrad=kw["amsgrad"])
    for t in range(1, o["steps"] + 1):
        grads = {k: a[f"grads/{t}/{k}"] for k in ("A", "B")}
        params, state = adam_step(params, grads, state, **kw)
    return params


def _adam_kw(o: dict) -> dict:
    from minilora.optim import adam_kwargs

    return adam_kwargs(o)


def _adam_case(spec: dict, seed: int) -> tuple[dict, dict]:
    rng = np.random.default_rng(seed)
    a = {"A": _grid(rng, (spec["rank"], spec["d_in"])), "B": _grid(rng, (spec["d_out"], spec["rank"]))}
    for t in range(1, spec["steps"] + 1):
        for k in ("A", "B"):
            g = _grid(rng, a[k].shape)
            a[f"grads/{t}/{k}"] = np.where(g == 0, 1.0 / 32, g)  # never 0 (see strategies.make_adam_problem)
    o = {k: spec[k] for k in ("steps", "lr", "eps", "weight_decay", "decoupled", "amsgrad")}
    o["betas"] = list(spec["betas"])
    return a, o


def _invalid_cases() -> list[tuple[str, str, str, str, dict, dict]]:
    """(id, comment, operation, error kind, arrays, options) of inputs that must be refused."""
    rng = np.random.default_rng(7)
    o = {"alpha": 2.0, "rank": 2, "rslora": False, "scale": 1.0, "fan_in_fan_out": False, "dropout_p": None}
    good = {"x": _grid(rng, (2, 4)), "W": _grid(rng, (3, 4)), "b": _grid(rng, (3,)), "A": _grid(rng, (2, 4)),
            "B": _grid(rng, (3, 2))}
    huge = {"W": np.full((3, 4), 2.0**1000), "A": np.full((2, 4), 2.0**600), "B": np.full((3, 2), 2.0**600)}
    nan_A = good["A"].copy()
    nan_A[1, 2] = np.nan
    return [
        ("x_width", "x has 5 columns; W and A expect d_in = 4", "lora_dense", "shape",
         {**good, "x": _grid(rng, (2, 5))}, o),
        ("A_width", "A is (2, 5); W says d_in = 4", "lora_dense", "shape", {**good, "A": _grid(rng, (2, 5))}, o),
        ("B_rank", "B is (3, 3) but A has rank 2", "lora_dense", "shape", {**good, "B": _grid(rng, (3, 3))}, o),
        ("B_rows", "B is (4, 2) but W has d_out = 3", "lora_dense", "shape", {**good, "B": _grid(rng, (4, 2))}, o),
        ("bias_length", "b has 4 entries; d_out = 3", "lora_dense", "shape", {**good, "b": _grid(rng, (4,))}, o),
        ("mask_shape", "the dropout mask is (2, 3); x is (2, 4)", "lora_dense", "shape",
         {**good, "mask": np.full((2, 3), 2.0)}, o),
        ("merge_overflow", "scale B A overflows float64 (2^1200): the merged W would be infinite", "merge",
         "non_finite", huge, o),
        ("merge_nan", "A holds a NaN: the merged W would hold NaNs", "merge", "non_finite",
         {**good, "A": nan_A}, o),
    ]
