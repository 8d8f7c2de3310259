"""The seed experiment: fine-tune a 100x100 identity with rank-4 LoRA towards a rank-1 target.

From the blog post in ``shared/seed`` (PyTorch):

    W = I(100)                          frozen, 10,000 parameters
    W_finetuned[:, i] = i * 1 (i >= 1), W_finetuned[:, 0] = 1
    x ~ U(0, 1) of shape (32, 100),     target = x @ W_finetuned
    out = x @ (W + W_B @ W_A)           W_B (100, r) = 0, W_A (r, 100) ~ N(0, 1): 800 parameters
    Adam(lr=1e-2), 1000 steps of mean L1 loss, then W += (alpha / r) W_B @ W_A with alpha = r

The blog stores W as (d_in, d_out) and multiplies ``x @ W``: that is ``fan_in_fan_out``. In
PEFT's names (A (r, d_in) is applied to x first, B (d_out, r) second) the blog's factors are
A = W_B^T and B = W_A^T. So the blog puts the *zero* factor on the input side, the opposite of
the paper and PEFT (A random, B = 0). ``orientation="seed"`` (the default) reproduces the blog
exactly; ``orientation="peft"`` uses ``lora_init(init="normal")`` (A ~ N(0, 1), B = 0) with the
same random numbers. The two train differently on this problem: run
``minilora demo --orientation peft`` to see it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from minilora._checks import check_choice, check_dim, check_rank, check_real, check_rng
from minilora.backend import get_backend, namespace_of, to_numpy
from minilora.errors import MiniLoraValueError
from minilora.layers import lora_dense, lora_scale, merge
from minilora.losses import l1_loss
from minilora.train import count_params, fit

__all__ = ["seed_experiment", "ORIENTATIONS"]

ORIENTATIONS = ("seed", "peft")


def seed_problem(rng: Any, d: int = 100, rank: int = 4, *, dtype: Any = "float64",
                 orientation: str = "seed") -> dict:
    """The seed's arrays on the active backend: frozen {"W": (d, d)} in (d_in, d_out) layout,
    lora {"A": (rank, d), "B": (d, rank)}, x (32, d), target (32, d), W_finetuned (d, d)."""
    rng = check_rng(rng)
    d, rank = check_dim(d, "d"), check_rank(rank)
    check_choice(orientation, "orientation", ORIENTATIONS)
    be = get_backend()
    dt = be.dtype(dtype)
    W_finetuned = np.ones((d, d))
    W_finetuned[:, 1:] *= np.arange(1, d)  # column i scaled by i; column 0 stays 1
    x = rng.random((32, d))
    W_A = rng.standard_normal((rank, d))  # the blog's nn.init.normal_(W_A)
    zeros = np.zeros((rank, d))
    A, B = (zeros, W_A.T) if orientation == "seed" else (W_A, zeros.T)
    return {
        "frozen": {"W": be.asarray(np.eye(d), dt)},
        "lora": {"A": be.asarray(A, dt), "B": be.asarray(B, dt)},
        "x": be.asarray(x, dt),
        # the target is computed in the working dtype, as the blog does in float32
        "target": be.asarray(x, dt) @ be.asarray(W_finetuned, dt),
        "W_finetuned": be.asarray(W_finetuned, dt),
    }


def _loss(lora: dict, frozen: dict, x: Any, target: Any, scale: float) -> Any:
    return l1_loss(lora_dense(frozen, lora, x, scale=scale, fan_in_fan_out=True), target)


def seed_experiment(
    *,
    steps: int = 1000,
    rank: int = 4,
    seed: int = 0,
    dtype: str = "float64",
    lr: float = 1e-2,
    orientation: str = "seed",
    callback: Callable[[int, float, Any, dict], Any] | None = None,
) -> dict:
    """Run the seed experiment on the active backend and report what the blog reports.

    Returns a dict: original_params, lora_params, losses (list), losses_first, losses_last,
    rel_error (||W_merged - W_finetuned||_F / ||W_finetuned||_F), max_abs_error, seconds, and
    the settings used.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise MiniLoraValueError(f"steps must be a positive integer; got {steps!r}")
    lr = check_real(lr, "lr", low=0.0)
    start = time.perf_counter()
    prob = seed_problem(seed, 100, rank, dtype=dtype, orientation=orientation)
    alpha = rank  # the blog: alpha = rank, so the scale is 1
    scale = lora_scale(alpha, rank)
    lora, losses = fit(
        _loss, prob["lora"], (prob["frozen"], prob["x"], prob["target"], scale),
        steps=steps, lr=lr, callback=callback,
    )
    merged = merge(prob["frozen"], lora, scale=scale, fan_in_fan_out=True)["W"]
    diff = merged - prob["W_finetuned"]
    xp = namespace_of(diff)
    rel = float(xp.sqrt(xp.sum(diff * diff)) / xp.sqrt(xp.sum(prob["W_finetuned"] ** 2)))
    max_abs = float(xp.max(xp.abs(diff)))
    seconds = time.perf_counter() - start
    return {
        "original_params": count_params(prob["frozen"]),
        "lora_params": count_params(lora),
        "losses": losses,
        "losses_first": losses[0],
        "losses_last": losses[-1],
        "rel_error": rel,
        "max_abs_error": max_abs,
        "seconds": seconds,
        "steps": steps,
        "rank": rank,
        "seed": seed,
        "dtype": dtype,
        "lr": lr,
        "alpha": alpha,
        "orientation": orientation,
        "backend": get_backend().name,
        "merged_W_corner": to_numpy(merged[:3, :3]).tolist(),
    }
