"""The loralib adapter: ``loralib.Linear`` (microsoft/LoRA), merging on ``eval()`` and
unmerging on ``train()`` (its ``merge_weights=True`` default).

loralib's scaling is lora_alpha / r and it has no rsLoRA; an rsLoRA problem is given to it as
lora_alpha = alpha * sqrt(r), which is the same scale. With fan_in_fan_out it stores the weight
(d_in, d_out), as the problem does. Its dropout (an ``nn.Dropout`` attribute) is replaced by a
module applying the problem's fixed mask. Before the optimizer runs,
``loralib.mark_only_lora_as_trainable`` freezes everything else, as its README says to.

Variants: ``loralib.Embedding`` (its lora_A (r, num), lora_B (dim, r), merged on ``eval()``) and
the trainable set (``loralib.Linear`` on the targets, ``nn.Linear`` elsewhere, then
``mark_only_lora_as_trainable(model, bias=...)``, whose "none" / "all" / "lora_only" follow the
same rules as PEFT's). loralib has no DoRA: those rows are "n/a".
"""

from __future__ import annotations

import math
from typing import Any

from minilora.testing.adapters.torch_adapter import EmbeddingLayerAdapter

__all__ = ["LoralibAdapter"]


class LoralibAdapter(EmbeddingLayerAdapter):
    """LoRA as loralib does it: ``loralib.Linear(d_in, d_out, r, lora_alpha, ...)``."""

    name = "loralib"
    inits = ("kaiming",)

    def __init__(self) -> None:
        super().__init__()
        import loralib

        self.loralib = loralib

    def versions(self) -> dict[str, str]:
        from importlib.metadata import PackageNotFoundError, version

        try:
            mine = version("loralib")
        except PackageNotFoundError:
            mine = "unknown"
        return {"loralib": mine, "torch": self.torch.__version__}

    def _layer(self, *, d_in: int, d_out: int, rank: int, alpha: float, rslora: bool = False,
               fif: bool = False, bias: bool = True, dropout: float | None = None, dtype: str) -> Any:
        lora_alpha = alpha * math.sqrt(rank) if rslora else alpha  # alpha sqrt(r) / r = alpha / sqrt(r)
        layer = self.loralib.Linear(d_in, d_out, r=rank, lora_alpha=lora_alpha,
                                    lora_dropout=0.0 if dropout is None else dropout,
                                    fan_in_fan_out=fif, merge_weights=True, bias=bias)
        return layer.to(self.tdtype(dtype))

    def _problem_layer(self, p: Any) -> Any:
        layer = self._layer(d_in=p.d_in, d_out=p.d_out, rank=p.rank, alpha=p.alpha, rslora=p.rslora,
                            fif=p.fan_in_fan_out, bias=p.b is not None, dropout=p.dropout, dtype=p.dtype)
        dt = self.tdtype(p.dtype)
        with self.torch.no_grad():
            layer.weight.copy_(self.tensor(p.W, dt))  # (d_in, d_out) with fan_in_fan_out, as p.W
            if p.b is not None:
                layer.bias.copy_(self.tensor(p.b, dt))
            layer.lora_A.copy_(self.tensor(p.A, dt))
            layer.lora_B.copy_(self.tensor(p.B, dt))
        if p.mask is not None:
            layer.lora_dropout = self.fixed_mask(p.mask)
        layer.train()  # unmerged
        return layer

    def _factor_grads(self, layer: Any) -> tuple[Any, Any]:
        return self.host(layer.lora_A.grad), self.host(layer.lora_B.grad)

    def merge(self, problem: Any) -> dict:
        with self.one_thread(), self.torch.no_grad():
            layer = self._problem_layer(problem)
            layer.eval()  # merges W += T(B A) * scaling
            if not layer.merged:
                raise RuntimeError("loralib.Linear did not merge on eval()")
            y = layer(self.tensor(problem.x, problem.dtype))
            return {"W": self.host(layer.weight), "y": self.host(y)}

    def unmerge(self, problem: Any) -> Any:
        with self.one_thread(), self.torch.no_grad():
            layer = self._problem_layer(problem)
            layer.eval()
            layer.train()  # unmerges W -= T(B A) * scaling
            if layer.merged:
                raise RuntimeError("loralib.Linear did not unmerge on train()")
            return self.host(layer.weight)

    def adam(self, problem: Any) -> dict:
        d_out, rank = problem.B.shape
        with self.one_thread():
            layer = self._layer(d_in=problem.A.shape[1], d_out=d_out, rank=rank, alpha=problem.alpha,
                                dtype=problem.dtype)
            with self.torch.no_grad():
                layer.lora_A.copy_(self.tensor(problem.A, layer.lora_A.dtype))
                layer.lora_B.copy_(self.tensor(problem.B, layer.lora_B.dtype))
            self.loralib.mark_only_lora_as_trainable(layer)
            trainable = [p for p in layer.parameters() if p.requires_grad]
            if len(trainable) != 2:
                raise RuntimeError(f"loralib left {len(trainable)} trainable parameters; expected lora_A and lora_B")
            return self.run_adam([layer.lora_A, layer.lora_B], ["A", "B"], problem)

    def init(self, d_in: int, d_out: int, rank: int, init: str, seed: int) -> dict:
        with self.one_thread(), self.seeded(seed):
            layer = self._layer(d_in=d_in, d_out=d_out, rank=rank, alpha=rank, dtype="float32")
            return {"A": self.host(layer.lora_A), "B": self.host(layer.lora_B)}

    # ------------------------------------------------------------ variants

    def _embedding(self, p: Any) -> Any:
        lora_alpha = p.alpha * math.sqrt(p.rank) if p.rslora else p.alpha
        layer = self.loralib.Embedding(p.num_embeddings, p.dim, r=p.rank, lora_alpha=lora_alpha, merge_weights=True)
        layer = layer.to(self.tdtype(p.dtype))
        with self.torch.no_grad():
            for name, value in (("weight", p.W), ("lora_A", p.A), ("lora_B", p.B)):
                getattr(layer, name).copy_(self.tensor(value, layer.weight.dtype))
        layer.train()
        return layer

    def _ids(self, p: Any) -> Any:
        return self.torch.from_numpy(p.ids.copy())

    def _embedding_factor_grads(self, layer: Any) -> tuple[Any, Any]:
        return self.host(layer.lora_A.grad), self.host(layer.lora_B.grad)

    def embedding_merge(self, problem: Any) -> dict:
        with self.one_thread(), self.torch.no_grad():
            layer = self._embedding(problem)
            layer.eval()  # merges W += (B A)^T * scaling
            if not layer.merged:
                raise RuntimeError("loralib.Embedding did not merge on eval()")
            return {"W": self.host(layer.weight), "y": self.host(layer(self._ids(problem)))}

    def trainable(self, problem: Any) -> set[str]:
        nn: Any = self.torch.nn
        model = nn.Module()
        for name, d_in, d_out, bias in problem.layers:
            if name in problem.targets:
                layer = self.loralib.Linear(d_in, d_out, r=problem.rank, lora_alpha=problem.alpha, bias=bias)
            else:
                layer = nn.Linear(d_in, d_out, bias=bias)
            model.add_module(name, layer)
        self.loralib.mark_only_lora_as_trainable(model, bias=problem.bias)
        kinds = {"weight": "W", "bias": "b", "lora_A": "A", "lora_B": "B"}
        out = set()
        for full, param in model.named_parameters():
            layer_name, _, rest = full.partition(".")
            if param.requires_grad:
                if rest not in kinds:
                    raise RuntimeError(f"loralib trains a parameter this adapter cannot name: {full}")
                out.add(f"{layer_name}.{kinds[rest]}")
        return out
