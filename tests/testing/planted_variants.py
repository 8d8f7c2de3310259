"""Planted bugs and honest variants of the DoRA, embedding and trainable-set properties (merged
into ``planted.BUGS`` / ``planted.HONEST``): the plain-torch adapter with one realistic bug each.

Bugs that keep every shape right only on square layers (a norm over the wrong axis, a merge
without the transpose) are written that way, correct elsewhere, so only a square case finds them.
"""

from __future__ import annotations

from typing import Any

from minilora.testing.adapters.torch_adapter import TorchAdapter


class DoraBiasScaled(TorchAdapter):
    """The issue's bug: the bias scaled by c = m / ||W + s B A|| in the forward pass (the bias
    inside the base layer's output that DoRA rescales), but not in the merged weight and bias."""

    def _dora(self, p: Any, t: dict) -> Any:
        F = self.torch.nn.functional
        c = t["m"] / self.dora_norm(p, t)
        xm = t["x"] if t["mask"] is None else t["x"] * t["mask"]
        lora = F.linear(F.linear(xm, t["A"]), t["B"]) * p.scale
        return c * (F.linear(t["x"], t["W_oi"], t["b"]) + lora)


class DoraNormWrongAxis(TorchAdapter):
    """||W + s B A|| over the columns (per input) instead of the rows; where the shapes forbid it
    (d_in != d_out) it is right, so only the square cases can find it."""

    def dora_norm(self, p: Any, t: dict) -> Any:
        V = t["W_oi"] + (t["B"] @ t["A"]) * p.scale
        axis = 0 if p.d_in == p.d_out else 1
        return self.torch.linalg.norm(V, dim=axis).detach()


class DoraMagnitudeDetached(TorchAdapter):
    """m used as a constant in the forward pass: its gradient is lost (reported as zeros)."""

    def dora_grads(self, problem: Any) -> dict:
        with self.one_thread():
            t = self._dora_tensors(problem, grad=True)
            m = t["m"]
            y = self._dora(problem, {**t, "m": m.detach()})
            y.backward(self.tensor(problem.cotangent, y.dtype))
            out = {k: self.host(t[k].grad) for k in ("x", "A", "B")}
            return {**out, "m": self.host(self.torch.zeros_like(m))}


class EmbeddingScaleIgnored(TorchAdapter):
    """y = W[ids] + A^T[ids] B^T: the scale alpha / r forgotten (in the merge too)."""

    def _embedding(self, p: Any, t: dict) -> Any:
        F = self.torch.nn.functional
        return F.embedding(t["ids"], t["W"]) + F.embedding(t["ids"], t["A"].T) @ t["B"].T

    def embedding_merge(self, problem: Any) -> dict:
        F = self.torch.nn.functional
        with self.one_thread(), self.torch.no_grad():
            t = self._embedding_tensors(problem)
            W = t["W"] + (t["B"] @ t["A"]).T
            return {"W": self.host(W), "y": self.host(F.embedding(t["ids"], W))}


class EmbeddingMergeWithoutTranspose(TorchAdapter):
    """W + s B A merged into the table without the transpose (fits only a square table)."""

    def embedding_merge(self, problem: Any) -> dict:
        if problem.num_embeddings != problem.dim:
            return super().embedding_merge(problem)
        F = self.torch.nn.functional
        with self.one_thread(), self.torch.no_grad():
            t = self._embedding_tensors(problem)
            W = t["W"] + (t["B"] @ t["A"]) * problem.scale
            return {"W": self.host(W), "y": self.host(F.embedding(t["ids"], W))}


class EmbeddingTransposedA(TorchAdapter):
    """The rows of A^T gathered from A reshaped, not transposed (a layout slip, shapes kept)."""

    def _embedding(self, p: Any, t: dict) -> Any:
        F = self.torch.nn.functional
        A_T = t["A"].reshape(t["A"].shape[1], t["A"].shape[0])
        return F.embedding(t["ids"], t["W"]) + (F.embedding(t["ids"], A_T) @ t["B"].T) * p.scale


class TrainableBiasUnderNone(TorchAdapter):
    """bias="none" read as "lora_only": the LoRA layers' biases train."""

    def trainable(self, problem: Any) -> set[str]:
        from dataclasses import replace

        if problem.bias == "none":
            problem = replace(problem, bias="lora_only")
        return super().trainable(problem)


class TrainableAllAsLoraOnly(TorchAdapter):
    """bias="all" read as "lora_only": the biases of layers without LoRA stay frozen."""

    def trainable(self, problem: Any) -> set[str]:
        from dataclasses import replace

        if problem.bias == "all":
            problem = replace(problem, bias="lora_only")
        return super().trainable(problem)


# ---------------------------------------------------------------- honest, differently written


class DoraThroughMergedWeight(TorchAdapter):
    """Without dropout, the DoRA forward pass through the merged weight c (W + s B A)."""

    def _dora(self, p: Any, t: dict) -> Any:
        if t["mask"] is not None:
            return super()._dora(p, t)
        F = self.torch.nn.functional
        W, _ = self._dora_merged(p, t)
        return F.linear(t["x"], W, t["b"])


class EmbeddingOneHot(TorchAdapter):
    """The embedding as one-hot products: y = P W + s (P A^T) B^T."""

    def _embedding(self, p: Any, t: dict) -> Any:
        P = self.torch.nn.functional.one_hot(t["ids"], p.num_embeddings).to(t["W"].dtype)
        return P @ t["W"] + ((P @ t["A"].T) @ t["B"].T) * p.scale


DORA = {"dora_forward", "dora_grad_x", "dora_grad_A", "dora_grad_B", "dora_grad_m"}
VARIANT_BUGS: dict[type, set[str]] = {
    DoraBiasScaled: {"dora_forward", "dora_grad_m"},
    DoraNormWrongAxis: DORA | {"dora_merge", "dora_merged_forward"},
    DoraMagnitudeDetached: {"dora_grad_m"},
    EmbeddingScaleIgnored: {"embedding_forward", "embedding_grad_A", "embedding_grad_B", "embedding_merge",
                            "embedding_merged_forward"},
    EmbeddingMergeWithoutTranspose: {"embedding_merge", "embedding_merged_forward"},
    EmbeddingTransposedA: {"embedding_forward", "embedding_grad_A", "embedding_grad_B"},
    TrainableBiasUnderNone: {"trainable"},
    TrainableAllAsLoraOnly: {"trainable"},
}
VARIANT_HONEST = (DoraThroughMergedWeight, EmbeddingOneHot)
