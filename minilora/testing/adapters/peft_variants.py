"""The variant methods of the PEFT adapter: DoRA (``LoraConfig(use_dora=True)``), LoRA on an
``nn.Embedding`` target, and the trainable set under ``bias="none" | "all" | "lora_only"``,
each through ``peft.get_peft_model`` as a user would.

DoRA: the problem's A, B and magnitude are copied into ``lora_A/lora_B.default.weight`` and
``lora_magnitude_vector.default.weight`` (PEFT initialises m to the row norm; the problem's m is
off it, as after training), the dropout replaced by the problem's fixed mask (a module that is
not ``nn.Identity``, so PEFT takes its training path and recomputes the base on the dropped
input). Merging through ``merge_and_unload``, the round trip through ``merge_adapter`` and
``unmerge_adapter`` (which divides by the norm cached at merge time). Embedding: the factors are
``lora_embedding_A.default`` (r, num) and ``lora_embedding_B.default`` (dim, r). The trainable
set reads ``requires_grad`` of every named parameter and maps PEFT's names
(``fc1.base_layer.bias``, ``fc1.lora_A.default.weight``, ``fc1.lora_magnitude_vector.default.weight``,
...) to "<layer>.<kind>"; a name it does not know fails the case.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

__all__ = ["PeftVariants", "quiet"]


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """PEFT warns about things that do not apply here (merging a model it just made, ...)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# PEFT's parameter name (after the module name) -> the kind in a trainable set
_KINDS = {"base_layer.weight": "W", "base_layer.bias": "b", "weight": "W", "bias": "b",
          "lora_A.default.weight": "A", "lora_B.default.weight": "B", "lora_magnitude_vector.default.weight": "m"}


class PeftVariants:
    """Mixin for the PEFT adapter (uses its ``_build``, ``tensor``, ``host``, ``one_thread``, ``peft``)."""

    torch: Any
    peft: Any
    if TYPE_CHECKING:  # provided by PeftAdapter / TorchBase
        def tensor(self, a: Any, dtype: Any, requires_grad: bool = False) -> Any: ...

        def host(self, t: Any) -> Any: ...

        def one_thread(self) -> Any: ...

        def fixed_mask(self, mask: Any) -> Any: ...

        def _build(self, *, d_in: int, d_out: int, rank: int, alpha: float, rslora: bool, fif: bool,
                   dtype: str, W: Any = None, b: Any = None, dropout: float | None = None,
                   init: str = "kaiming", dora: bool = False) -> tuple[Any, Any]: ...

    # ------------------------------------------------------------ DoRA

    def _dora_model(self, p: Any) -> tuple[Any, Any, dict]:
        with quiet():
            model, layer = self._build(d_in=p.d_in, d_out=p.d_out, rank=p.rank, alpha=p.alpha, rslora=p.rslora,
                                       fif=p.fan_in_fan_out, dtype=p.dtype, W=p.W, b=p.b, dropout=p.dropout,
                                       dora=True)
        params = {"A": layer.lora_A["default"].weight, "B": layer.lora_B["default"].weight,
                  "m": layer.lora_magnitude_vector["default"].weight}
        with self.torch.no_grad():
            for key, value in (("A", p.A), ("B", p.B), ("m", p.magnitude)):
                params[key].copy_(self.tensor(value, params[key].dtype))
        if p.mask is not None:
            layer.lora_dropout["default"] = self.fixed_mask(p.mask)
        return model, layer, params

    def dora_forward(self, problem: Any) -> Any:
        with self.one_thread(), self.torch.no_grad(), quiet():
            model, _, _ = self._dora_model(problem)
            return self.host(model(self.tensor(problem.x, problem.dtype)))

    def dora_grads(self, problem: Any) -> dict:
        with self.one_thread(), quiet():
            model, _, params = self._dora_model(problem)
            x = self.tensor(problem.x, problem.dtype, requires_grad=True)
            y = model(x)
            y.backward(self.tensor(problem.cotangent, y.dtype))
            return {"x": self.host(x.grad), **{k: self.host(v.grad) for k, v in params.items()}}

    def dora_merge(self, problem: Any) -> dict:
        with self.one_thread(), self.torch.no_grad(), quiet():
            model, _, _ = self._dora_model(problem)
            merged = model.merge_and_unload()
            y = merged(self.tensor(problem.x, problem.dtype))
            return {"W": self.host(merged.layer.weight), "y": self.host(y)}

    def dora_unmerge(self, problem: Any) -> Any:
        with self.one_thread(), self.torch.no_grad(), quiet():
            model, layer, _ = self._dora_model(problem)
            model.merge_adapter()
            model.unmerge_adapter()
            return self.host(layer.base_layer.weight)

    # ------------------------------------------------------------ embedding

    def _embedding_model(self, p: Any) -> tuple[Any, Any, Any]:
        nn: Any = self.torch.nn

        class OneEmbedding(nn.Module):
            def __init__(self, layer: Any) -> None:
                super().__init__()
                self.layer = layer

            def forward(self, ids: Any) -> Any:
                return self.layer(ids)

        dt = self.torch.float64 if p.dtype == "float64" else getattr(self.torch, p.dtype)
        base = nn.Embedding(p.num_embeddings, p.dim).to(dt)
        with self.torch.no_grad():
            base.weight.copy_(self.tensor(p.W, dt))
        config = self.peft.LoraConfig(r=p.rank, lora_alpha=p.alpha, use_rslora=p.rslora, target_modules=["layer"],
                                      init_lora_weights=True, bias="none")
        with quiet():
            model = self.peft.get_peft_model(OneEmbedding(base), config)
        layer = model.base_model.model.layer
        A, B = layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]
        with self.torch.no_grad():
            A.copy_(self.tensor(p.A, A.dtype))
            B.copy_(self.tensor(p.B, B.dtype))
        return model, A, B

    def _ids(self, p: Any) -> Any:
        return self.torch.from_numpy(p.ids.copy())

    def embedding_forward(self, problem: Any) -> Any:
        with self.one_thread(), self.torch.no_grad(), quiet():
            model, _, _ = self._embedding_model(problem)
            return self.host(model(self._ids(problem)))

    def embedding_grads(self, problem: Any) -> dict:
        with self.one_thread(), quiet():
            model, A, B = self._embedding_model(problem)
            y = model(self._ids(problem))
            y.backward(self.tensor(problem.cotangent, y.dtype))
            return {"A": self.host(A.grad), "B": self.host(B.grad)}

    def embedding_merge(self, problem: Any) -> dict:
        with self.one_thread(), self.torch.no_grad(), quiet():
            model, _, _ = self._embedding_model(problem)
            merged = model.merge_and_unload()
            return {"W": self.host(merged.layer.weight), "y": self.host(merged(self._ids(problem)))}

    # ------------------------------------------------------------ trainable set

    def trainable(self, problem: Any) -> set[str]:
        nn: Any = self.torch.nn
        stack = nn.Module()
        for name, d_in, d_out, bias in problem.layers:
            stack.add_module(name, nn.Linear(d_in, d_out, bias=bias))
        config = self.peft.LoraConfig(r=problem.rank, lora_alpha=problem.alpha, target_modules=list(problem.targets),
                                      bias=problem.bias, use_dora=problem.dora)
        with quiet():
            model = self.peft.get_peft_model(stack, config)
        out = set()
        for full, param in model.named_parameters():
            if not param.requires_grad:
                continue
            name = full.removeprefix("base_model.model.")
            layer, _, rest = name.partition(".")
            if rest not in _KINDS:
                raise RuntimeError(f"PEFT trains a parameter this adapter cannot name: {full}")
            out.add(f"{layer}.{_KINDS[rest]}")
        return out
