"""The Flax adapter: ``flax.nnx.LoRALinear`` on JAX's CPU backend in float64, and optax's Adam.

The adapter turns on ``jax_enable_x64`` (for the whole process: JAX has no float64 without it)
and runs on the CPU. Each method is one ``nnx.jit``/``jax.jit`` function, compiled once per
distinct shape (XLA compiles per shape; a default check has about 30 shapes per method).

What Flax does, and what the adapter declares:

- ``LoRALinear`` is y = x W + b + (x lora_a) lora_b with the kernel W stored (d_in, d_out) (the
  fan_in_fan_out layout; a (d_out, d_in) problem weight is transposed on the way in),
  lora_a = A^T (d_in, r), lora_b = B^T (r, d_out). It has **no alpha**: the update is not
  scaled, so the adapter does not declare "scale" and every case has alpha = r (s = 1); no
  dropout and no rsLoRA either. It has no merge or unmerge (those rows are "n/a").
- Gradients come from ``nnx.grad`` with respect to the ``nnx.LoRAParam`` variables (Flax's own
  choice of what trains) and x.
- A is drawn from he_uniform, U(+-sqrt(6 / d_in)) (``inits``).
- Adam is ``optax.adam`` (eps outside the square root of the bias-corrected v, as torch), AdamW
  ``optax.adamw``, Adam with L2 decay ``optax.chain(optax.add_decayed_weights(wd),
  optax.adam(...))`` (the decay added to the gradient, as torch's ``weight_decay``). optax has no
  ``maximize``, and its ``amsgrad`` keeps the maximum of the *bias-corrected* second moment
  (max_t v_t / (1 - b2^t)) where torch keeps max_t v_t and corrects by the current step: not
  declared, so those cases are "not covered" (``tests/testing/test_builtin_targets.py`` pins the
  difference).
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["FlaxAdapter"]


class FlaxAdapter:
    """LoRA as Flax does it: ``nnx.LoRALinear(d_in, d_out, lora_rank=r, use_bias=...)``."""

    name = "flax"
    dtypes = ("float64",)
    features = frozenset({"fan_in_fan_out", "no_bias"})
    optimizer_features = frozenset({"l2", "decoupled"})
    inits = ("he_uniform",)
    known_differences = (
        "LoRALinear has no alpha: the update is x A^T B^T, scale 1 (not declared: cases have alpha = r)",
        "optax's amsgrad keeps max_t of the bias-corrected v (not declared: not covered)",
        "A is drawn from he_uniform, U(+-sqrt(6/d_in)) (declared: inits)",
        "no dropout, no rsLoRA, no maximize, no merge or unmerge (not declared: not covered / n/a)",
    )

    def __init__(self) -> None:
        import jax

        jax.config.update("jax_enable_x64", True)
        import jax.numpy as jnp
        import optax
        from flax import nnx

        self.jax, self.jnp, self.nnx, self.optax = jax, jnp, nnx, optax
        self.cpu = jax.devices("cpu")[0]

        @nnx.jit
        def forward(model: Any, x: Any) -> Any:
            return model(x)

        def loss(model: Any, x: Any, cotangent: Any) -> Any:
            return jnp.sum(model(x) * cotangent)

        @nnx.jit
        def grads(model: Any, x: Any, cotangent: Any) -> Any:
            return nnx.grad(loss, argnums=(nnx.DiffState(0, nnx.LoRAParam), 1))(model, x, cotangent)

        self._forward, self._grads = forward, grads

    def versions(self) -> dict[str, str]:
        import flax
        import jaxlib

        return {"flax": flax.__version__, "jax": self.jax.__version__, "jaxlib": jaxlib.__version__,
                "optax": self.optax.__version__}

    def _array(self, a: Any) -> Any:
        return self.jax.device_put(self.jnp.asarray(np.asarray(a, dtype=np.float64)), self.cpu)

    def _model(self, p: Any) -> Any:
        if p.rslora or p.mask is not None or p.scale != 1.0:
            raise ValueError("Flax's LoRALinear has no alpha (scale 1), no rsLoRA and no dropout")
        nnx, f64 = self.nnx, self.jnp.float64
        # the structure only (eval_shape: no initializer runs, eager JAX compiles each op per shape);
        # every value is set below
        model = nnx.eval_shape(lambda: nnx.LoRALinear(p.d_in, p.d_out, lora_rank=p.rank, use_bias=p.b is not None,
                                                      param_dtype=f64, lora_param_dtype=f64, rngs=nnx.Rngs(0)))
        model.kernel.set_value(self._array(p.W if p.fan_in_fan_out else p.W.T))  # (d_in, d_out)
        if p.b is not None:
            model.bias.set_value(self._array(p.b))
        model.lora.lora_a.set_value(self._array(p.A.T))
        model.lora.lora_b.set_value(self._array(p.B.T))
        return model

    def forward(self, problem: Any) -> Any:
        return np.asarray(self._forward(self._model(problem), self._array(problem.x)))

    def grads(self, problem: Any) -> dict:
        g_lora, g_x = self._grads(self._model(problem), self._array(problem.x), self._array(problem.cotangent))
        lora = g_lora["lora"]
        return {"x": np.asarray(g_x), "A": np.asarray(lora["lora_a"].get_value()).T,
                "B": np.asarray(lora["lora_b"].get_value()).T}

    def _transform(self, o: dict) -> Any:
        optax = self.optax
        lr, (b1, b2), eps = o.get("lr", 1e-3), tuple(o.get("betas", (0.9, 0.999))), o.get("eps", 1e-8)
        wd = o.get("weight_decay", 0.0)
        if o.get("amsgrad") or o.get("maximize"):
            raise ValueError("optax's Adam has no maximize and a different amsgrad (not declared)")
        if o.get("decoupled"):
            return optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=wd)
        adam = optax.adam(lr, b1=b1, b2=b2, eps=eps)
        return optax.chain(optax.add_decayed_weights(wd), adam) if wd else adam

    def adam(self, problem: Any) -> dict:
        jax, optax = self.jax, self.optax
        tx = self._transform(problem.options)
        params = {"lora_a": self._array(problem.A.T), "lora_b": self._array(problem.B.T)}
        grads = [{"lora_a": self._array(g["A"].T), "lora_b": self._array(g["B"].T)} for g in problem.grads]

        @jax.jit
        def run(params: Any, grads: Any) -> Any:
            state = tx.init(params)
            for g in grads:  # a few steps: unrolled
                updates, state = tx.update(g, state, params)
                params = optax.apply_updates(params, updates)
            return params

        out = run(params, grads)
        return {"A": np.asarray(out["lora_a"]).T, "B": np.asarray(out["lora_b"]).T}

    def init(self, d_in: int, d_out: int, rank: int, init: str, seed: int) -> dict:
        nnx, f64 = self.nnx, self.jnp.float64
        model = nnx.LoRALinear(d_in, d_out, lora_rank=rank, param_dtype=f64, lora_param_dtype=f64,
                               rngs=nnx.Rngs(seed))  # a_initializer he_uniform, b_initializer zeros: the defaults
        return {"A": np.asarray(model.lora.lora_a.get_value()).T, "B": np.asarray(model.lora.lora_b.get_value()).T}
