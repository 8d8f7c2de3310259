"""The golden vectors' variant groups: ``dora`` (DoRA's forward, gradients incl. the magnitude's,
merge) and ``embedding`` (LoRA on an embedding table: forward, gradients, merge), their cases,
how minilora computes them, and their bounds (``minilora.testing.variant_bounds``).

Operations (shapes as in ``docs/vectors.md``; m (d_out,), ids (...,) integers stored as F64):

    dora_dense       y = x W^T + b + (c - 1)((x * mask) W^T) + c scale ((x * mask) A^T) B^T,
                     c = m / ||W + scale B A||_row
    dora_dense_vjp   dx, dA, dB, dm: the gradients of sum(y * g) (the norm held constant, as PEFT)
    dora_merge       W' = c (W + scale B A), row by row
    embedding        y = W[ids] + scale A^T[ids] B^T,  W (num, dim), A (r, num), B (dim, r)
    embedding_vjp    dA, dB: the gradients of sum(y * g)
    embedding_merge  W + scale (B A)^T

Inputs are multiples of 1/32 below 4 in magnitude (the magnitude m in [1, 5)), exact in every
float dtype. DoRA's bounds have no single reduction length (the row norm's relative error enters
through c): like Adam's, they are given per dtype only.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from minilora.testing.vector_cases import VectorsError, _grid, _layer_case

__all__ = ["VARIANT_GROUPS", "DORA_VECTOR_CASES", "EMBEDDING_VECTOR_CASES", "VARIANT_OPERATIONS",
           "variant_groups", "run_variant"]

VARIANT_GROUPS = ("dora", "embedding")
VARIANT_OPERATIONS = ("dora_dense", "dora_dense_vjp", "dora_merge", "embedding", "embedding_vjp", "embedding_merge")
DORA_VECTOR_CASES = (
    dict(id="basic", comment="a small DoRA layer with bias, scale 2", lead=(3,), d_in=4, d_out=3, rank=2, alpha=4.0),
    dict(id="square", comment="square: a norm over the wrong axis keeps the shape", lead=(2,), d_in=4, d_out=4,
         rank=2, alpha=2.0),
    dict(id="no_bias", comment="no bias, rank = d_in", lead=(2,), d_in=3, d_out=4, rank=3, alpha=3.0, bias=False),
    dict(id="fan_in_fan_out", comment="W stored (d_in, d_out)", lead=(2,), d_in=4, d_out=3, rank=2, alpha=4.0,
         fan_in_fan_out=True),
    dict(id="dropout", comment="dropout p = 0.5: the base term recomputed on the dropped input", lead=(4,), d_in=4,
         d_out=3, rank=2, alpha=2.0, dropout=0.5),
    dict(id="rslora_x3d", comment="rsLoRA, x with two leading dimensions", lead=(2, 3), d_in=5, d_out=3, rank=4,
         alpha=8.0, rslora=True),
)
EMBEDDING_VECTOR_CASES = (
    dict(id="basic", comment="6 embeddings of dim 4, ids repeated", lead=(8,), num=6, dim=4, rank=2, alpha=4.0),
    dict(id="square", comment="a square table: a merge without the transpose keeps the shape", lead=(5,), num=4,
         dim=4, rank=2, alpha=2.0),
    dict(id="rslora_2d", comment="rsLoRA, ids of shape (2, 3)", lead=(2, 3), num=5, dim=3, rank=3, alpha=6.0,
         rslora=True),
)


def _dora_problem(a: dict, o: dict) -> Any:
    from minilora.testing.variant_problems import DoraProblem

    x = a.get("x", np.zeros((1, a["A"].shape[1])))
    g = a.get("g", np.zeros((*x.shape[:-1], a["B"].shape[0])))
    return DoraProblem(x, a["W"], a.get("b"), a["A"], a["B"], a.get("mask"), g, float(o.get("alpha", 1.0)),
                       a["A"].shape[0], bool(o.get("rslora", False)), bool(o["fan_in_fan_out"]), o.get("dropout_p"),
                       "float64", "", magnitude=a["m"])


def _embedding_problem(a: dict, o: dict) -> Any:
    from minilora.testing.variant_problems import EmbeddingProblem

    ids = _ids(a["ids"], a["W"].shape[0])
    g = a.get("g", np.zeros((*ids.shape, a["W"].shape[1])))
    return EmbeddingProblem(ids, a["W"], a["A"], a["B"], g, float(o.get("alpha", 1.0)), a["A"].shape[0],
                            bool(o.get("rslora", False)))


def _ids(ids: np.ndarray, num: int) -> np.ndarray:
    """The F64 ids as int64, refused unless they are integers in [0, num)."""
    ids = np.asarray(ids, dtype=np.float64)
    if ids.size and (not np.all(ids == np.round(ids)) or ids.min() < 0 or ids.max() >= num):
        raise VectorsError(f"ids must be integers in [0, {num}); got values from {ids.min()} to {ids.max()}")
    return ids.astype(np.int64)


def run_variant(op: str, a: dict, o: dict) -> dict[str, np.ndarray]:
    """The oracle's outputs of a variant operation (minilora's DoRA and embedding, float64)."""
    import autograd.numpy as anp

    from minilora.train import grad
    from minilora.variants import dora_dense, dora_merge, embedding_merge, lora_embedding

    s = float(o["scale"])
    if op.startswith("dora"):
        params = {"W": a["W"], **({"b": a["b"]} if "b" in a else {})}
        lora = {"A": a["A"], "B": a["B"]}
        kw: dict[str, Any] = dict(scale=s, fan_in_fan_out=bool(o["fan_in_fan_out"]))
        if op == "dora_dense":
            return {"y": dora_dense(params, lora, a["m"], a["x"], dropout_mask=a.get("mask"), **kw)}
        if op == "dora_dense_vjp":
            def loss(x: Any, lo: dict, m: Any) -> Any:
                return anp.sum(dora_dense(params, lo, m, x, dropout_mask=a.get("mask"), **kw) * a["g"])

            gx, gl, gm = grad(loss, argnum=(0, 1, 2))(a["x"], lora, a["m"])
            return {"dx": gx, "dA": gl["A"], "dB": gl["B"], "dm": gm}
        if op == "dora_merge":
            return {"W": dora_merge(params, lora, a["m"], **kw)[0]["W"]}
    elif op.startswith("embedding"):
        ids = _ids(a["ids"], a["W"].shape[0]) if "ids" in a else None
        table, lora = {"W": a["W"]}, {"A": a["A"], "B": a["B"]}
        if op == "embedding":
            return {"y": lora_embedding(table, lora, ids, scale=s)}
        if op == "embedding_vjp":
            g = grad(lambda lo: anp.sum(lora_embedding(table, lo, ids, scale=s) * a["g"]))(lora)
            return {"dA": g["A"], "dB": g["B"]}
        if op == "embedding_merge":
            return {"W": embedding_merge(table, lora, scale=s)["W"]}
    raise VectorsError(f"unknown operation {op!r}")


# output name -> the key of variant_bounds' result
_BOUND_KEY = {"y": "y", "dx": "x", "dA": "A", "dB": "B", "dm": "m", "W": "W"}
_USED = {"dora_dense": ("x", "W", "b", "A", "B", "m", "mask"), "dora_dense_vjp": ("x", "W", "b", "A", "B", "m", "mask", "g"),
         "dora_merge": ("W", "A", "B", "m"), "embedding": ("ids", "W", "A", "B"),
         "embedding_vjp": ("ids", "W", "A", "B", "g"), "embedding_merge": ("W", "A", "B")}


def _group(name: str, comment: str, ops: tuple[str, ...], specs: tuple, make: Any, bounds: Any,
           seed0: int) -> tuple[dict, dict]:
    from minilora.testing.vectors import BOUND_DTYPES

    tensors: dict[str, np.ndarray] = {}
    cases = []
    for i, spec in enumerate(specs):
        full, o = make(spec, seed0 + i)
        for op in ops:
            a = {k: v for k, v in full.items() if k in _USED[op]}
            cid = f"{name}/{op}/{spec['id']}"
            case: dict[str, Any] = {"id": cid, "comment": spec["comment"], "operation": op, "expect": "ok",
                                    "options": o, "shapes": {k: list(v.shape) for k, v in a.items()},
                                    "inputs": {k: f"{cid}/{k}" for k in a}, "outputs": {}}
            for k, v in a.items():
                tensors[f"{cid}/{k}"] = np.asarray(v, dtype=np.float64)
            per_dtype = {dt: bounds(full, o, dt) for dt in BOUND_DTYPES}
            for out_name, value in run_variant(op, a, o).items():
                base = f"{cid}/out/{out_name}"
                key = _BOUND_KEY[out_name]
                tensors[base] = np.asarray(value, dtype=np.float64)
                entry: dict[str, Any] = {"tensor": base, "reduction_length": None, "magnitude": None, "bound": {}}
                for dt in BOUND_DTYPES:
                    tensors[f"{base}.bound.{dt}"] = np.asarray(per_dtype[dt][key], dtype=np.float64)
                    entry["bound"][dt] = f"{base}.bound.{dt}"
                case["outputs"][out_name] = entry
            cases.append(case)
    return {"name": name, "comment": comment, "cases": cases}, tensors


def _dora_case(spec: dict, seed: int) -> tuple[dict, dict]:
    a, o = _layer_case(spec, seed)
    rng = np.random.default_rng(seed + 500)
    a["m"] = rng.integers(32, 160, size=spec["d_out"]).astype(np.float64) / 32.0  # [1, 5), exact everywhere
    return a, o


def _embedding_case(spec: dict, seed: int) -> tuple[dict, dict]:
    from minilora.layers import lora_scale

    rng = np.random.default_rng(seed)
    num, dim, r = spec["num"], spec["dim"], spec["rank"]
    a = {"ids": rng.integers(0, num, size=spec["lead"]).astype(np.float64), "W": _grid(rng, (num, dim)),
         "A": _grid(rng, (r, num)), "B": _grid(rng, (dim, r)), "g": _grid(rng, (*spec["lead"], dim))}
    rslora = spec.get("rslora", False)
    o = {"alpha": spec["alpha"], "rank": r, "rslora": rslora, "scale": lora_scale(spec["alpha"], r, rslora=rslora),
         "fan_in_fan_out": False}
    return a, o


def variant_groups() -> list[tuple[dict, dict]]:
    """(group, tensors) of the dora and embedding groups."""
    from minilora.testing.variant_bounds import dora_bounds, embedding_bounds

    return [
        _group("dora", "DoRA: forward, gradients of sum(y * g) (the magnitude's included), merge",
               ("dora_dense", "dora_dense_vjp", "dora_merge"), DORA_VECTOR_CASES, _dora_case,
               lambda a, o, dt: dora_bounds(_dora_problem(a, o), dtype=dt), 5000),
        _group("embedding", "LoRA on an embedding table: forward, gradients of sum(y * g), merge",
               ("embedding", "embedding_vjp", "embedding_merge"), EMBEDDING_VECTOR_CASES, _embedding_case,
               lambda a, o, dt: embedding_bounds(_embedding_problem(a, o), dtype=dt), 6000),
    ]
