"""The PEFT adapter: a one-layer ``nn.Module`` wrapped by ``peft.get_peft_model``.

The base layer is ``nn.Linear``, or transformers' GPT-2 ``Conv1D`` (weight stored
(d_in, d_out)) for ``fan_in_fan_out``, which is how PEFT meets that layout in practice. The
``LoraConfig`` carries r, lora_alpha, use_rslora, fan_in_fan_out, lora_dropout and the init;
then the oracle's A and B are copied into ``lora_A.default.weight`` / ``lora_B.default.weight``
and PEFT's ``nn.Dropout`` is replaced by a module applying the problem's fixed mask. Merging
goes through ``merge_and_unload`` (the merge property) and ``merge_adapter`` then
``unmerge_adapter`` (the round trip).

PEFT's defaults are kept: with a float16/bfloat16 base, ``get_peft_model`` keeps the adapter
weights in float32 (``autocast_adapter_dtype=True``) and casts x to float32 for the adapter
branch. The adapter declares it (``precision``): the gradients of A and B are then held to the
float32 bound, not to their base's (30,000 to 260,000 times looser), so a wrong dA shows.
"""

from __future__ import annotations

from typing import Any

from minilora.testing.adapters.peft_variants import PeftVariants, quiet
from minilora.testing.adapters.torch_adapter import TorchBase

__all__ = ["PeftAdapter"]


_quiet = quiet


class PeftAdapter(PeftVariants, TorchBase):
    """LoRA as PEFT does it: ``get_peft_model(OneLayer(base), LoraConfig(...))``; DoRA
    (``use_dora=True``), ``nn.Embedding`` targets and the bias modes from ``PeftVariants``."""

    name = "peft"
    inits = ("kaiming", "gaussian")
    precision = {dt: {"accumulate": "float32", "adapter": "float32"} for dt in ("float16", "bfloat16")}
    INIT = {"kaiming": True, "gaussian": "gaussian"}

    def __init__(self) -> None:
        super().__init__()
        from minilora.testing.adapters import _quiet_logs

        with _quiet(), _quiet_logs():  # bitsandbytes, where installed, logs about CPU kernels
            import peft
            from transformers.pytorch_utils import Conv1D
        self.peft = peft
        self.Conv1D = Conv1D

    def versions(self) -> dict[str, str]:
        import transformers

        return {"peft": self.peft.__version__, "torch": self.torch.__version__,
                "transformers": transformers.__version__}

    def _build(self, *, d_in: int, d_out: int, rank: int, alpha: float, rslora: bool, fif: bool,
               dtype: str, W: Any = None, b: Any = None, dropout: float | None = None,
               init: str = "kaiming", dora: bool = False) -> tuple[Any, Any]:
        """(peft model, its LoRA layer) with base weight W (problem layout) and bias b."""
        nn: Any = self.torch.nn

        class OneLayer(nn.Module):
            def __init__(self, layer: Any) -> None:
                super().__init__()
                self.layer = layer

            def forward(self, x: Any) -> Any:
                return self.layer(x)

        if fif:
            base = self.Conv1D(d_out, d_in)  # weight (d_in, d_out) and always a bias
        else:
            base = nn.Linear(d_in, d_out, bias=b is not None)
        dt = self.tdtype(dtype)
        base = base.to(dt)
        with self.torch.no_grad():
            if W is not None:
                base.weight.copy_(self.tensor(W, dt))
            if getattr(base, "bias", None) is not None:
                base.bias.copy_(self.tensor(b, dt) if b is not None else self.torch.zeros(d_out, dtype=dt))
        config = self.peft.LoraConfig(
            r=rank, lora_alpha=alpha, use_rslora=rslora, target_modules=["layer"], fan_in_fan_out=fif,
            lora_dropout=0.0 if dropout is None else dropout, init_lora_weights=self.INIT[init], bias="none",
            use_dora=dora,
        )
        with _quiet():
            model = self.peft.get_peft_model(OneLayer(base), config)
        layer = model.base_model.model.layer
        return model, layer

    def _problem_model(self, p: Any) -> tuple[Any, Any, Any, Any]:
        model, layer = self._build(d_in=p.d_in, d_out=p.d_out, rank=p.rank, alpha=p.alpha, rslora=p.rslora,
                                   fif=p.fan_in_fan_out, dtype=p.dtype, W=p.W, b=p.b, dropout=p.dropout)
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        with self.torch.no_grad():
            A.copy_(self.tensor(p.A, A.dtype))
            B.copy_(self.tensor(p.B, B.dtype))
        if p.mask is not None:
            layer.lora_dropout["default"] = self.fixed_mask(p.mask)
        return model, layer, A, B

    def forward(self, problem: Any) -> Any:
        with self.one_thread(), self.torch.no_grad():
            model, _, _, _ = self._problem_model(problem)
            return self.host(model(self.tensor(problem.x, problem.dtype)))

    def grads(self, problem: Any) -> dict:
        with self.one_thread():
            model, _, A, B = self._problem_model(problem)
            x = self.tensor(problem.x, problem.dtype, requires_grad=True)
            y = model(x)
            y.backward(self.tensor(problem.cotangent, y.dtype))
            return {"x": self.host(x.grad), "A": self.host(A.grad), "B": self.host(B.grad)}

    def merge(self, problem: Any) -> dict:
        with self.one_thread(), self.torch.no_grad(), _quiet():
            model, _, _, _ = self._problem_model(problem)
            merged = model.merge_and_unload()  # the plain OneLayer, LoRA folded into its weight
            y = merged(self.tensor(problem.x, problem.dtype))
            return {"W": self.host(merged.layer.weight), "y": self.host(y)}

    def unmerge(self, problem: Any) -> Any:
        with self.one_thread(), self.torch.no_grad(), _quiet():
            model, layer, _, _ = self._problem_model(problem)
            model.merge_adapter()
            model.unmerge_adapter()
            return self.host(layer.base_layer.weight)

    def adam(self, problem: Any) -> dict:
        d_out, rank = problem.B.shape
        with self.one_thread():
            model, layer = self._build(d_in=problem.A.shape[1], d_out=d_out, rank=rank, alpha=problem.alpha,
                                       rslora=False, fif=False, dtype=problem.dtype)
            A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            with self.torch.no_grad():
                A.copy_(self.tensor(problem.A, A.dtype))
                B.copy_(self.tensor(problem.B, B.dtype))
            trainable = [p for p in model.parameters() if p.requires_grad]
            if len(trainable) != 2 or not (trainable[0] is A and trainable[1] is B):
                raise RuntimeError(f"PEFT left {len(trainable)} trainable parameters; expected lora_A and lora_B")
            return self.run_adam([A, B], ["A", "B"], problem)

    def init(self, d_in: int, d_out: int, rank: int, init: str, seed: int) -> dict:
        with self.one_thread(), self.seeded(seed), self.torch.no_grad():
            _, layer = self._build(d_in=d_in, d_out=d_out, rank=rank, alpha=rank, rslora=False, fif=False,
                                   dtype="float32", init=init)
            return {"A": self.host(layer.lora_A["default"].weight), "B": self.host(layer.lora_B["default"].weight)}
