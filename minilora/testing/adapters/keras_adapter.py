"""The Keras adapter: Keras 3 ``layers.Dense`` with ``enable_lora(rank, lora_alpha)``, on the
torch backend.

Why torch: the adapter sets ``KERAS_BACKEND=torch`` before Keras is first imported (a process
that already imported Keras with another backend is refused), because on that backend Keras'
variables are torch parameters and its layers run under torch's autograd, so the gradients of
x, A and B come from one ``backward`` call, with no re-tracing per shape; torch is already part
of the ``compare`` extra. Keras' own numerics are the same on every backend (its ops and its
Adam are written once in ``keras.ops``).

What Keras does, and what the adapter declares:

- The kernel is stored (d_in, d_out) (the fan_in_fan_out layout; a (d_out, d_in) problem
  weight is transposed on the way in), ``lora_kernel_a`` is A^T (d_in, r), ``lora_kernel_b``
  is B^T (r, d_out), and the forward merges on the fly: y = x (W + (alpha/r) A^T B^T) + b.
  No dropout and no rsLoRA: not declared.
- The LoRA factors are float32 whatever the layer's dtype (``enable_lora`` passes
  ``dtype="float32"``): under a float64 layer the given A and B are rounded to float32 and the
  delta is computed there. Declared as ``precision["float64"] = {"adapter": "float32"}``.
- A float64 layer's matmuls run in float32 (measured, Keras 3.15 on torch: ``keras.ops.matmul``
  casts to ``backend.result_type``, which maps every 64-bit type to its 32-bit one "to be
  aligned with JAX's default", then casts the result back): declared as ``accumulate
  float32`` for float64.
- Adam is Kingma and Ba's epsilon-hat form, p -= lr sqrt(1 - b2^t) / (1 - b1^t) m / (sqrt(v) +
  eps) (``adam_eps = "hat"``), with 1 - beta^t computed in the variable's dtype, float32
  (``bias_correction``); weight decay is decoupled (AdamW); no L2 decay, no maximize.
- A is drawn from he_uniform, U(+-sqrt(6 / d_in)) (``inits``).
- The merge is what ``save_own_variables`` stores (the merged kernel, as ``model.save`` does),
  loaded into a plain Dense; there is no unmerge.
- ``Embedding.enable_lora``: the table W (num, dim) plus (alpha/r) a b with a = A^T (num, r),
  b = B^T (r, dim), merged into the whole table at every call, then gathered; merged through
  ``save_own_variables`` too. Its rows run in float32 only (``variant_dtypes``): under a float64
  table the factors are float32 again, which the variant bounds do not model.
"""

from __future__ import annotations

import os
import random
import sys
from typing import Any

import numpy as np

from minilora.testing.adapters import FrameworkUnavailableError
from minilora.testing.adapters.torch_adapter import EmbeddingLayerAdapter

__all__ = ["KerasAdapter", "import_keras"]


def import_keras() -> Any:
    """Keras on the torch backend (set before its first import; refused if it already runs on
    another)."""
    if "keras" not in sys.modules:
        os.environ["KERAS_BACKEND"] = "torch"
    import keras

    backend = keras.backend.backend()
    if backend != "torch":
        raise FrameworkUnavailableError(
            f"the keras target needs Keras on the torch backend, but Keras was already imported with the "
            f"{backend!r} backend in this process (set KERAS_BACKEND=torch)"
        )
    return keras


class KerasAdapter(EmbeddingLayerAdapter):
    """LoRA as Keras does it: ``Dense(d_out).build((None, d_in)); enable_lora(r, lora_alpha=alpha)``."""

    name = "keras"
    dtypes = ("float64", "float32")
    features = frozenset({"fan_in_fan_out", "no_bias", "scale"})
    optimizer_features = frozenset({"amsgrad", "decoupled"})
    adam_eps = "hat"
    inits = ("he_uniform",)
    variant_dtypes = ("float32",)
    precision = {"float64": {"adapter": "float32", "accumulate": "float32", "bias_correction": "float32"},
                 "float32": {"bias_correction": "float32"}}
    known_differences = (
        "LoRA factors are float32 under a float64 layer (declared: precision adapter float32)",
        "a float64 layer's matmuls run in float32 (declared: precision accumulate float32)",
        "Adam adds eps to sqrt(v) before the bias correction (declared: adam_eps 'hat')",
        "Adam's 1 - beta^t is computed in float32 (declared: bias_correction float32)",
        "A is drawn from he_uniform, U(+-sqrt(6/d_in)) (declared: inits)",
        "no L2 decay, no maximize, no dropout, no rsLoRA, no unmerge (not declared: not covered / n/a)",
        "a LoRA Dense keeps its bias trainable (PEFT's bias='lora_only'); no bias modes, no DoRA (n/a)",
        "Embedding LoRA rows in float32 only (float32 factors under a float64 table: not modelled)",
    )

    def __init__(self) -> None:
        super().__init__()
        self.keras = import_keras()

    def versions(self) -> dict[str, str]:
        return {"keras": self.keras.__version__, "keras_backend": self.keras.backend.backend(),
                "torch": self.torch.__version__}

    def _dense(self, *, d_in: int, d_out: int, bias: bool, dtype: str) -> Any:
        layer = self.keras.layers.Dense(d_out, use_bias=bias, dtype=dtype)
        layer.build((None, d_in))
        return layer

    def _kernel(self, p: Any, W: Any) -> Any:
        return W if p.fan_in_fan_out else W.T  # Keras' kernel is (d_in, d_out)

    def _problem_layer(self, p: Any) -> Any:
        if p.rslora or p.mask is not None:
            raise ValueError("Keras' LoRA has no rsLoRA and no dropout")
        layer = self._dense(d_in=p.d_in, d_out=p.d_out, bias=p.b is not None, dtype=p.dtype)
        layer.kernel.assign(self.tensor(self._kernel(p, p.W), p.dtype))
        if p.b is not None:
            layer.bias.assign(self.tensor(p.b, p.dtype))
        layer.enable_lora(p.rank, lora_alpha=p.alpha)
        a, b = layer.lora_kernel_a, layer.lora_kernel_b
        a.assign(self.tensor(p.A.T, a.dtype))  # float32 whatever p.dtype: Keras' choice, declared
        b.assign(self.tensor(p.B.T, b.dtype))
        return layer

    def _factor_grads(self, layer: Any) -> tuple[Any, Any]:
        gA, gB = layer.lora_kernel_a.value.grad, layer.lora_kernel_b.value.grad
        return self.host(gA).T, self.host(gB).T

    def merge(self, problem: Any) -> dict:
        with self.one_thread(), self.torch.no_grad():
            layer = self._problem_layer(problem)
            store: dict = {}
            layer.save_own_variables(store)  # the merged kernel (and bias), as model.save stores it
            plain = self._dense(d_in=problem.d_in, d_out=problem.d_out, bias=problem.b is not None,
                                dtype=problem.dtype)
            plain.load_own_variables(store)
            y = plain(self.tensor(problem.x, problem.dtype))
            return {"W": self._kernel(problem, self.host(plain.kernel.value)), "y": self.host(y)}

    def adam(self, problem: Any) -> dict:
        o = problem.options
        d_out, rank = problem.B.shape
        with self.one_thread():
            layer = self._dense(d_in=problem.A.shape[1], d_out=d_out, bias=True, dtype=problem.dtype)
            layer.enable_lora(rank, lora_alpha=problem.alpha)
            a, b = layer.lora_kernel_a, layer.lora_kernel_b
            a.assign(self.tensor(problem.A.T, a.dtype))
            b.assign(self.tensor(problem.B.T, b.dtype))
            trainable = layer.trainable_variables
            if len(trainable) != 3 or not {id(a), id(b)} <= {id(v) for v in trainable}:  # A, B and the bias
                raise RuntimeError(f"Keras left {[v.path for v in trainable]} trainable; expected the LoRA "
                                   "factors and the bias")
            b1, b2 = o.get("betas", (0.9, 0.999))
            wd = o.get("weight_decay", 0.0) if o.get("decoupled") else None
            opt = self.keras.optimizers.Adam(learning_rate=o.get("lr", 1e-3), beta_1=b1, beta_2=b2,
                                             epsilon=o.get("eps", 1e-8), amsgrad=o.get("amsgrad", False),
                                             weight_decay=wd or None)
            for g in problem.grads:
                opt.apply_gradients([(self.tensor(g["A"].T, a.dtype), a), (self.tensor(g["B"].T, b.dtype), b)])
            return {"A": self.host(a.value).T, "B": self.host(b.value).T}

    def init(self, d_in: int, d_out: int, rank: int, init: str, seed: int) -> dict:
        state = (random.getstate(), np.random.get_state())
        try:
            with self.one_thread(), self.seeded(seed):
                self.keras.utils.set_random_seed(seed)  # seeds Python, NumPy and torch: restored after
                layer = self._dense(d_in=d_in, d_out=d_out, bias=False, dtype="float32")
                layer.enable_lora(rank)  # a_initializer="he_uniform", b_initializer="zeros": the defaults
                return {"A": self.host(layer.lora_kernel_a.value).T, "B": self.host(layer.lora_kernel_b.value).T}
        finally:
            random.setstate(state[0])
            np.random.set_state(state[1])

    # ------------------------------------------------------------ embedding

    def _embedding(self, p: Any, lora: bool = True) -> Any:
        if p.rslora:
            raise ValueError("Keras' LoRA has no rsLoRA")
        layer = self.keras.layers.Embedding(p.num_embeddings, p.dim, dtype=p.dtype)
        layer.build()
        layer.embeddings.assign(self.tensor(p.W, p.dtype))
        if lora:
            layer.enable_lora(p.rank, lora_alpha=p.alpha)
            layer.lora_embeddings_a.assign(self.tensor(p.A.T, "float32"))  # (num, r)
            layer.lora_embeddings_b.assign(self.tensor(p.B.T, "float32"))  # (r, dim)
        return layer

    def _ids(self, p: Any) -> Any:
        return self.torch.from_numpy(np.asarray(p.ids, dtype=np.int64).copy())

    def _embedding_factor_grads(self, layer: Any) -> tuple[Any, Any]:
        a, b = layer.lora_embeddings_a.value.grad, layer.lora_embeddings_b.value.grad
        return self.host(a).T, self.host(b).T

    def embedding_merge(self, problem: Any) -> dict:
        with self.one_thread(), self.torch.no_grad():
            store: dict = {}
            self._embedding(problem).save_own_variables(store)  # the merged table, as model.save stores it
            plain = self._embedding(problem, lora=False)
            plain.load_own_variables(store)
            return {"W": self.host(plain.embeddings.value), "y": self.host(plain(self._ids(problem)))}
