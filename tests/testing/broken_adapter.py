"""Deliberately broken adapters for tests/testing/test_check.py: ``minilora check`` must catch each.

Every class is the plain-torch adapter with one classic LoRA bug (or a broken contract):
the checker must report the property that fails and name its worst element.
"""

from __future__ import annotations

from typing import Any

from minilora.testing.adapters.torch_adapter import TorchAdapter


class WrongScale(TorchAdapter):
    """Scales by alpha instead of alpha / r (the bug rsLoRA-style code and ports make): wrong
    forward, gradients and merge, while the unmerge round trip still cancels exactly."""

    name = "wrong-scale"


    def _lora(self, p: Any, t: dict) -> Any:
        F = self.torch.nn.functional
        xm = t["x"] if t["mask"] is None else t["x"] * t["mask"]
        return F.linear(t["x"], self._weight(p, t["W"]), t["b"]) + F.linear(F.linear(xm, t["A"]), t["B"]) * p.alpha

    def _delta(self, p: Any, t: dict) -> Any:
        delta = (t["B"] @ t["A"]) * p.alpha
        return delta.T if p.fan_in_fan_out else delta


class DroppedBias(TorchAdapter):
    """Forgets the bias in the forward pass (but not in the merged layer)."""

    name = "dropped-bias"

    def _lora(self, p: Any, t: dict) -> Any:
        return super()._lora(p, {**t, "b": None})


class TransposedB(TorchAdapter):
    """Reads B's memory in the wrong order (B stored (r, d_out) but viewed as (d_out, r)), a
    layout bug of hand-written kernels; harmless only when r = 1 or d_out = 1. The merge path
    is left correct."""

    name = "transposed-b"

    def _lora(self, p: Any, t: dict) -> Any:
        B = t["B"]
        return super()._lora(p, {**t, "B": B.T.reshape(B.shape)})


class NoMergeTranspose(TorchAdapter):
    """Merges B A without transposing it for fan_in_fan_out (a bug in merge only)."""

    name = "no-merge-transpose"

    def _delta(self, p: Any, t: dict) -> Any:
        delta = (t["B"] @ t["A"]) * p.scale
        return delta.reshape(delta.T.shape) if p.fan_in_fan_out else delta


class AdamWithoutBiasCorrection(TorchAdapter):
    """An Adam without bias correction: fine in forward, wrong in the optimizer."""

    name = "adam-no-bias-correction"

    def adam(self, problem: Any) -> dict:
        import numpy as np

        o = problem.options
        b1, b2 = o["betas"]
        params = {k: np.array(v) for k, v in problem.params.items()}
        m = {k: np.zeros_like(v) for k, v in params.items()}
        v = {k: np.zeros_like(a) for k, a in params.items()}
        for g in problem.grads:
            for k in params:
                if o.get("decoupled"):
                    params[k] = params[k] * (1 - o["lr"] * o["weight_decay"])
                m[k] = b1 * m[k] + (1 - b1) * g[k]
                v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
                params[k] = params[k] - o["lr"] * m[k] / (np.sqrt(v[k]) + o["eps"])
        return params


class Crashes(TorchAdapter):
    """Raises in forward: reported as ERROR with the exception, not a traceback."""

    name = "crashes"

    def forward(self, problem: Any) -> Any:
        raise RuntimeError("this adapter always crashes")


class MissingMethods:
    """Has a forward only: the target is refused before anything runs."""

    def forward(self, problem: Any) -> Any:
        return problem.x


class Float64Only(TorchAdapter):
    """A correct adapter that declares a single dtype (the pytest suite parametrizes by it)."""

    dtypes = ("float64",)
