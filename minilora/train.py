"""Gradients and the training loop.

Freezing is simply *which argument you differentiate*: ``grad(loss)(lora, frozen, x, y)``
gives the gradient for ``lora`` only, and the fused primitives never compute the frozen
weight's gradient.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable
from typing import Any

import autograd
import numpy as np
from autograd.core import make_vjp, vspace
from autograd.tracer import getval

from minilora._checks import check_bool, check_count, check_floats
from minilora._tree import check_same_structure, labelled_leaves, tree_flatten
from minilora.backend import namespace_of
from minilora.errors import MiniLoraTypeError, MiniLoraValueError, NonFiniteError
from minilora.optim import AdamOptions, adam_apply, adam_init, adam_leaf, adam_options, check_adam_state

__all__ = ["grad", "value_and_grad", "hvp", "count_params", "fit"]


def _register(tree: Any) -> None:
    """Make autograd able to box any non-NumPy array type found in the arguments."""
    for _, leaf in labelled_leaves(tree):
        if hasattr(leaf, "__array_namespace__") and not isinstance(leaf, autograd.tracer.Box):
            namespace_of(leaf)  # registers the type as a side effect


def grad(fun: Callable, argnum: int | tuple[int, ...] = 0) -> Callable:
    """autograd's ``grad`` (gradient of a scalar function w.r.t. argument ``argnum``), also for
    non-NumPy array types: the returned function has the structure of that argument."""
    _check_callable(fun, "fun")
    argnum = _check_argnum(argnum)
    g = _lean_value_and_grad(fun, argnum) if type(argnum) is int else autograd.grad(fun, argnum)

    @functools.wraps(fun)
    def grad_fun(*args: Any, **kwargs: Any) -> Any:
        _check_argnums_in_range(argnum, args)
        _register(args)
        _check_differentiable(args, argnum)
        out = g(*args, **kwargs)
        return out[1] if type(argnum) is int else out

    return grad_fun


def value_and_grad(fun: Callable, argnum: int | tuple[int, ...] = 0) -> Callable:
    """autograd's ``value_and_grad``: returns ``(fun(*args), gradient w.r.t. argnum)``."""
    _check_callable(fun, "fun")
    argnum = _check_argnum(argnum)
    vg = _lean_value_and_grad(fun, argnum) if type(argnum) is int else autograd.value_and_grad(fun, argnum)

    @functools.wraps(fun)
    def value_and_grad_fun(*args: Any, **kwargs: Any) -> Any:
        _check_argnums_in_range(argnum, args)
        _register(args)
        _check_differentiable(args, argnum)
        return vg(*args, **kwargs)

    return value_and_grad_fun


def _check_callable(fun: Any, name: str) -> None:
    if not callable(fun):
        raise MiniLoraTypeError(f"{name} must be a function; got {type(fun).__name__}")


def _check_argnum(argnum: Any) -> int | tuple[int, ...]:
    """An argument index (an int; NumPy integers accepted) or a non-empty tuple of them."""
    def index(a: Any) -> int | None:
        return None if isinstance(a, bool) or not isinstance(a, numbers.Integral) else int(a)

    if (i := index(argnum)) is not None:
        return i
    if isinstance(argnum, tuple) and argnum and all(index(a) is not None for a in argnum):
        return tuple(int(a) for a in argnum)
    raise MiniLoraTypeError(f"argnum must be an int or a non-empty tuple of ints; got {argnum!r} "
                            f"({type(argnum).__name__})")


def _check_differentiable(args: tuple, argnum: int | tuple[int, ...]) -> None:
    """Every leaf of a differentiated argument has a vector space (floats and arrays): None or a
    string was autograd's raw TypeError from inside the trace."""
    for i in (argnum,) if isinstance(argnum, int) else argnum:
        if not -len(args) <= i < len(args):
            continue  # the int's range is checked by the call itself
        for path, leaf in labelled_leaves(args[i]) or [("", args[i])]:
            try:
                vspace(leaf)
            except TypeError:
                raise MiniLoraTypeError(f"argument {i}{path} cannot be differentiated: it is a {type(leaf).__name__} "
                                        "(differentiate float arrays or numbers)") from None


def _check_argnums_in_range(argnum: int | tuple[int, ...], args: tuple) -> None:
    """A tuple argnum's indices against the call's positional arguments (an int's: in the
    lean path, ``_lean_value_and_grad``)."""
    if type(argnum) is tuple:
        for a in argnum:
            if not -len(args) <= a < len(args):
                raise MiniLoraValueError(f"argnum {argnum} is out of range for {len(args)} positional arguments")


def _lean_value_and_grad(fun: Callable, argnum: int = 0) -> Callable:
    """``autograd.value_and_grad(fun, argnum)`` for one argument: the same trace and backward
    pass (``autograd.core.make_vjp``), without the wrappers autograd rebuilds on every call,
    which cost as much as a seed-sized product."""

    def vg(*args: Any, **kwargs: Any) -> tuple[Any, Any]:
        if not -len(args) <= argnum < len(args):
            raise MiniLoraValueError(f"argnum {argnum} is out of range for {len(args)} positional arguments")
        i = argnum % len(args)

        def unary(p: Any) -> Any:
            return fun(*args[:i], p, *args[i + 1:], **kwargs)

        vjp, ans = make_vjp(unary, args[i])
        if type(ans) in _NUMPY_SCALARS or type(ans) is np.ndarray:
            if ans.size != 1:
                raise MiniLoraTypeError(f"the loss must be a scalar; the function returned shape {ans.shape}")
            return ans, vjp(np.ones(ans.shape, ans.dtype))
        try:
            space = vspace(ans)
        except TypeError:
            raise MiniLoraTypeError(f"the loss (the differentiated function's result) must be a real scalar "
                                    f"(a float or a 0-d float array); got {type(ans).__name__}") from None
        if space.size != 1:
            raise MiniLoraTypeError(f"the loss must be a scalar; the function returned "
                                    f"{type(ans).__name__} of size {space.size}")
        return ans, vjp(space.ones())

    return vg


_NUMPY_SCALARS = (np.float64, np.float32, np.float16)


def hvp(fun: Callable, argnum: int = 0) -> Callable:
    """The Hessian-vector product of a scalar function: ``hvp(f, argnum)(*args, v)`` is
    H v, where H is the Hessian of ``f`` with respect to argument ``argnum`` at ``args`` and the
    vector ``v`` (the last positional argument) has that argument's structure and shapes (for an
    adapter dict {"A": (r, d_in), "B": (d_out, r)}, a dict of the same keys and shapes). The result
    has that structure too.

    Computed forward-over-reverse (a JVP of ``grad``), exact to rounding; every minilora
    primitive is differentiable to any order, so this holds for any function built from them.
    """
    _check_callable(fun, "fun")
    checked = _check_argnum(argnum)  # NumPy integers accepted, as by grad
    if type(checked) is not int:
        raise MiniLoraTypeError(f"hvp takes one argnum (an int); got {argnum!r} ({type(argnum).__name__})")
    argnum = checked
    vg = _lean_value_and_grad(fun, argnum)

    @functools.wraps(fun)
    def hvp_fun(*args_and_v: Any, **kwargs: Any) -> Any:
        if len(args_and_v) < 2:
            raise MiniLoraValueError("hvp(f, argnum)(*args, v) takes the function's arguments and then the vector v")
        *args, v = args_and_v
        if not -len(args) <= argnum < len(args):
            raise MiniLoraValueError(f"argnum {argnum} is out of range for {len(args)} positional arguments")
        i = argnum % len(args)
        check_same_structure(args[i], v, "v")
        _register((args, v))

        def grad_at(p: Any) -> Any:
            return vg(*args[:i], p, *args[i + 1:], **kwargs)[1]

        return autograd.make_jvp(grad_at)(args[i])(v)[1]

    return hvp_fun


def count_params(tree: Any) -> int:
    """Total number of scalars in a tree (dict/list/tuple) of arrays."""
    total = 0
    for path, leaf in labelled_leaves(getval(tree)):
        shape = getattr(leaf, "shape", None)
        if shape is None:
            raise MiniLoraTypeError(f"tree{path} must be an array; got {type(leaf).__name__}")
        total += math.prod(shape)
    return total


class _FlatAdam:
    """``fit``'s Adam on one array: the leaves of params, m, v (and v_max) laid end to end, so each
    of the update's thirteen elementwise passes runs once per step instead of once per leaf.
    Bit-identical to ``adam_apply`` leaf by leaf (the update is elementwise). Used only when every
    leaf is a NumPy array of one float dtype. Every step makes new arrays (nothing handed out is
    written again): the params given to a callback or returned are views of a fresh buffer.
    """

    def __init__(self, params: Any, state: dict, opts: AdamOptions) -> None:
        leaves, self.rebuild = tree_flatten(params)
        self.shapes = [leaf.shape for leaf in leaves]
        # a flat dict of arrays (the usual adapter): its gradient's leaves are its values, in order
        self.flat_dict = type(params) is dict and all(type(v) is np.ndarray for v in params.values())
        self.keys = tuple(params) if self.flat_dict else ()
        self.params_like = params  # the structure only (its arrays are never read)
        ends = np.cumsum([leaf.size for leaf in leaves]).tolist()
        self.slices = [(slice(end - leaf.size, end), leaf.shape) for end, leaf in zip(ends, leaves, strict=True)]
        self.dtype = leaves[0].dtype
        self.opts = opts
        self.t = int(state["step"])
        self.p = self.join(leaves)
        self.m, self.v = self.join(tree_flatten(state["m"])[0]), self.join(tree_flatten(state["v"])[0])
        self.v_max = self.join(tree_flatten(state["v_max"])[0]) if opts.amsgrad else None

    @staticmethod
    def usable(params: Any, state: dict) -> bool:
        leaves = tree_flatten(params)[0]
        if not leaves or type(leaves[0]) is not np.ndarray or leaves[0].dtype.kind != "f":
            return False
        dt = leaves[0].dtype
        trees = [params, state["m"], state["v"]] + ([state["v_max"]] if "v_max" in state else [])
        return all(type(a) is np.ndarray and a.dtype == dt for tree in trees for a in tree_flatten(tree)[0])

    def join(self, leaves: list) -> Any:
        return np.concatenate([a.reshape(-1) for a in leaves]) if len(leaves) > 1 else leaves[0].reshape(-1).copy()

    def split(self, flat: Any) -> Any:
        return self.rebuild([flat[sl].reshape(shape) for sl, shape in self.slices])

    def grads_fit(self, grads: Any) -> list | None:
        """The gradient's leaves if they are what this path handles (else None: use the tree path)."""
        if type(grads) is dict and self.flat_dict:
            if tuple(grads) != self.keys:  # same keys in another order: the tree path names it
                return None
            leaves = list(grads.values())
        else:
            try:
                check_same_structure(self.params_like, grads, "the loss's gradient")
            except MiniLoraValueError:
                return None  # the tree path raises it
            leaves = tree_flatten(grads)[0]
        for g, shape in zip(leaves, self.shapes, strict=False):
            if type(g) is not np.ndarray or g.dtype != self.dtype or g.shape != shape:
                return None
        return leaves if len(leaves) == len(self.shapes) else None

    def step(self, grad_leaves: list) -> Any:
        self.t += 1
        self.p, self.m, self.v, self.v_max = adam_leaf(self.opts, self.t, self.p, self.join(grad_leaves),
                                                       self.m, self.v, self.v_max)
        return self.split(self.p)

    def moments(self) -> tuple:
        """This step's (t, m, v, v_max): a tuple, no copy (the arrays are never written again)."""
        return (self.t, self.m, self.v, self.v_max)

    def state_of(self, moments: tuple) -> dict:
        t, m, v, v_max = moments
        out = {"step": t, "m": self.split(m), "v": self.split(v)}
        if v_max is not None:
            out["v_max"] = self.split(v_max)
        return out

    def state(self) -> dict:
        return self.state_of(self.moments())


def fit(
    loss_fn: Callable[..., Any],
    params: Any,
    data_or_args: Any = (),
    *,
    steps: int,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decoupled: bool = False,
    amsgrad: bool = False,
    state: dict | None = None,
    callback: Callable[[int, float, Any, dict], Any] | None = None,
    return_state: bool = False,
) -> tuple[Any, ...]:
    """Train ``params`` with Adam on ``loss_fn(params, *args)`` for ``steps`` steps.

    data_or_args: a tuple of extra arguments used at every step (e.g. ``(frozen, x, y)``), or a
    callable ``step -> tuple`` giving each step's arguments (mini-batches). Only ``params`` is
    differentiated. ``callback(step, loss, params, state)`` runs after each update (step counts
    from 1); returning ``True`` stops early. ``state`` resumes a previous run.

    Returns ``(params, losses)``, or ``(params, losses, state)`` with ``return_state=True``;
    ``losses[i]`` is the loss *before* update i + 1, as a Python float.

    A non-finite loss raises ``NonFiniteError`` naming the step; its ``partial`` holds
    ``(params, losses, state)`` as of the last finite step, so nothing is lost.
    """
    _check_callable(loss_fn, "loss_fn")
    if callback is not None:
        _check_callable(callback, "callback")
    steps = check_count(steps, "steps")
    return_state = check_bool(return_state, "return_state")
    if not (callable(data_or_args) or isinstance(data_or_args, tuple)):
        raise MiniLoraTypeError(
            f"data_or_args must be a tuple of arguments or a callable step -> tuple; "
            f"got {type(data_or_args).__name__}"
        )
    vg = _lean_value_and_grad(loss_fn)  # array types are registered below, per new argument
    opts = adam_options(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, decoupled=decoupled,
                        amsgrad=amsgrad)
    state = adam_init(params, amsgrad=amsgrad) if state is None else state
    check_adam_state(params, state, amsgrad)
    losses: list[float] = []
    _register((params, data_or_args if isinstance(data_or_args, tuple) else ()))
    flat = _FlatAdam(params, state, opts) if _FlatAdam.usable(params, state) else None
    one_array = flat
    # the last params known finite and their state (on the one-array path its moments, made a
    # state only if needed): the error's partial
    previous: tuple = (params, state)
    for step in range(1, steps + 1):
        if callable(data_or_args):
            args = data_or_args(step)
            if type(args) is not tuple:
                raise MiniLoraTypeError(f"data_or_args({step}) must return a tuple of arguments; got {type(args).__name__}")
            _register(args)
        else:
            args = data_or_args
        loss, grads = vg(params, *args)
        if step == 1:  # what the loss gives is checked once per run, not at every step
            _check_loss_and_grads(loss, grads, params)
        value = float(loss)
        if not math.isfinite(value):
            raise _non_finite(f"loss became non-finite ({value}) at step {step}", step, params,
                              state if flat is None else flat.state(), _as_state(one_array, previous), losses)
        losses.append(value)
        previous = (params, state if flat is None else flat.moments())
        leaves = None if flat is None else flat.grads_fit(grads)
        if leaves is not None:
            params = flat.step(leaves)  # type: ignore[union-attr]
        else:
            if flat is not None:  # a gradient this path does not handle: the tree path from here on
                state, flat = flat.state(), None
            check_same_structure(params, grads, "the loss's gradient")  # fast for a flat dict
            params, state = adam_apply(params, grads, state, opts)
        if callback is not None and callback(step, value, params, state if flat is None else flat.state()) is True:
            break
    if flat is not None:
        state = flat.state()
    if losses and not _all_finite(params):  # the last gradient went non-finite, the loss never saw it
        raise _non_finite(f"params became non-finite at step {len(losses)} (a non-finite gradient)",
                          len(losses) + 1, params, state, _as_state(one_array, previous), losses)
    return (params, losses, state) if return_state else (params, losses)


def _check_loss_and_grads(loss: Any, grads: Any, params: Any) -> None:
    """The loss is a real float scalar (shape ()) and its gradient has the params' dtypes."""
    value = getval(loss)
    if not isinstance(value, float | np.floating):
        if not (hasattr(value, "shape") and hasattr(value, "dtype")):
            raise MiniLoraTypeError(f"loss_fn must return a real scalar (a float or a 0-d float array); "
                                    f"got {type(value).__name__}")
        check_floats(**{"loss_fn's result": value})
        if tuple(value.shape) != ():
            raise MiniLoraTypeError(f"loss_fn must return a real scalar of shape (); got shape {tuple(value.shape)}")
    check_same_structure(params, getval(grads), "the gradient of loss_fn", same_dtype=True)


def _all_finite(tree: Any) -> bool:
    for _, leaf in labelled_leaves(tree):
        xp = namespace_of(leaf)
        if not bool(xp.all(xp.isfinite(leaf))):
            return False
    return True


def _as_state(one_array: Any, previous: tuple) -> tuple:
    """(params, state) from fit's ``previous``, whose state may be the one-array path's moments."""
    params, state = previous
    return (params, state) if isinstance(state, dict) else (params, one_array.state_of(state))


def _non_finite(what: str, step: int, params: Any, state: dict, previous: tuple, losses: list) -> NonFiniteError:
    """The error for a non-finite step, whose ``partial`` holds the last finite params: the
    current ones, or (after a non-finite gradient) those of the step before."""
    if losses and not _all_finite(params):
        params, state = previous
        losses = losses[:-1]
        step -= 1
    return NonFiniteError(
        f"{what}; params are returned as of step {step - 1} in the error's .partial; try a smaller lr",
        partial=(params, losses, state),
    )
