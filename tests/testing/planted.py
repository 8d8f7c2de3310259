"""Planted bugs and honest variants for the self-test of ``minilora check`` (tests/testing/
test_planted.py and benchmarks/planted_bugs.py).

``BUGS``: the plain-torch adapter with one realistic bug each, and the properties where it must
show. Bugs that keep every shape right only on square layers (A and B swapped, fan_in_fan_out
ignored, a merge without the transpose) are written that way: correct elsewhere, so only a
square case can find them. ``HONEST``: correct adapters written differently (other orders of
operations, a hand-written Adam, the merged weight in the forward pass); they must pass.
"""

from __future__ import annotations

import math
from typing import Any

from planted_variants import VARIANT_BUGS, VARIANT_HONEST

from minilora.testing.adapters.torch_adapter import TorchAdapter


class _Layer(TorchAdapter):
    """The torch adapter with hooks for the scale, the branch and the merge delta."""

    def scale(self, p: Any) -> float:
        return p.scale

    def _lora(self, p: Any, t: dict) -> Any:
        F = self.torch.nn.functional
        xm = t["x"] if t["mask"] is None else t["x"] * t["mask"]
        return F.linear(t["x"], self._weight(p, t["W"]), t["b"]) + self.branch(p, t, xm) * self.scale(p)

    def branch(self, p: Any, t: dict, xm: Any) -> Any:
        F = self.torch.nn.functional
        return F.linear(F.linear(xm, t["A"]), t["B"])

    def _delta(self, p: Any, t: dict) -> Any:
        delta = (t["B"] @ t["A"]) * self.scale(p)
        return delta.T if p.fan_in_fan_out else delta


class ScaleAlpha(_Layer):
    def scale(self, p: Any) -> float:
        return p.alpha  # alpha, not alpha / r


class RsloraIgnored(_Layer):
    def scale(self, p: Any) -> float:
        return p.alpha / p.rank  # alpha / r even with rslora


class RsloraAlways(_Layer):
    def scale(self, p: Any) -> float:
        return p.alpha / math.sqrt(p.rank)


class TransposedA(_Layer):
    def branch(self, p: Any, t: dict, xm: Any) -> Any:
        A = t["A"]
        return super().branch(p, {**t, "A": A.T.reshape(A.shape)}, xm)


class TransposedB(_Layer):
    def branch(self, p: Any, t: dict, xm: Any) -> Any:
        B = t["B"]
        return super().branch(p, {**t, "B": B.T.reshape(B.shape)}, xm)


class SwappedAB(_Layer):
    """x B A instead of x A^T B^T: shapes fit only on square layers (elsewhere it is right)."""

    def branch(self, p: Any, t: dict, xm: Any) -> Any:
        if p.d_in != p.d_out:
            return super().branch(p, t, xm)
        return (xm @ t["B"]) @ t["A"]


class FanInFanOutIgnored(_Layer):
    def _weight(self, p: Any, W: Any) -> Any:
        return W.T if p.fan_in_fan_out and p.d_in != p.d_out else W


class MergeWithoutTranspose(_Layer):
    def _delta(self, p: Any, t: dict) -> Any:
        delta = (t["B"] @ t["A"]) * self.scale(p)
        return delta.T if p.fan_in_fan_out and p.d_in != p.d_out else delta


class DropoutIgnored(_Layer):
    def _lora(self, p: Any, t: dict) -> Any:
        return super()._lora(p, {**t, "mask": None})


class DropoutOnBase(_Layer):
    def _lora(self, p: Any, t: dict) -> Any:
        if t["mask"] is None:
            return super()._lora(p, t)
        return super()._lora(p, {**t, "x": t["x"] * t["mask"]})


class BiasDropped(_Layer):
    def _lora(self, p: Any, t: dict) -> Any:
        return super()._lora(p, {**t, "b": None})


class BiasTwiceInMerge(_Layer):
    def merge(self, problem: Any) -> dict:
        out = super().merge(problem)
        if problem.b is not None:
            out["y"] = out["y"] + problem.b
        return out


class PrecisionLie(_Layer):
    """Declares float32 LoRA factors under a bfloat16/float16 base, computes them in the base's dtype."""

    precision = {dt: {"adapter": "float32", "accumulate": "float32"} for dt in ("float16", "bfloat16")}


class _Adam(TorchAdapter):
    """Adam written out in torch, in the problem's dtype, with switches for one bug each."""

    l2 = "right"  # "ignored" | "decoupled" (AdamW's decay under Adam)
    eps_mode = "right"  # "dropped" | "fixed" (1e-8 whatever is asked) | "inside" (sqrt(v_hat + eps))
    maximize_honoured = True
    bias_correction = True

    def adam(self, problem: Any) -> dict:
        torch = self.torch
        o = problem.options
        lr, (b1, b2), eps, wd = o["lr"], o["betas"], o["eps"], o["weight_decay"]
        with self.one_thread():
            ps = {k: self.tensor(v, problem.dtype) for k, v in problem.params.items()}
            m = {k: torch.zeros_like(v) for k, v in ps.items()}
            v = {k: torch.zeros_like(a) for k, a in ps.items()}
            vmax = {k: torch.zeros_like(a) for k, a in ps.items()}
            for t, grads in enumerate(problem.grads, start=1):
                for k in ps:
                    g = self.tensor(grads[k], problem.dtype)
                    if o.get("maximize") and self.maximize_honoured:
                        g = -g
                    if o["decoupled"] or (wd and self.l2 == "decoupled"):
                        ps[k] = ps[k] * (1 - lr * wd)
                    elif wd and self.l2 == "right":
                        g = g + wd * ps[k]
                    m[k] = b1 * m[k] + (1 - b1) * g
                    v[k] = b2 * v[k] + (1 - b2) * g * g
                    vv = v[k]
                    if o.get("amsgrad"):
                        vmax[k] = torch.maximum(vmax[k], v[k])
                        vv = vmax[k]
                    c1 = 1 - b1**t if self.bias_correction else 1.0
                    c2 = 1 - b2**t if self.bias_correction else 1.0
                    e = {"right": eps, "dropped": 0.0, "fixed": 1e-8, "inside": 0.0}[self.eps_mode]
                    inner = vv / c2 + (eps if self.eps_mode == "inside" else 0.0)
                    ps[k] = ps[k] - (lr / c1) * m[k] / (torch.sqrt(inner) + e)
            return {k: self.host(a) for k, a in ps.items()}


class AdamL2Ignored(_Adam):
    l2 = "ignored"


class AdamL2Decoupled(_Adam):
    l2 = "decoupled"


class AdamEpsDropped(_Adam):
    eps_mode = "dropped"


class AdamEpsFixed(_Adam):
    eps_mode = "fixed"


class AdamEpsInsideSqrt(_Adam):
    eps_mode = "inside"


class AdamMaximizeIgnored(_Adam):
    maximize_honoured = False


class AdamNoBiasCorrection(_Adam):
    bias_correction = False


class _Init(TorchAdapter):
    factor = 1.0

    def init(self, d_in: int, d_out: int, rank: int, init: str, seed: int) -> dict:
        out = super().init(d_in, d_out, rank, init, seed)
        return {**out, "A": out["A"] * (self.factor if init == self.which else 1.0)}


class KaimingNarrow(_Init):
    which, factor = "kaiming", 0.9


class GaussianWide(_Init):
    which, factor = "gaussian", 1.07


LAYER = {"forward", "grad_x", "grad_A", "grad_B"}
BUGS: dict[type, set[str]] = {
    ScaleAlpha: LAYER | {"merge", "merged_forward"},
    RsloraIgnored: LAYER | {"merge", "merged_forward"},
    RsloraAlways: LAYER | {"merge", "merged_forward"},
    TransposedA: LAYER,
    TransposedB: LAYER,
    SwappedAB: LAYER,
    FanInFanOutIgnored: {"forward", "grad_x", "merged_forward"},
    MergeWithoutTranspose: {"merge", "merged_forward"},
    DropoutIgnored: LAYER,
    DropoutOnBase: {"forward", "grad_x"},
    BiasDropped: {"forward"},
    BiasTwiceInMerge: {"merged_forward"},
    PrecisionLie: {"grad_A", "grad_B"},
    AdamL2Ignored: {"adam"},
    AdamL2Decoupled: {"adam"},
    AdamEpsDropped: {"adam"},
    AdamEpsFixed: {"adam"},
    AdamEpsInsideSqrt: {"adam"},
    AdamMaximizeIgnored: {"adam"},
    AdamNoBiasCorrection: {"adam"},
    KaimingNarrow: {"init"},
    GaussianWide: {"init"},
    **VARIANT_BUGS,  # DoRA, embedding, trainable set (planted_variants.py)
}
# dtypes where a bug is no larger than the rounding: PrecisionLie shows only where the declared
# float32 differs from the base dtype
ONLY_IN = {PrecisionLie: {"float16", "bfloat16"}}


# ---------------------------------------------------------------- honest, differently written


class ScaleFirst(_Layer):
    """s applied to A before the products: s ((x m) (s A)^T) B^T."""

    def _lora(self, p: Any, t: dict) -> Any:
        F = self.torch.nn.functional
        xm = t["x"] if t["mask"] is None else t["x"] * t["mask"]
        return F.linear(t["x"], self._weight(p, t["W"]), t["b"]) + F.linear(F.linear(xm, t["A"] * p.scale), t["B"])

    def _delta(self, p: Any, t: dict) -> Any:
        delta = (t["B"] * p.scale) @ t["A"]
        return delta.T if p.fan_in_fan_out else delta


class Einsum(_Layer):
    def branch(self, p: Any, t: dict, xm: Any) -> Any:
        return self.torch.einsum("...i,ri,or->...o", xm, t["A"], t["B"])


class MergedForward(_Layer):
    """Without dropout, the forward pass through the merged weight (W + s B A)."""

    def _lora(self, p: Any, t: dict) -> Any:
        if t["mask"] is not None:
            return super()._lora(p, t)
        F = self.torch.nn.functional
        return F.linear(t["x"], self._weight(p, t["W"] + self._delta(p, t)), t["b"])


class HandAdam(_Adam):
    """Adam/AdamW written out in torch (the planted Adam bugs' correct sibling)."""


HONEST = (TorchAdapter, ScaleFirst, Einsum, MergedForward, HandAdam, *VARIANT_HONEST)
