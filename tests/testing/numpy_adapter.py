"""A correct adapter written with minilora itself (float64, rounded to the problem's dtype at the
end): the fast stand-in for the protocol tests of tests/testing/test_protocol.py, no torch needed.
Subclasses break the protocol in one way each."""

from __future__ import annotations

from typing import Any

import numpy as np

import minilora as ml
from minilora.testing import round_to
from minilora.variants import dora_dense, dora_merge, dora_unmerge, embedding_merge, lora_embedding


class NumpyAdapter:
    name = "numpy"
    dtypes = ("float64", "float32")

    def _kw(self, p: Any) -> dict:
        return dict(scale=p.scale, fan_in_fan_out=p.fan_in_fan_out)

    def forward(self, p: Any) -> Any:
        return round_to(ml.lora_dense(p.params, p.lora, p.x, dropout_mask=p.mask, **self._kw(p)), p.dtype)

    def grads(self, p: Any) -> dict:
        def loss(x: Any, lora: dict) -> Any:
            return (ml.lora_dense(p.params, lora, x, dropout_mask=p.mask, **self._kw(p)) * p.cotangent).sum()

        gx, gl = ml.grad(loss, argnum=(0, 1))(p.x, p.lora)
        return {"x": round_to(gx, p.dtype), "A": round_to(gl["A"], p.dtype), "B": round_to(gl["B"], p.dtype)}

    def merge(self, p: Any) -> dict:
        W = ml.merge(p.params, p.lora, **self._kw(p))["W"]
        params = {**p.params, "W": W}
        y = ml.lora_dense(params, {"A": 0 * p.A, "B": 0 * p.B}, p.x, **self._kw(p))
        return {"W": round_to(W, p.dtype), "y": round_to(y, p.dtype)}

    def unmerge(self, p: Any) -> Any:
        return p.W.copy()

    def adam(self, p: Any) -> dict:
        params = p.params
        state = ml.adam_init(params, amsgrad=p.options.get("amsgrad", False))
        for g in p.grads:
            params, state = ml.adam_step(params, g, state, **p.options)
        return {k: round_to(v, p.dtype) for k, v in params.items()}

    # the variants, with minilora's own (rounded to the dtype at the end)

    def dora_forward(self, p: Any) -> Any:
        return round_to(dora_dense(p.params, p.lora, p.magnitude, p.x, dropout_mask=p.mask, **self._kw(p)), p.dtype)

    def dora_grads(self, p: Any) -> dict:
        def loss(x: Any, lora: dict, m: Any) -> Any:
            return (dora_dense(p.params, lora, m, x, dropout_mask=p.mask, **self._kw(p)) * p.cotangent).sum()

        gx, gl, gm = ml.grad(loss, argnum=(0, 1, 2))(p.x, p.lora, p.magnitude)
        return {k: round_to(v, p.dtype) for k, v in (("x", gx), ("A", gl["A"]), ("B", gl["B"]), ("m", gm))}

    def dora_merge(self, p: Any) -> dict:
        merged, _ = dora_merge(p.params, p.lora, p.magnitude, **self._kw(p))
        return {"W": round_to(merged["W"], p.dtype), "y": round_to(ml.dense(merged, p.x, fan_in_fan_out=p.fan_in_fan_out),
                                                                    p.dtype)}

    def dora_unmerge(self, p: Any) -> Any:
        merged, norm = dora_merge(p.params, p.lora, p.magnitude, **self._kw(p))
        return round_to(dora_unmerge(merged, p.lora, p.magnitude, norm, **self._kw(p))["W"], p.dtype)

    def embedding_forward(self, p: Any) -> Any:
        return round_to(lora_embedding({"W": p.W}, {"A": p.A, "B": p.B}, p.ids, scale=p.scale), p.dtype)

    def embedding_grads(self, p: Any) -> dict:
        def loss(lora: dict) -> Any:
            return (lora_embedding({"W": p.W}, lora, p.ids, scale=p.scale) * p.cotangent).sum()

        g = ml.grad(loss)({"A": p.A, "B": p.B})
        return {k: round_to(g[k], p.dtype) for k in ("A", "B")}

    def embedding_merge(self, p: Any) -> dict:
        W = embedding_merge({"W": p.W}, {"A": p.A, "B": p.B}, scale=p.scale)["W"]
        return {"W": round_to(W, p.dtype), "y": round_to(W[p.ids], p.dtype)}

    def trainable(self, p: Any) -> set[str]:
        out = set()
        for name, _, _, bias in p.layers:
            lora = name in p.targets
            out |= {f"{name}.A", f"{name}.B"} | ({f"{name}.m"} if p.dora else set()) if lora else set()
            if bias and (p.bias == "all" or (p.bias == "lora_only" and lora)):
                out.add(f"{name}.b")
        return out


class NoVariants(NumpyAdapter):
    """Plain LoRA only: every DoRA, embedding and trainable row is n/a."""

    dora_forward = dora_grads = dora_merge = dora_unmerge = None  # type: ignore[assignment]
    embedding_forward = embedding_grads = embedding_merge = trainable = None  # type: ignore[assignment]


class NoMerge(NumpyAdapter):
    """An implementation without merge or unmerge (a training-only layer)."""

    merge = None  # type: ignore[assignment]
    unmerge = None  # type: ignore[assignment]


class NoAmsgradNoL2(NumpyAdapter):
    """An optimizer without amsgrad and L2 decay (optax.adamw, say): those cases are not covered."""

    optimizer_features = ("decoupled", "maximize")


class WrongShapes(NumpyAdapter):
    """forward drops the last column: a failure row naming the output, not a crash."""

    def forward(self, p: Any) -> Any:
        return super().forward(p)[..., :-1]


class RaisesOnSquare(NumpyAdapter):
    """Raises on square layers only: those cases fail, the row is FAIL, not ERROR."""

    def forward(self, p: Any) -> Any:
        if p.d_in == p.d_out:
            raise RuntimeError("square layers are not supported")
        return super().forward(p)


class NoUpdate(NumpyAdapter):
    """Returns the parameters unchanged: a check that cannot tell an update from none checks nothing."""

    dtypes = ("float64", "float32", "bfloat16")

    def adam(self, p: Any) -> dict:
        return {k: np.array(v) for k, v in p.params.items()}
