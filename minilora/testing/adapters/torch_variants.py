"""The variant methods of the plain-PyTorch adapter: DoRA, LoRA on an embedding table and the
trainable set, each written directly in torch (no PEFT), as a mixin of ``TorchAdapter``.

    DoRA        n = ||W + s B A||_row (detached), c = m / n,
                y = F.linear(x, W) + (c - 1) F.linear(xm, W) + c s F.linear(F.linear(xm, A), B) + b
                (PEFT's form with dropout; without it c (x W^T + s (x A^T) B^T) + b);
                merge W' = c (W + s B A); unmerge W'/c - s B A with the norm kept from the merge
    embedding   y = F.embedding(ids, W) + s F.embedding(ids, A^T) B^T; merge W + s (B A)^T
    trainable   nn.Linear layers frozen, LoRA factors (and DoRA's m) as new parameters on the
                targets, biases switched on by PEFT's rule for "all" / "lora_only"
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["TorchVariants"]


class TorchVariants:
    """Mixin for ``TorchBase`` subclasses (uses ``tensor``, ``host``, ``one_thread``, ``torch``)."""

    torch: Any
    if TYPE_CHECKING:  # provided by TorchBase
        def tensor(self, a: Any, dtype: Any, requires_grad: bool = False) -> Any: ...

        def host(self, t: Any) -> Any: ...

        def one_thread(self) -> Any: ...

    # ------------------------------------------------------------ DoRA

    def _dora_tensors(self, p: Any, grad: bool = False) -> dict:
        t = {k: self.tensor(getattr(p, k), p.dtype, grad and k in ("x", "A", "B")) for k in ("x", "W", "A", "B")}
        t["m"] = self.tensor(p.magnitude, p.dtype, grad)
        t["b"] = None if p.b is None else self.tensor(p.b, p.dtype)
        t["mask"] = None if p.mask is None else self.tensor(p.mask, p.dtype)
        t["W_oi"] = t["W"].T if p.fan_in_fan_out else t["W"]  # (d_out, d_in)
        return t

    def dora_norm(self, p: Any, t: dict) -> Any:
        V = t["W_oi"] + (t["B"] @ t["A"]) * p.scale
        return self.torch.linalg.norm(V, dim=1).detach()  # (d_out,), no gradient (PEFT)

    def _dora(self, p: Any, t: dict) -> Any:
        F = self.torch.nn.functional
        c = t["m"] / self.dora_norm(p, t)
        xm = t["x"] if t["mask"] is None else t["x"] * t["mask"]
        lora = F.linear(F.linear(xm, t["A"]), t["B"]) * p.scale
        if t["mask"] is None:
            y = c * (F.linear(t["x"], t["W_oi"]) + lora)
        else:
            y = F.linear(t["x"], t["W_oi"]) + (c - 1) * F.linear(xm, t["W_oi"]) + c * lora
        return y if t["b"] is None else y + t["b"]

    def dora_forward(self, problem: Any) -> Any:
        with self.one_thread(), self.torch.no_grad():
            return self.host(self._dora(problem, self._dora_tensors(problem)))

    def dora_grads(self, problem: Any) -> dict:
        with self.one_thread():
            t = self._dora_tensors(problem, grad=True)
            y = self._dora(problem, t)
            y.backward(self.tensor(problem.cotangent, y.dtype))
            return {k: self.host(t[k].grad) for k in ("x", "A", "B", "m")}

    def _dora_merged(self, p: Any, t: dict) -> tuple[Any, Any]:
        """(W' (d_out, d_in), the norm it used)."""
        n = self.dora_norm(p, t)
        V = t["W_oi"] + (t["B"] @ t["A"]) * p.scale
        return (t["m"] / n)[:, None] * V, n

    def dora_merge(self, problem: Any) -> dict:
        F = self.torch.nn.functional
        with self.one_thread(), self.torch.no_grad():
            t = self._dora_tensors(problem)
            W, _ = self._dora_merged(problem, t)
            y = F.linear(t["x"], W, t["b"])
            return {"W": self.host(W.T if problem.fan_in_fan_out else W), "y": self.host(y)}

    def dora_unmerge(self, problem: Any) -> Any:
        with self.one_thread(), self.torch.no_grad():
            t = self._dora_tensors(problem)
            W, n = self._dora_merged(problem, t)
            back = W / (t["m"] / n)[:, None] - (t["B"] @ t["A"]) * problem.scale
            return self.host(back.T if problem.fan_in_fan_out else back)

    # ------------------------------------------------------------ embedding

    def _embedding_tensors(self, p: Any, grad: bool = False) -> dict:
        t = {k: self.tensor(getattr(p, k), p.dtype, grad and k in ("A", "B")) for k in ("W", "A", "B")}
        t["ids"] = self.torch.from_numpy(p.ids.copy())
        return t

    def _embedding(self, p: Any, t: dict) -> Any:
        F = self.torch.nn.functional
        return F.embedding(t["ids"], t["W"]) + (F.embedding(t["ids"], t["A"].T) @ t["B"].T) * p.scale

    def embedding_forward(self, problem: Any) -> Any:
        with self.one_thread(), self.torch.no_grad():
            return self.host(self._embedding(problem, self._embedding_tensors(problem)))

    def embedding_grads(self, problem: Any) -> dict:
        with self.one_thread():
            t = self._embedding_tensors(problem, grad=True)
            y = self._embedding(problem, t)
            y.backward(self.tensor(problem.cotangent, y.dtype))
            return {k: self.host(t[k].grad) for k in ("A", "B")}

    def embedding_merge(self, problem: Any) -> dict:
        F = self.torch.nn.functional
        with self.one_thread(), self.torch.no_grad():
            t = self._embedding_tensors(problem)
            W = t["W"] + (t["B"] @ t["A"]).T * problem.scale
            return {"W": self.host(W), "y": self.host(F.embedding(t["ids"], W))}

    # ------------------------------------------------------------ trainable set

    def trainable(self, problem: Any) -> set[str]:
        nn: Any = self.torch.nn
        layers = {name: nn.Linear(d_in, d_out, bias=bias) for name, d_in, d_out, bias in problem.layers}
        names: dict[str, Any] = {}
        for name, layer in layers.items():
            layer.requires_grad_(False)
            names[f"{name}.W"] = layer.weight
            if layer.bias is not None:
                names[f"{name}.b"] = layer.bias
                layer.bias.requires_grad_(problem.bias == "all" or (problem.bias == "lora_only"
                                                                    and name in problem.targets))
            if name in problem.targets:
                names[f"{name}.A"] = nn.Parameter(self.torch.zeros(problem.rank, layer.in_features))
                names[f"{name}.B"] = nn.Parameter(self.torch.zeros(layer.out_features, problem.rank))
                if problem.dora:
                    names[f"{name}.m"] = nn.Parameter(self.torch.ones(layer.out_features))
        return {n for n, param in names.items() if param.requires_grad}
