"""LoRA+ (Hayou, Ghosh & Yu 2024, arXiv 2402.12354): B learns ``ratio`` times faster than A.

Grouping as PEFT ``optimizers/loraplus.py`` ``create_loraplus_optimizer`` (lr = eta_A):

    embedding layers (A and B of a layer listed in ``embeddings``)              lr_embedding, wd
    leaves named "B", and every 1-D leaf (DoRA magnitude, lora bias, biases)     lr * ratio, wd
        ...except leaves named "b"/"bias" (PEFT: names containing "bias")        lr * ratio, no decay
    everything else (A)                                                           lr, wd

``adam_step_lrs`` is Adam/AdamW with one learning rate and weight decay per leaf, each leaf
updated exactly as ``optim.adam_step`` would with that leaf's values (``torch.optim`` parameter
groups).
"""

from __future__ import annotations

from typing import Any

from autograd.tracer import getval

from minilora._checks import check_bool, check_real
from minilora._tree import check_same_structure, tree_leaves, tree_paths
from minilora._tree import tree_unflatten as _unflatten
from minilora.errors import MiniLoraTypeError, MiniLoraValueError
from minilora.optim import adam_apply, adam_options, check_adam_state

__all__ = ["loraplus_lrs", "adam_step_lrs"]


def _group(path: tuple[str, ...], leaf: Any, embeddings: set) -> str:
    name = path[-1] if path else ""
    # PEFT looks the owner up two name levels up: for an embedding's DoRA magnitude
    # (``emb.lora_magnitude_vector.default.weight``) that is the DoRA sub-layer, not the
    # Embedding, so it falls in the B group like any 1-D tensor
    if any(p in embeddings for p in path) and name not in ("m", "magnitude"):
        return "embedding"
    if name in ("b", "bias", "lora_bias"):
        return "B_no_decay"
    if name == "B" or getattr(getval(leaf), "ndim", 2) == 1:
        return "B"
    return "A"


def _paths(tree: Any) -> list[tuple[tuple[str, ...], Any]]:
    """Leaves with their paths as strings (PEFT matches parameter names, which are strings)."""
    return [(tuple(str(k) for k in path), leaf) for path, leaf in tree_paths(tree)]


def loraplus_lrs(params: Any, lr: float, ratio: float, *, lr_embedding: float = 1e-6, weight_decay: float = 0.0,
                 embeddings: Any = ()) -> tuple[Any, Any]:
    """(learning-rate tree, weight-decay tree) shaped like ``params`` (floats as leaves), grouped
    as PEFT's ``create_loraplus_optimizer(lr=lr, loraplus_lr_ratio=ratio,
    loraplus_lr_embedding=lr_embedding, loraplus_weight_decay=weight_decay)``. embeddings:
    names of the (sub)dicts holding embedding adapters."""
    lr, ratio = check_real(lr, "lr", low=0.0), check_real(ratio, "ratio", low=0.0)
    lr_embedding = check_real(lr_embedding, "lr_embedding", low=0.0)
    weight_decay = check_real(weight_decay, "weight_decay", low=0.0)
    if isinstance(embeddings, str) or not isinstance(embeddings, list | tuple | set | frozenset):
        raise MiniLoraTypeError(f"embeddings must be a list of names; got {type(embeddings).__name__}")
    emb = set(embeddings)
    table = {"A": (lr, weight_decay), "embedding": (lr_embedding, weight_decay),
             "B": (lr * ratio, weight_decay), "B_no_decay": (lr * ratio, 0.0)}
    groups = [table[_group(path, leaf, emb)] for path, leaf in _paths(params)]
    return _unflatten(params, [g[0] for g in groups]), _unflatten(params, [g[1] for g in groups])


def adam_step_lrs(params: Any, grads: Any, state: dict, *, lrs: Any, weight_decays: Any = None,
                  betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, decoupled: bool = False,
                  amsgrad: bool = False, maximize: bool = False) -> tuple[Any, dict]:
    """One Adam/AdamW step with per-leaf ``lrs`` (and ``weight_decays``, default 0): trees of
    floats shaped like params (e.g. from ``loraplus_lrs``). State from ``adam_init``."""
    amsgrad = check_bool(amsgrad, "amsgrad")
    check_adam_state(params, state, amsgrad)
    grads = getval(grads)
    check_same_structure(params, grads, "grads", same_dtype=True)
    lr_leaves = tree_leaves(lrs)
    wd_leaves = tree_leaves(weight_decays) if weight_decays is not None else [0.0] * len(lr_leaves)
    p_leaves, g_leaves = tree_leaves(params), tree_leaves(grads)
    if not (len(lr_leaves) == len(wd_leaves) == len(p_leaves)):
        raise MiniLoraValueError(f"lrs/weight_decays must have one entry per parameter ({len(p_leaves)}); got "
                         f"{len(lr_leaves)} and {len(wd_leaves)}")
    m, v = tree_leaves(state["m"]), tree_leaves(state["v"])
    vmax = tree_leaves(state["v_max"]) if amsgrad else [None] * len(m)
    out = []
    for i, (p, g) in enumerate(zip(p_leaves, g_leaves, strict=True)):
        opts = adam_options(lr=lr_leaves[i], betas=betas, eps=eps, weight_decay=wd_leaves[i], decoupled=decoupled,
                            amsgrad=amsgrad, maximize=maximize)
        one = {"step": state["step"], "m": [m[i]], "v": [v[i]]}
        if amsgrad:
            one["v_max"] = [vmax[i]]
        new_p, new_s = adam_apply([p], [g], one, opts)
        out.append((new_p[0], new_s["m"][0], new_s["v"][0], new_s["v_max"][0] if amsgrad else None))
    new_state = {"step": int(state["step"]) + 1, "m": _unflatten(params, [o[1] for o in out]),
                 "v": _unflatten(params, [o[2] for o in out])}
    if amsgrad:
        new_state["v_max"] = _unflatten(params, [o[3] for o in out])
    return _unflatten(params, [o[0] for o in out]), new_state


