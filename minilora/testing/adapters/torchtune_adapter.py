"""The torchtune adapter: ``torchtune.modules.peft.LoRALinear`` (torchtune 0.6; it imports
torchao).

LoRALinear is y = F.linear(x, W, b) + (alpha / r) lora_b(lora_a(dropout(x))), with W stored
(d_out, d_in) (no fan_in_fan_out layout) and no rsLoRA option, so neither is declared and those
cases are left out. Its ``nn.Dropout`` is replaced by a module applying the problem's fixed mask.
torchtune merges through ``get_merged_lora_ckpt`` on a state dict (what its recipes save): the
merge property loads that state dict into a plain ``nn.Linear``. It has no unmerge (the row is
"n/a"). Training goes through torchtune's own choice of trainable parameters
(``set_trainable_params(model, get_adapter_params(model))``) and ``torch.optim``, which its
recipes use. A is drawn by ``kaiming_uniform_(a=sqrt(5))``, as loralib and PEFT draw it.

DoRA is ``DoRALinear`` with the problem's magnitude copied in. Its forward is
c (F.linear(x, W, b)) + c s lora_b(lora_a(dropout(x))) with c = m / ||W + s B A||_row detached:
the bias is scaled by c, where PEFT adds it after (declared: ``dora_bias = "scaled"``), while its
merge (``get_merged_lora_ckpt``) scales only the weight, so torchtune's merged model differs from
its trained one by (c - 1) b (``tests/testing/test_builtin_targets.py`` pins it). Under dropout its
c multiplies the undropped base output, where PEFT's (c - 1) term sees the dropped x: dropout is
left out of ``dora_features``. There is no DoRA unmerge, and no trainable(): torchtune trains its
adapter parameters and never a bias, so PEFT's bias modes have no counterpart.
"""

from __future__ import annotations

from typing import Any

from minilora.testing.adapters.torch_adapter import LayerAdapter

__all__ = ["TorchtuneAdapter"]


class TorchtuneAdapter(LayerAdapter):
    """LoRA as torchtune does it: ``LoRALinear(d_in, d_out, rank, alpha, dropout, use_bias)``."""

    name = "torchtune"
    features = frozenset({"dropout", "no_bias", "scale"})
    dora_features = frozenset({"no_bias", "scale"})
    dora_bias = "scaled"
    inits = ("kaiming",)
    known_differences = (
        "DoRALinear scales the bias by c = m/||W + sBA|| in its forward but not in its merge (declared: "
        "dora_bias 'scaled'; the merged model differs from the trained one by (c - 1) b)",
        "DoRALinear under dropout scales the undropped base output by c (not declared: no DoRA dropout cases)",
        "no fan_in_fan_out, no rsLoRA, no unmerge (LoRA or DoRA), no bias modes (not declared / n/a)",
    )

    def __init__(self) -> None:
        super().__init__()
        import torchtune.modules.peft as tt_peft

        self.tt = tt_peft

    def versions(self) -> dict[str, str]:
        import torchao
        import torchtune

        return {"torchtune": torchtune.__version__, "torchao": torchao.__version__, "torch": self.torch.__version__}

    def _layer(self, *, d_in: int, d_out: int, rank: int, alpha: float, bias: bool, dtype: str,
               dropout: float | None = None) -> Any:
        layer = self.tt.LoRALinear(d_in, d_out, rank=rank, alpha=alpha, use_bias=bias,
                                   dropout=0.0 if dropout is None else dropout)
        return layer.to(self.tdtype(dtype))

    def _problem_layer(self, p: Any, masked: bool = True) -> Any:
        if p.fan_in_fan_out or p.rslora:
            raise ValueError("torchtune's LoRALinear has no fan_in_fan_out layout and no rsLoRA")
        layer = self._layer(d_in=p.d_in, d_out=p.d_out, rank=p.rank, alpha=p.alpha, bias=p.b is not None,
                            dtype=p.dtype, dropout=p.dropout)
        self._copy_in(layer, p)
        if p.mask is not None and masked:
            layer.dropout = self.fixed_mask(p.mask)
        return layer

    def _copy_in(self, layer: Any, p: Any) -> None:
        """The problem's W, b, A and B into a torchtune LoRALinear or DoRALinear, in p.dtype."""
        dt = self.tdtype(p.dtype)
        with self.torch.no_grad():
            layer.weight.copy_(self.tensor(p.W, dt))
            if p.b is not None:
                layer.bias.copy_(self.tensor(p.b, dt))
            layer.lora_a.weight.copy_(self.tensor(p.A, dt))
            layer.lora_b.weight.copy_(self.tensor(p.B, dt))

    def _factor_grads(self, layer: Any) -> tuple[Any, Any]:
        return self.host(layer.lora_a.weight.grad), self.host(layer.lora_b.weight.grad)

    def merge(self, problem: Any) -> dict:
        with self.one_thread(), self.torch.no_grad():
            return self._merged(self._problem_layer(problem, masked=False), problem)  # a merge has no dropout

    def _merged(self, layer: Any, problem: Any) -> dict:
        """torchtune's merge of ``layer`` (LoRA or DoRA) loaded into a plain nn.Linear: W and y."""
        nn: Any = self.torch.nn
        # a model's state dict, the layer named "layer" (copies: it merges in place)
        state = {f"layer.{k}": v.detach().clone() for k, v in layer.state_dict().items()}
        merged = self.tt.get_merged_lora_ckpt(state, rank=problem.rank, alpha=problem.alpha)
        plain = nn.Linear(problem.d_in, problem.d_out, bias=problem.b is not None).to(self.tdtype(problem.dtype))
        plain.load_state_dict({k.removeprefix("layer."): v for k, v in merged.items()})  # strict: W (and b) only
        y = plain(self.tensor(problem.x, problem.dtype))
        return {"W": self.host(plain.weight), "y": self.host(y)}

    def adam(self, problem: Any) -> dict:
        d_out, rank = problem.B.shape
        with self.one_thread():
            layer = self._layer(d_in=problem.A.shape[1], d_out=d_out, rank=rank, alpha=problem.alpha, bias=True,
                                dtype=problem.dtype)
            with self.torch.no_grad():
                layer.lora_a.weight.copy_(self.tensor(problem.A, problem.dtype))
                layer.lora_b.weight.copy_(self.tensor(problem.B, problem.dtype))
            adapter_params = self.tt.get_adapter_params(layer)
            self.tt.set_trainable_params(layer, adapter_params)
            trainable = [p for p in layer.parameters() if p.requires_grad]
            A, B = layer.lora_a.weight, layer.lora_b.weight
            if sorted(adapter_params) != ["lora_a.weight", "lora_b.weight"] or len(trainable) != 2 \
                    or not (trainable[0] is A or trainable[1] is A):
                raise RuntimeError(f"torchtune marked {sorted(adapter_params)} as the adapter and left "
                                   f"{len(trainable)} trainable parameters; expected lora_a and lora_b")
            return self.run_adam([A, B], ["A", "B"], problem)

    def init(self, d_in: int, d_out: int, rank: int, init: str, seed: int) -> dict:
        with self.one_thread(), self.seeded(seed), self.torch.no_grad():
            layer = self._layer(d_in=d_in, d_out=d_out, rank=rank, alpha=float(rank), bias=False, dtype="float32")
            return {"A": self.host(layer.lora_a.weight), "B": self.host(layer.lora_b.weight)}

    # ------------------------------------------------------------ DoRA

    def _dora_layer(self, p: Any) -> Any:
        if p.fan_in_fan_out or p.rslora or p.mask is not None:
            raise ValueError("torchtune's DoRALinear is checked without fan_in_fan_out, rsLoRA and dropout")
        dt = self.tdtype(p.dtype)
        layer = self.tt.DoRALinear(p.d_in, p.d_out, rank=p.rank, alpha=p.alpha, use_bias=p.b is not None).to(dt)
        self._copy_in(layer, p)
        with self.torch.no_grad():
            layer.magnitude.copy_(self.tensor(p.magnitude, dt))
        return layer

    def dora_forward(self, problem: Any) -> Any:
        with self.one_thread(), self.torch.no_grad():
            return self.host(self._dora_layer(problem)(self.tensor(problem.x, problem.dtype)))

    def dora_grads(self, problem: Any) -> dict:
        with self.one_thread():
            layer = self._dora_layer(problem)
            x = self.tensor(problem.x, problem.dtype, requires_grad=True)
            y = layer(x)
            y.backward(self.tensor(problem.cotangent, y.dtype))
            return {"x": self.host(x.grad), "A": self.host(layer.lora_a.weight.grad),
                    "B": self.host(layer.lora_b.weight.grad), "m": self.host(layer.magnitude.grad)}

    def dora_merge(self, problem: Any) -> dict:
        with self.one_thread(), self.torch.no_grad():
            return self._merged(self._dora_layer(problem), problem)
