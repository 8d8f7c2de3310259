"""Bounds for Adam/AdamW steps: how far an honest implementation in a given dtype may end from
the exact trajectory (the first-order error analysis of ``adam_bounds``; the dot-product bounds
of the layer are in ``minilora.testing.tolerance``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from minilora._checks import check_bool
from minilora.testing.tolerance import SAFETY, dtype_name, gamma, unit_roundoff

__all__ = ["adam_bounds"]


def adam_bounds(
    params: dict,
    grads: list[dict],
    *,
    dtype: Any,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float | Sequence[float] = 1e-8,
    weight_decay: float = 0.0,
    decoupled: bool = False,
    amsgrad: bool = False,
    maximize: bool = False,  # negates the gradients: the magnitudes, so the bounds, are the same
    bias_correction: Any = "float64",
    inputs: Any = None,
    reference: Any = "float64",
    safety: float = SAFETY,
    model: str = "worst",
) -> dict[str, np.ndarray]:
    """Elementwise tolerances for the parameters after ``len(grads)`` Adam/AdamW steps from
    ``params`` (dict of arrays) fed the fixed gradients ``grads`` (a list of dicts).

    The error of each state variable is carried through the exact float64 trajectory to first
    order: m's rounding errs by gamma_3 times its magnitude (the same average of |g|), v's by
    gamma_3 v (all terms are positive), sqrt halves a relative error, the denominator
    d = sqrt(v)/c2 + eps adds gamma_2 d, the ratio q = m/d errs by (e_m + |q| e_d)/(d - e_d),
    and the update p - (lr/c1) q adds gamma_2 (lr/c1)|q| + u |p|. With L2 decay (not
    decoupled) the parameter's error feeds back into the gradient as wd * e_p. The result is
    infinite where d - e_d <= 0: that dtype cannot resolve the step at all.

    ``bias_correction``: the dtype 1 - beta^t is computed in (float64 in torch, whose step
    count is a Python number; float32 in Keras, MLX and optax without x64). Rounding beta and
    its power costs gamma_(t+1) beta^t / (1 - beta^t) + u relative in c = 1 - beta^t, 1.2e-4 at
    beta2 = 0.999 and t = 1 in float32, charged on the step (c1) and on sqrt(v)/c2.

    ``eps``: a number, or one per step (Keras' epsilon-hat is torch's eps / sqrt(1 - beta2^t)
    at step t). ``inputs``: a dtype narrower than the values given, which the implementation
    rounds the parameters and gradients to on the way in (Keras' float32 LoRA factors under a
    float64 layer): u |p0| starts the parameter's error and u |g| adds to each gradient's.
    """
    steps_eps = [float(e) for e in eps] if isinstance(eps, Sequence) else [float(eps)] * len(grads)
    if len(steps_eps) != len(grads):
        raise ValueError(f"eps must be a number or one per step ({len(grads)}); got {len(steps_eps)}")
    u_in = 0.0 if inputs is None else unit_roundoff(inputs)
    decoupled, amsgrad = check_bool(decoupled, "decoupled"), check_bool(amsgrad, "amsgrad")
    check_bool(maximize, "maximize")
    b1, b2 = betas
    out = {}
    for key, p0 in params.items():
        total = np.zeros(np.shape(p0))
        for which, dt in enumerate((dtype, reference)):
            if dt is None:
                continue
            u = unit_roundoff(dt)
            g2, g3 = gamma(2, dt), gamma(3, dt)
            p = np.array(p0, dtype=np.float64)
            m = np.zeros_like(p)
            v = np.zeros_like(p)
            vmax = np.zeros_like(p)
            M = np.zeros_like(p)
            e_p = (u_in if which == 0 else 0.0) * np.abs(p)
            e_m = np.zeros_like(p)
            e_v = np.zeros_like(p)
            e_vmax = np.zeros_like(p)
            with np.errstate(divide="ignore", invalid="ignore"):
                for t, grad in enumerate(grads, start=1):
                    g = np.array(grad[key], dtype=np.float64)
                    e_g = (u_in if which == 0 else 0.0) * np.abs(g)
                    if weight_decay and decoupled:
                        p = p * (1 - lr * weight_decay)
                        e_p = e_p * (1 - lr * weight_decay) + g2 * np.abs(p)
                    elif weight_decay:
                        e_g = e_g + weight_decay * e_p + u * (np.abs(g) + weight_decay * np.abs(p))
                        g = g + weight_decay * p
                    c1 = 1 - b1**t
                    c2 = math.sqrt(1 - b2**t)
                    e_c1 = e_c2 = 0.0
                    if which == 0 and dtype_name(bias_correction) != "float64":
                        ub = unit_roundoff(bias_correction)
                        e_c1 = gamma(t + 1, bias_correction) * b1**t / c1 + ub
                        e_c2 = (gamma(t + 1, bias_correction) * b2**t / c2**2 + ub) / 2 + ub
                    m = b1 * m + (1 - b1) * g
                    M = b1 * M + (1 - b1) * np.abs(g)
                    e_m = b1 * e_m + (1 - b1) * e_g + g3 * M
                    v = b2 * v + (1 - b2) * g * g
                    e_v = b2 * e_v + (1 - b2) * (2 * np.abs(g) * e_g + e_g * e_g) + g3 * v
                    if amsgrad:
                        vmax, e_vmax = np.maximum(vmax, v), np.maximum(e_vmax, e_v)
                        vv, ev = vmax, e_vmax
                    else:
                        vv, ev = v, e_v
                    sq = np.sqrt(vv)
                    e_sq = np.where(ev > 0, ev / (sq + np.sqrt(np.maximum(vv - ev, 0.0))), 0.0) + u * sq
                    d = sq / c2 + steps_eps[t - 1]
                    e_d = e_sq / c2 + g2 * d + e_c2 * sq / c2
                    d_lo = d - e_d
                    q = m / d
                    e_q = np.where(d_lo > 0, (e_m + np.abs(q) * e_d) / d_lo + u * np.abs(q), np.inf)
                    step = (lr / c1) * q
                    p = p - step
                    e_p = e_p + (lr / c1) * e_q + (g2 + e_c1) * np.abs(step) + u * np.abs(p)
            total = total + safety * e_p
        out[key] = total
    return out
