"""Adam and AdamW as pure ``init``/``step`` functions, matching ``torch.optim.Adam``/``AdamW``.

For each parameter p with gradient g, at step t = 1, 2, ... (Kingma & Ba 2015, Alg. 1;
Loshchilov & Hutter 2019 for the decoupled decay):

    Adam  (L2):    g <- g + wd * p
    AdamW:         p <- p * (1 - lr * wd)
    m <- m + (1 - b1) (g - m)                  (torch's ``lerp_``)
    v <- b2 v + (1 - b2) g^2
    v_max <- max(v_max, v)                     (amsgrad only; v_max replaces v below)
    p <- p - (lr / (1 - b1^t)) m / (sqrt(v) / sqrt(1 - b2^t) + eps)

The expressions keep PyTorch's order of rounding (``torch/optim/adam.py``, single-tensor path,
the CPU default), so a float64 run agrees with torch to the last bits for many steps.
The state is a plain dict with the step counter in it, so a run can be saved and resumed.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

import numpy as np
from autograd.tracer import getval

from minilora._checks import check_bool, check_count, check_floats, check_real
from minilora._tree import check_same_structure, labelled_leaves, tree_flatten, tree_map
from minilora.backend import namespace_of
from minilora.errors import MiniLoraTypeError, MiniLoraValueError
from minilora.ops import add_into, div_into, mul_into

__all__ = ["ADAM_DEFAULTS", "adam_init", "adam_kwargs", "adam_step"]

# Adam's hyper-parameters and their defaults (torch.optim.Adam's), the one list: adam_step's and
# fit's keywords, the problems of minilora.testing and the golden vectors' options all follow it.
ADAM_DEFAULTS: Mapping[str, Any] = MappingProxyType({
    "lr": 1e-3,
    "betas": (0.9, 0.999),
    "eps": 1e-8,
    "weight_decay": 0.0,
    "decoupled": False,
    "amsgrad": False,
    "maximize": False,
})


def adam_kwargs(options: Any) -> dict[str, Any]:
    """The Adam keywords of ``options`` (a mapping: a problem's or a vector case's options), each
    missing one at its ``ADAM_DEFAULTS`` value; other keys are left out; betas as a tuple."""
    out = {k: options.get(k, v) for k, v in ADAM_DEFAULTS.items()}
    out["betas"] = tuple(out["betas"])
    return out


def adam_init(params: Any, *, amsgrad: bool = False) -> dict:
    """Zero moments for every array in ``params`` (any dict/list/tuple tree) and step 0.

    Returns {"step": 0, "m": zeros like params, "v": zeros like params} (+ "v_max" for amsgrad).
    Every leaf must be a real floating array (integer, complex and object arrays are refused).
    """
    amsgrad = check_bool(amsgrad, "amsgrad")
    check_param_leaves(params)

    def zeros(a: Any) -> Any:
        return namespace_of(a).zeros_like(a)

    state = {"step": 0, "m": tree_map(zeros, params), "v": tree_map(zeros, params)}
    if amsgrad:
        state["v_max"] = tree_map(zeros, params)
    return state


class AdamOptions(NamedTuple):
    """Validated hyper-parameters (``adam_options``), so a loop checks them once."""

    lr: float
    b1: float
    b2: float
    eps: float
    weight_decay: float
    decoupled: bool
    amsgrad: bool
    maximize: bool


def adam_options(
    *,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decoupled: bool = False,
    amsgrad: bool = False,
    maximize: bool = False,
) -> AdamOptions:
    """Check Adam's hyper-parameters: lr, eps, weight_decay >= 0 and both betas in [0, 1)."""
    lr = check_real(lr, "lr", low=0.0)
    if not (isinstance(betas, tuple | list) and len(betas) == 2):
        raise MiniLoraValueError(f"betas must be a pair (beta1, beta2); got {betas!r}")
    b1 = check_real(betas[0], "betas[0]", low=0.0, high=1.0, high_open=True)
    b2 = check_real(betas[1], "betas[1]", low=0.0, high=1.0, high_open=True)
    eps = check_real(eps, "eps", low=0.0)
    wd = check_real(weight_decay, "weight_decay", low=0.0)
    return AdamOptions(lr, b1, b2, eps, wd, check_bool(decoupled, "decoupled"), check_bool(amsgrad, "amsgrad"),
                       check_bool(maximize, "maximize"))


def adam_step(
    params: Any,
    grads: Any,
    state: dict,
    *,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decoupled: bool = False,
    amsgrad: bool = False,
    maximize: bool = False,
) -> tuple[Any, dict]:
    """One Adam (``decoupled=True``: AdamW) update. Pure: returns ``(new_params, new_state)``.

    params, grads: trees of arrays with the same structure and shapes; state from ``adam_init``
    (or a previous step). ``amsgrad`` and ``maximize`` as in ``torch.optim.Adam``.
    """
    opts = adam_options(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, decoupled=decoupled,
                        amsgrad=amsgrad, maximize=maximize)
    check_adam_state(params, state, opts.amsgrad)
    grads = getval(grads)
    check_same_structure(params, grads, "grads", same_dtype=True)
    return adam_apply(params, grads, state, opts)


def check_param_leaves(params: Any) -> None:
    """Every leaf of ``params`` is a real floating array (NumPy or another backend's)."""
    if type(params) is dict:  # fast path, run at every adam_step: a flat dict of float arrays
        for p in params.values():
            if type(p) is not np.ndarray or p.dtype.kind != "f" or not p.dtype.isnative:
                break
        else:
            return
    for path, leaf in labelled_leaves(params):
        if not (hasattr(leaf, "shape") and hasattr(leaf, "dtype")):
            raise MiniLoraTypeError(f"params{path} must be an array; got {type(leaf).__name__}")
        check_floats(**{f"params{path}": leaf})


def check_adam_state(params: Any, state: Any, amsgrad: bool) -> None:
    """``state`` fits ``params``: a step count, and m, v (and v_max for amsgrad) with exactly the
    params' structure, shapes and dtypes (a missing or extra leaf is refused, never dropped)."""
    if not isinstance(state, dict) or not {"step", "m", "v"} <= set(state):
        raise MiniLoraValueError("state must be the dict returned by adam_init (keys 'step', 'm', 'v')")
    if amsgrad and "v_max" not in state:
        raise MiniLoraValueError("amsgrad=True needs a state from adam_init(params, amsgrad=True)")
    check_count(state["step"], "state['step']")
    check_param_leaves(params)
    for key in ("m", "v", "v_max") if amsgrad else ("m", "v"):
        check_same_structure(params, state[key], f"state[{key!r}]", same_dtype=True)


def adam_leaf(opts: AdamOptions, t: int, p: Any, g: Any, m: Any, v: Any, v_max: Any = None) -> tuple[Any, ...]:
    """Update number ``t`` (from 1) of one leaf: returns (p, m, v, v_max), all new arrays (the
    inputs are never written). Elementwise, so it is the same on a leaf or on several leaves laid
    end to end in one array (``fit`` does that).

    Each line keeps torch's order of rounding; the temporaries are reused in place on NumPy.
    """
    lr, b1, b2, eps, wd, decoupled, _, maximize = opts
    step_size = lr / (1 - b1**t)
    bc2_sqrt = (1 - b2**t) ** 0.5
    w = 1 - b1
    xp = namespace_of(p, g)
    if maximize:
        g = -g
    if wd != 0.0:
        if decoupled:
            p = p * (1 - lr * wd)
        else:
            g = g + p * wd
    if w < 0.5:
        m = add_into(mul_into(g - m, w), m)  # m + w (g - m): torch's lerp for weights < 0.5
    else:
        m = g - mul_into(g - m, 1 - w)
    v = add_into(v * b2, mul_into((1 - b2) * g, g))
    if v_max is not None:
        v_max = xp.maximum(v_max, v)
    denom = add_into(div_into(xp.sqrt(v if v_max is None else v_max), bc2_sqrt), eps)
    out: tuple[Any, ...] = (add_into(div_into(m * (-step_size), denom), p), m, v, v_max)
    if type(p) is np.ndarray and p.ndim == 0:  # NumPy turns 0-d results into scalars: keep arrays
        out = tuple(None if a is None else np.asarray(a) for a in out)
    return out


def adam_apply(params: Any, grads: Any, state: dict, opts: AdamOptions) -> tuple[Any, dict]:
    """The update itself, on already validated inputs (``adam_step`` checks them first)."""
    t = int(state["step"]) + 1
    amsgrad = opts.amsgrad
    p_leaves, rebuild = tree_flatten(params)
    ms, vs = tree_flatten(state["m"])[0], tree_flatten(state["v"])[0]
    v_maxes = tree_flatten(state["v_max"])[0] if amsgrad else [None] * len(p_leaves)
    # The lengths were checked by adam_step (check_adam_state); strict zips cost ~1 us a step here.
    flat = [adam_leaf(opts, t, *leaf) for leaf in zip(p_leaves, tree_flatten(grads)[0], ms, vs, v_maxes, strict=False)]
    columns = list(zip(*flat, strict=False)) if flat else [(), (), (), ()]
    new_params, m, v, v_max = (rebuild(col) for col in columns)
    new_state = {"step": t, "m": m, "v": v}
    if amsgrad:
        new_state["v_max"] = v_max
    return new_params, new_state
