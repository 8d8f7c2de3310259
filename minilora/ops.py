"""The closed set of differentiable primitives, each with its hand-written VJP (and JVP).

Like autograd's ``numpy_vjps.py``, the derivative formulas sit in one table at the bottom of
this file. Every primitive computes in the array namespace of its inputs (NumPy, CuPy,
array_api_strict, ...), so only these functions need to sit on a gradient path off NumPy.

Shapes (PyTorch/PEFT layout; ``...`` is any number of batch dimensions):
    x (..., d_in)    W (d_out, d_in), or (d_in, d_out) when fan_in_fan_out
    b (d_out,)       A (r, d_in)        B (d_out, r)        mask: x's shape (or None)

Primitives are differentiable once (first order, forward and reverse); the derivative
functions themselves are plain array code, not traced again.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import numpy as np
from autograd.extend import defjvp, defjvp_argnums, defvjp, defvjp_argnums, primitive

from minilora.backend import namespace_of

__all__ = [
    "linear", "lora_linear", "lora_linear_tree", "lora_delta", "tanh",
    "flat_rows", "right_factor", "count_elements", "add_into", "mul_into", "div_into",
]


def flat_rows(a: Any, d: int, xp: Any) -> Any:
    """(..., d) -> (n, d): batch dimensions folded into one, for the weight gradients."""
    return a if a.ndim == 2 else xp.reshape(a, (-1, d))


def add_into(y: Any, z: Any) -> Any:
    """y + z, written into y when y is a NumPy array (y must be a temporary this module made)."""
    return np.add(y, z, out=y) if type(y) is np.ndarray else y + z


def mul_into(y: Any, z: Any) -> Any:
    """y * z, written into y when y is a NumPy array (y must be a temporary this module made)."""
    return np.multiply(y, z, out=y) if type(y) is np.ndarray else y * z


def div_into(y: Any, z: Any) -> Any:
    """y / z, written into y when y is a NumPy array (y must be a temporary this module made)."""
    return np.divide(y, z, out=y) if type(y) is np.ndarray else y / z


def right_factor(W: Any, fan_in_fan_out: bool) -> Any:
    """The base weight as a (d_in, d_out) right factor: ``x @ right_factor(W)``."""
    return W if fan_in_fan_out else W.T


# ---------------------------------------------------------------- forward definitions


@primitive
def linear(x: Any, W: Any, b: Any = None, *, fan_in_fan_out: bool = False) -> Any:
    """y = x W^T + b (PyTorch ``F.linear``); with fan_in_fan_out, y = x W + b.

    x (..., d_in), W (d_out, d_in) [fan_in_fan_out: (d_in, d_out)], b (d_out,) or None
    -> y (..., d_out).
    """
    xp = namespace_of(x, W, b)
    y = xp.matmul(x, right_factor(W, fan_in_fan_out))
    return y if b is None else y + b


@primitive
def lora_linear(
    x: Any,
    W: Any,
    b: Any,
    A: Any,
    B: Any,
    mask: Any = None,
    *,
    scale: float = 1.0,
    fan_in_fan_out: bool = False,
) -> Any:
    """y = x W^T + b + scale * ((x * mask) A^T) B^T, never forming B A (paper eq. 3; PEFT
    ``tuners/lora/layer.py`` ``Linear.forward``).

    x (..., d_in), W (d_out, d_in) [fan_in_fan_out: (d_in, d_out)], b (d_out,) or None,
    A (r, d_in), B (d_out, r), mask x-shaped or None (inverted dropout, already 1/(1-p))
    -> y (..., d_out). The scale multiplies the (..., r) intermediate, the cheaper place.
    """
    xp = namespace_of(x, W, b, A, B, mask)
    xm = x if mask is None else x * mask
    h = mul_into(xp.matmul(xm, A.T), scale)  # (..., r)
    y = add_into(xp.matmul(x, right_factor(W, fan_in_fan_out)), xp.matmul(h, B.T))
    y = y if b is None else add_into(y, b)
    _remember_h(y, h)
    return y


# Some VJPs need an array their forward has just computed (lora_linear's h = s (x * mask) A^T
# for the gradient of B, the losses' d = pred - target). autograd calls a primitive's VJP maker right after
# its forward, so the forward leaves that array in a per-thread memo slot keyed by the identity
# of an array of the call (a weak reference, so the memo keeps nothing alive but the value), and
# the VJP maker takes it from there, or recomputes it when the slot holds another call's. It
# never changes a result: either way the VJP gets the same values. A slot holds one array.
_memo = threading.local()


def _remember(slot: str, key: Any, value: Any) -> None:
    try:
        setattr(_memo, slot, (weakref.ref(key), value))
    except TypeError:  # an array type without weak references: the VJP recomputes
        setattr(_memo, slot, None)


def _recall(slot: str, key: Any) -> Any:
    entry = getattr(_memo, slot, None)
    if entry is not None and entry[0]() is key:
        setattr(_memo, slot, None)
        return entry[1]
    return None


def _remember_h(y: Any, h: Any) -> None:
    _remember("h", y, h)


def _recall_h(y: Any) -> Any:
    return _recall("h", y)


@primitive
def lora_linear_tree(
    x: Any, W: Any, b: Any, lora: dict, mask: Any = None, *, scale: float = 1.0, fan_in_fan_out: bool = False
) -> Any:
    """``lora_linear`` taking the adapter as one dict {"A", "B"}: one node, and the gradient comes
    back as a dict directly, instead of a lookup node per factor and a scatter of each factor's
    gradient into a zero dict (autograd's container handling), which costs more than the seed's
    (32, 100) x (100, r) products themselves."""
    return lora_linear.fun(x, W, b, lora["A"], lora["B"], mask, scale=scale, fan_in_fan_out=fan_in_fan_out)


@primitive
def lora_delta(A: Any, B: Any, *, scale: float = 1.0, fan_in_fan_out: bool = False) -> Any:
    """Delta W = scale * B A (paper section 4.1), (d_out, d_in); transposed for fan_in_fan_out.

    A (r, d_in), B (d_out, r) -> (d_out, d_in) or (d_in, d_out).
    """
    xp = namespace_of(A, B)
    if fan_in_fan_out:
        return xp.matmul(A.T, B.T) * scale
    return xp.matmul(B, A) * scale


@primitive
def tanh(x: Any) -> Any:
    """tanh(x) elementwise in x's namespace: an activation for models on any backend
    (autograd's own ``np.tanh`` would compute on host NumPy)."""
    return namespace_of(x).tanh(x)


def count_elements(a: Any) -> int:
    n = 1
    for s in a.shape:
        n *= s
    return n


# ---------------------------------------------------------------- the derivative table
#
# Notation: g is the cotangent of the output (same shape as y), G = g folded to (n, d_out),
# X = x folded to (n, d_in), Xm = (x * mask) folded, H = Xm A^T (n, r).
#
#   linear:       dx = g W             dW = G^T X  (fif: X^T G)     db = sum_n G
#   lora_linear:  dx = g W + s (g B A) * mask       dW, db as linear
#                 dA = s (G B)^T Xm    dB = s G^T H                 dmask = s (g B A) * x
#                 (H from the forward, see _remember)
#   lora_linear_tree: as lora_linear, with (dA, dB) returned as the dict {"A": dA, "B": dB}
#   lora_delta:   dA = s B^T g         dB = s g A^T                 (fif: g transposed first)
#   tanh:         dx = g (1 - tanh(x)^2)
#
# The losses' primitives and their derivatives are in ``minilora.losses``; DoRA's and the LoRA
# embedding's in ``minilora.variants.primitives``.


def _linear_vjp(argnums: tuple[int, ...], ans: Any, args: tuple, kwargs: dict) -> Any:
    x, W = args[0], args[1]
    fif = kwargs.get("fan_in_fan_out", False)
    xp = namespace_of(x, W)

    def vjp(g: Any) -> list[Any]:
        d_out = g.shape[-1]
        out = []
        for i in argnums:
            if i == 0:
                out.append(xp.matmul(g, W.T if fif else W))
            elif i == 1:
                G, X = flat_rows(g, d_out, xp), flat_rows(x, x.shape[-1], xp)
                out.append(xp.matmul(X.T, G) if fif else xp.matmul(G.T, X))
            else:
                out.append(xp.sum(flat_rows(g, d_out, xp), axis=0))
        return out

    return vjp


def _linear_jvp(argnums: tuple[int, ...], gs: list, ans: Any, args: tuple, kwargs: dict) -> Any:
    x, W = args[0], args[1]
    fif = kwargs.get("fan_in_fan_out", False)
    xp = namespace_of(x, W)
    out = None
    for i, t in zip(argnums, gs, strict=True):
        if i == 0:
            term = xp.matmul(t, right_factor(W, fif))
        elif i == 1:
            term = xp.matmul(x, right_factor(t, fif))
        else:
            term = xp.broadcast_to(t, ans.shape)
        out = term if out is None else out + term
    return out


def _lora_linear_vjp(argnums: tuple[int, ...], ans: Any, args: tuple, kwargs: dict) -> Any:
    x, W, A, B = args[0], args[1], args[3], args[4]
    mask = args[5] if len(args) > 5 else kwargs.get("mask")
    scale = kwargs.get("scale", 1.0)
    fif = kwargs.get("fan_in_fan_out", False)
    xp = namespace_of(x, W, A, B, mask)
    d_in = x.shape[-1]
    h = _recall_h(ans) if 4 in argnums else None
    if 4 in argnums and h is None:
        h = xp.matmul(x if mask is None else x * mask, A.T) * scale  # (..., r)

    def vjp(g: Any) -> list[Any]:
        d_out = g.shape[-1]
        G = flat_rows(g, d_out, xp)
        need = set(argnums)
        gB = xp.matmul(g, B) * scale if need & {0, 3, 5} else None  # (..., r), s g B
        xm = x if mask is None else x * mask
        out = []
        for i in argnums:
            if i == 0:
                back = xp.matmul(gB, A)  # (..., d_in)
                out.append(xp.matmul(g, W.T if fif else W) + (back if mask is None else back * mask))
            elif i == 1:
                X = flat_rows(x, d_in, xp)
                out.append(xp.matmul(X.T, G) if fif else xp.matmul(G.T, X))
            elif i == 2:
                out.append(xp.sum(G, axis=0))
            elif i == 3:
                out.append(xp.matmul(flat_rows(gB, A.shape[0], xp).T, flat_rows(xm, d_in, xp)))
            elif i == 4:
                out.append(xp.matmul(G.T, flat_rows(h, A.shape[0], xp)))
            else:
                out.append(xp.matmul(gB, A) * x)
        return out

    return vjp


def _lora_linear_jvp(argnums: tuple[int, ...], gs: list, ans: Any, args: tuple, kwargs: dict) -> Any:
    x, W, A, B = args[0], args[1], args[3], args[4]
    mask = args[5] if len(args) > 5 else kwargs.get("mask")
    scale = kwargs.get("scale", 1.0)
    fif = kwargs.get("fan_in_fan_out", False)
    xp = namespace_of(x, W, A, B, mask)
    xm = x if mask is None else x * mask
    out = None
    for i, t in zip(argnums, gs, strict=True):
        if i == 0:
            tm = t if mask is None else t * mask
            term = xp.matmul(t, right_factor(W, fif)) + xp.matmul(xp.matmul(tm, A.T) * scale, B.T)
        elif i == 1:
            term = xp.matmul(x, right_factor(t, fif))
        elif i == 2:
            term = xp.broadcast_to(t, ans.shape)
        elif i == 3:
            term = xp.matmul(xp.matmul(xm, t.T) * scale, B.T)
        elif i == 4:
            term = xp.matmul(xp.matmul(xm, A.T) * scale, t.T)
        else:
            term = xp.matmul(xp.matmul(x * t, A.T) * scale, B.T)
        out = term if out is None else out + term
    return out


def _to_flat(args: tuple, kwargs: dict) -> tuple:
    """``lora_linear_tree``'s arguments as ``lora_linear``'s (x, W, b, A, B, mask)."""
    lora = args[3]
    mask = args[4] if len(args) > 4 else kwargs.get("mask")
    return (args[0], args[1], args[2], lora["A"], lora["B"], mask)


def _flat_argnums(argnums: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(n for a in argnums for n in ((3, 4) if a == 3 else ((5,) if a == 4 else (a,))))


def _lora_tree_vjp(argnums: tuple[int, ...], ans: Any, args: tuple, kwargs: dict) -> Any:
    inner = _lora_linear_vjp(_flat_argnums(argnums), ans, _to_flat(args, kwargs), kwargs)

    def vjp(g: Any) -> list[Any]:
        grads = iter(inner(g))
        return [{"A": next(grads), "B": next(grads)} if a == 3 else next(grads) for a in argnums]

    return vjp


def _lora_tree_jvp(argnums: tuple[int, ...], gs: list, ans: Any, args: tuple, kwargs: dict) -> Any:
    flat_gs = [t for a, g in zip(argnums, gs, strict=True) for t in ((g["A"], g["B"]) if a == 3 else (g,))]
    return _lora_linear_jvp(_flat_argnums(argnums), flat_gs, ans, _to_flat(args, kwargs), kwargs)


def _delta_vjp(argnums: tuple[int, ...], ans: Any, args: tuple, kwargs: dict) -> Any:
    A, B = args[0], args[1]
    scale = kwargs.get("scale", 1.0)
    fif = kwargs.get("fan_in_fan_out", False)
    xp = namespace_of(A, B)

    def vjp(g: Any) -> list[Any]:
        g = g.T if fif else g  # (d_out, d_in)
        return [xp.matmul(B.T, g) * scale if i == 0 else xp.matmul(g, A.T) * scale for i in argnums]

    return vjp


def _delta_jvp(argnums: tuple[int, ...], gs: list, ans: Any, args: tuple, kwargs: dict) -> Any:
    A, B = args[0], args[1]
    scale = kwargs.get("scale", 1.0)
    fif = kwargs.get("fan_in_fan_out", False)
    out = None
    for i, t in zip(argnums, gs, strict=True):
        pair = (t, B) if i == 0 else (A, t)
        term = lora_delta.fun(*pair, scale=scale, fan_in_fan_out=fif)
        out = term if out is None else out + term
    return out


defvjp_argnums(linear, _linear_vjp)
defjvp_argnums(linear, _linear_jvp)
defvjp_argnums(lora_linear, _lora_linear_vjp)
defjvp_argnums(lora_linear, _lora_linear_jvp)
defvjp_argnums(lora_linear_tree, _lora_tree_vjp)
defjvp_argnums(lora_linear_tree, _lora_tree_jvp)
defvjp_argnums(lora_delta, _delta_vjp)
defjvp_argnums(lora_delta, _delta_jvp)
defvjp(tanh, lambda ans, x: lambda g: g * (1.0 - ans * ans))
defjvp(tanh, lambda g, ans, x: g * (1.0 - ans * ans))
