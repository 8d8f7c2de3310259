"""The plain-PyTorch adapter, and the helpers the PEFT and loralib adapters share.

The LoRA layer written directly in torch: ``F.linear`` for x W^T + b, scale * (x m) A^T B^T
for the adapter (PEFT's ``lora_B(lora_A(dropout(x))) * scaling``), ``torch.optim.Adam`` /
``AdamW`` on two ``nn.Parameter``s. Torch runs on one thread here (the tensors are tiny and
intra-op threads only fight each other on a small machine); the setting is restored after.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import numpy as np

from minilora.testing.adapters.torch_variants import TorchVariants

__all__ = ["TorchAdapter", "TorchBase"]


class TorchBase:
    """Conversions between the problems' NumPy arrays and torch tensors, one-thread runs,
    and the optimizer loop, for adapters built on torch."""

    dtypes: tuple[str, ...] = ("float64", "float32", "float16", "bfloat16")
    framework = "torch"
    # torch's CPU matmuls carry float16/bfloat16 sums in float32 (measured: 1 + 1023 * 2^-9 sums
    # to 2.998 before the final rounding, where a bfloat16 sum would stop at 1); every elementwise
    # step rounds to the dtype, which the bound charges per stored intermediate
    precision = {"float16": {"accumulate": "float32"}, "bfloat16": {"accumulate": "float32"}}

    def __init__(self) -> None:
        import torch

        self.torch = torch

    def versions(self) -> dict[str, str]:
        return {"torch": self.torch.__version__}

    def tdtype(self, dtype: str) -> Any:
        return getattr(self.torch, dtype)

    def tensor(self, a: Any, dtype: Any, requires_grad: bool = False) -> Any:
        """A new tensor of ``dtype`` (a name or torch dtype) holding the float64 array ``a``."""
        dt = self.tdtype(dtype) if isinstance(dtype, str) else dtype
        t = self.torch.from_numpy(np.array(a, dtype=np.float64, copy=True)).to(dt)
        return t.requires_grad_(requires_grad)

    def host(self, t: Any) -> np.ndarray:
        return t.detach().to(self.torch.float64).cpu().numpy().copy()

    @contextlib.contextmanager
    def one_thread(self) -> Iterator[None]:
        previous = self.torch.get_num_threads()
        self.torch.set_num_threads(1)
        try:
            yield
        finally:
            self.torch.set_num_threads(previous)

    def fixed_mask(self, mask: Any) -> Any:
        """A module multiplying its input by the problem's dropout mask: put in place of a
        framework's ``nn.Dropout`` so both sides drop exactly the same entries."""
        nn: Any = self.torch.nn

        class FixedMask(nn.Module):
            def __init__(self, m: Any) -> None:
                super().__init__()
                self.register_buffer("mask", m)

            def forward(self, x: Any) -> Any:
                return x * self.mask.to(x.dtype)

        return FixedMask(self.tensor(mask, "float64"))

    def run_adam(self, parameters: list, names: list[str], problem: Any) -> dict:
        """Feed ``problem.grads`` to torch.optim.Adam/AdamW over ``parameters`` (named
        ``names``: "A", "B") and return their final values."""
        from minilora.optim import adam_kwargs

        o = adam_kwargs(problem.options)
        cls = self.torch.optim.AdamW if o.pop("decoupled") else self.torch.optim.Adam
        opt = cls(parameters, **o)  # lr, betas, eps, weight_decay, amsgrad, maximize: torch's names
        for grads in problem.grads:
            for p, name in zip(parameters, names, strict=True):
                p.grad = self.tensor(grads[name], p.dtype)
            opt.step()
        return {name: self.host(p) for p, name in zip(parameters, names, strict=True)}

    def seeded(self, seed: int) -> Any:
        """torch's global generator seeded for one block, restored afterwards."""
        ctx = self.torch.random.fork_rng(devices=[])
        return _Seeded(ctx, self.torch, seed)


class LayerAdapter(TorchBase):
    """forward and grads for adapters that build one torch module per problem: subclasses give
    ``_problem_layer(problem)`` (the layer holding the problem's W, b, A, B and mask) and
    ``_factor_grads(layer)`` (dA, dB as NumPy arrays in minilora's layout, A (r, d_in), B (d_out, r))."""

    def _problem_layer(self, problem: Any) -> Any:
        raise NotImplementedError

    def _factor_grads(self, layer: Any) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def forward(self, problem: Any) -> Any:
        with self.one_thread(), self.torch.no_grad():
            layer = self._problem_layer(problem)
            return self.host(layer(self.tensor(problem.x, problem.dtype)))

    def grads(self, problem: Any) -> dict:
        with self.one_thread():
            layer = self._problem_layer(problem)
            x = self.tensor(problem.x, problem.dtype, requires_grad=True)
            y = layer(x)
            y.backward(self.tensor(problem.cotangent, y.dtype))
            gA, gB = self._factor_grads(layer)
            return {"x": self.host(x.grad), "A": gA, "B": gB}


class EmbeddingLayerAdapter(LayerAdapter):
    """LayerAdapter plus embedding_forward and embedding_grads, for frameworks with an embedding
    LoRA module: subclasses give ``_embedding(problem)`` (the module), ``_ids(problem)`` (the ids
    as a torch int64 tensor) and ``_embedding_factor_grads(layer)`` (dA (r, num), dB (dim, r))."""

    def _embedding(self, problem: Any) -> Any:
        raise NotImplementedError

    def _ids(self, problem: Any) -> Any:
        raise NotImplementedError

    def _embedding_factor_grads(self, layer: Any) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def embedding_forward(self, problem: Any) -> Any:
        with self.one_thread(), self.torch.no_grad():
            return self.host(self._embedding(problem)(self._ids(problem)))

    def embedding_grads(self, problem: Any) -> dict:
        with self.one_thread():
            layer = self._embedding(problem)
            y = layer(self._ids(problem))
            y.backward(self.tensor(problem.cotangent, y.dtype))
            gA, gB = self._embedding_factor_grads(layer)
            return {"A": gA, "B": gB}


class _Seeded:
    def __init__(self, ctx: Any, torch: Any, seed: int) -> None:
        self.ctx, self.torch, self.seed = ctx, torch, seed

    def __enter__(self) -> None:
        self.ctx.__enter__()
        self.torch.manual_seed(self.seed)

    def __exit__(self, *exc: Any) -> Any:
        return self.ctx.__exit__(*exc)


class TorchAdapter(TorchVariants, TorchBase):
    """LoRA in plain PyTorch: y = F.linear(x, W, b) + s F.linear(F.linear(x m, A), B); DoRA,
    embedding LoRA and the trainable set from ``TorchVariants``."""

    name = "torch"
    inits = ("kaiming", "gaussian")
    @property
    def variant_dtypes(self) -> tuple[str, ...]:
        """The DoRA and embedding rows in every dtype the adapter runs (a subclass that narrows
        ``dtypes`` narrows these too), float16/bfloat16 bounded under ``precision`` (float32
        sums, every intermediate stored in the dtype: minilora.testing.variant_bounds)."""
        return tuple(self.dtypes)

    def _tensors(self, p: Any, grad: bool = False) -> dict:
        d = p.dtype
        t = {k: self.tensor(getattr(p, k), d, grad and k in ("x", "A", "B")) for k in ("x", "W", "A", "B")}
        t["b"] = None if p.b is None else self.tensor(p.b, d)
        t["mask"] = None if p.mask is None else self.tensor(p.mask, d)
        return t

    def _weight(self, p: Any, W: Any) -> Any:
        return W.T if p.fan_in_fan_out else W  # F.linear wants (d_out, d_in)

    def _lora(self, p: Any, t: dict) -> Any:
        F = self.torch.nn.functional
        xm = t["x"] if t["mask"] is None else t["x"] * t["mask"]
        return F.linear(t["x"], self._weight(p, t["W"]), t["b"]) + F.linear(F.linear(xm, t["A"]), t["B"]) * p.scale

    def _delta(self, p: Any, t: dict) -> Any:
        delta = (t["B"] @ t["A"]) * p.scale  # (d_out, d_in)
        return delta.T if p.fan_in_fan_out else delta

    def forward(self, problem: Any) -> Any:
        with self.one_thread(), self.torch.no_grad():
            return self.host(self._lora(problem, self._tensors(problem)))

    def grads(self, problem: Any) -> dict:
        with self.one_thread():
            t = self._tensors(problem, grad=True)
            y = self._lora(problem, t)
            y.backward(self.tensor(problem.cotangent, y.dtype))
            return {k: self.host(t[k].grad) for k in ("x", "A", "B")}

    def merge(self, problem: Any) -> dict:
        F = self.torch.nn.functional
        with self.one_thread(), self.torch.no_grad():
            t = self._tensors(problem)
            W = t["W"] + self._delta(problem, t)
            y = F.linear(t["x"], self._weight(problem, W), t["b"])
            return {"W": self.host(W), "y": self.host(y)}

    def unmerge(self, problem: Any) -> Any:
        with self.one_thread(), self.torch.no_grad():
            t = self._tensors(problem)
            merged = t["W"] + self._delta(problem, t)
            return self.host(merged - self._delta(problem, t))

    def adam(self, problem: Any) -> dict:
        nn: Any = self.torch.nn
        with self.one_thread():
            A = nn.Parameter(self.tensor(problem.A, problem.dtype))
            B = nn.Parameter(self.tensor(problem.B, problem.dtype))
            return self.run_adam([A, B], ["A", "B"], problem)

    def init(self, d_in: int, d_out: int, rank: int, init: str, seed: int) -> dict:
        nn: Any = self.torch.nn
        with self.one_thread(), self.seeded(seed):
            A = self.torch.empty(rank, d_in)
            if init == "kaiming":  # what nn.Linear, loralib and PEFT do
                nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            else:
                nn.init.normal_(A, std=1.0 / rank)
            B = self.torch.zeros(d_out, rank)
            return {"A": self.host(A), "B": self.host(B)}
