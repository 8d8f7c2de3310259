"""The closed set of differentiable LoRA primitives, each with its VJP and JVP.

Like autograd's ``numpy_vjps.py``, the derivative formulas sit in one table at the bottom of
this file, and they are written in differentiable operations (``minilora.array_ops``), so every
primitive can be differentiated to any order, in forward and reverse mode: grad of grad,
Hessian-vector products (``minilora.hvp``), JVPs of gradients. A formula whose inputs are plain
arrays (the usual first-order gradient) runs on them directly, without autograd's wrappers; when
any input is itself being traced it runs on ``array_ops``' primitives. Every primitive computes
in the array namespace of its inputs (NumPy, CuPy, array_api_strict, ...).

Nothing is kept between a forward and its derivative: a VJP needs only the primitive's inputs
(what the forward computed on the way, such as lora_linear's h = s (x * mask) A^T, it computes
again: one (n, d_in) x (d_in, r) product).

Shapes (PyTorch/PEFT layout; ``...`` is any number of batch dimensions):
    x (..., d_in)    W (d_out, d_in), or (d_in, d_out) when fan_in_fan_out
    b (d_out,)       A (r, d_in)        B (d_out, r)        mask: x's shape (or None)
"""

from __future__ import annotations

from typing import Any

import numpy as np
from autograd.extend import defjvp, defjvp_argnums, defvjp, defvjp_argnums, primitive

from minilora.array_ops import RAW, TRACED, pack_ab, traced
from minilora.backend import namespace_of

__all__ = [
    "linear", "lora_linear", "lora_linear_tree", "lora_delta", "tanh",
    "flat_rows", "right_factor", "count_elements", "add_into", "mul_into", "div_into",
]


def flat_rows(a: Any, d: int, xp: Any) -> Any:
    """(..., d) -> (n, d): batch dimensions folded into one, for the weight gradients."""
    return a if a.ndim == 2 else xp.reshape(a, (-1, d))


def add_into(y: Any, z: Any) -> Any:
    """y + z, written into y when y is a NumPy array (y must be a temporary the caller made)."""
    return np.add(y, z, out=y) if type(y) is np.ndarray else y + z


def mul_into(y: Any, z: Any) -> Any:
    """y * z, written into y when y is a NumPy array (y must be a temporary the caller made)."""
    return np.multiply(y, z, out=y) if type(y) is np.ndarray else y * z


def div_into(y: Any, z: Any) -> Any:
    """y / z, written into y when y is a NumPy array (y must be a temporary the caller made)."""
    return np.divide(y, z, out=y) if type(y) is np.ndarray else y / z


def right_factor(W: Any, fan_in_fan_out: bool) -> Any:
    """The base weight as a (d_in, d_out) right factor: ``x @ right_factor(W)``."""
    return W if fan_in_fan_out else W.T


def count_elements(a: Any) -> int:
    n = 1
    for s in a.shape:
        n *= s
    return n


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
    return y if b is None else add_into(y, b)


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


# ---------------------------------------------------------------- the derivative table
#
# Notation: g is the cotangent of the output (same shape as y), G = g folded to (n, d_out),
# X = x folded to (n, d_in), Xm = (x * mask) folded, H = s Xm A^T (n, r).
#
#   linear:       dx = g W             dW = G^T X  (fif: X^T G)     db = sum_n G
#   lora_linear:  dx = g W + s (g B A) * mask       dW, db as linear
#                 dA = s (G B)^T Xm    dB = G^T H                   dmask = s (g B A) * x
#   lora_linear_tree: as lora_linear, with (dA, dB) returned as the dict {"A": dA, "B": dB}
#   lora_delta:   dA = s B^T g         dB = s g A^T                 (fif: g transposed first)
#   tanh:         dx = g (1 - tanh(x)^2)
#
# and the tangents (JVPs) are the same products with one input replaced by its tangent. ``o`` is
# ``array_ops.RAW`` or ``array_ops.TRACED``: the one formula, run on plain arrays or traced.
# The losses' primitives and their derivatives are in ``minilora.losses``; DoRA's and the LoRA
# embedding's in ``minilora.variants.primitives``.


def _lora_args(args: tuple, kwargs: dict) -> tuple:
    x, W, b, A, B = args[:5]
    mask = args[5] if len(args) > 5 else kwargs.get("mask")
    return x, W, b, A, B, mask, kwargs.get("scale", 1.0), kwargs.get("fan_in_fan_out", False)


def _lora_cotangents(o: Any, argnums: tuple[int, ...], g: Any, x: Any, W: Any, A: Any, B: Any, mask: Any,
                     scale: float, fif: bool) -> list[Any]:
    """The VJP of lora_linear (A, B None: of linear) for the arguments ``argnums``."""
    d_in, d_out = x.shape[-1], g.shape[-1]
    need = set(argnums)
    gB = o.mul(o.matmul(g, B), scale) if A is not None and need & {0, 3, 5} else None  # (..., r): s g B
    xm = x if mask is None else o.mul(x, mask)
    out = []
    for i in argnums:
        if i == 0:
            gx = o.matmul(g, o.T(W) if fif else W)
            if A is not None:
                back = o.matmul(gB, A)  # (..., d_in)
                gx = o.add(gx, back if mask is None else o.mul(back, mask))
            out.append(gx)
        elif i == 1:
            G, X = o.rows(g, d_out), o.rows(x, d_in)
            out.append(o.matmul(o.T(X), G) if fif else o.matmul(o.T(G), X))
        elif i == 2:
            out.append(o.sum_to(o.rows(g, d_out), (d_out,)))
        elif i == 3:
            out.append(o.matmul(o.T(o.rows(gB, A.shape[0])), o.rows(xm, d_in)))
        elif i == 4:
            H = o.mul(o.matmul(o.rows(xm, d_in), o.T(A)), scale)  # (n, r), the forward's h again
            out.append(o.matmul(o.T(o.rows(g, d_out)), H))
        else:
            out.append(o.mul(o.matmul(gB, A), x))
    return out


def _lora_tangent(o: Any, argnums: tuple[int, ...], ts: list, ans: Any, x: Any, W: Any, A: Any, B: Any,
                  mask: Any, scale: float, fif: bool) -> Any:
    """The JVP of lora_linear (A, B None: of linear) along the tangents ``ts`` of ``argnums``."""
    Wt = W if fif else o.T(W)  # (d_in, d_out)
    xm = x if mask is None else o.mul(x, mask)

    def low_rank(z: Any, A_: Any, B_: Any) -> Any:
        return o.matmul(o.mul(o.matmul(z, o.T(A_)), scale), o.T(B_))

    out = None
    for i, t in zip(argnums, ts, strict=True):
        if i == 0:
            term = o.matmul(t, Wt)
            if A is not None:
                term = o.add(term, low_rank(t if mask is None else o.mul(t, mask), A, B))
        elif i == 1:
            term = o.matmul(x, t if fif else o.T(t))
        elif i == 2:
            term = o.broadcast_to(t, tuple(ans.shape))
        elif i == 3:
            term = low_rank(xm, t, B)
        elif i == 4:
            term = low_rank(xm, A, t)
        else:
            term = low_rank(o.mul(x, t), A, B)
        out = term if out is None else o.add(out, term)
    return out


def _linear_vjp(argnums: tuple[int, ...], ans: Any, args: tuple, kwargs: dict) -> Any:
    x, W = args[0], args[1]
    fif = kwargs.get("fan_in_fan_out", False)

    def vjp(g: Any) -> list[Any]:
        o = TRACED if traced(g, x, W) else RAW
        return _lora_cotangents(o, argnums, g, x, W, None, None, None, 1.0, fif)

    return vjp


def _linear_jvp(argnums: tuple[int, ...], gs: list, ans: Any, args: tuple, kwargs: dict) -> Any:
    x, W = args[0], args[1]
    o = TRACED if traced(x, W, *gs) else RAW
    return _lora_tangent(o, argnums, gs, ans, x, W, None, None, None, 1.0, kwargs.get("fan_in_fan_out", False))


def _lora_linear_vjp(argnums: tuple[int, ...], ans: Any, args: tuple, kwargs: dict) -> Any:
    x, W, _, A, B, mask, scale, fif = _lora_args(args, kwargs)

    def vjp(g: Any) -> list[Any]:
        o = TRACED if traced(g, x, W, A, B, mask) else RAW
        return _lora_cotangents(o, argnums, g, x, W, A, B, mask, scale, fif)

    return vjp


def _lora_linear_jvp(argnums: tuple[int, ...], gs: list, ans: Any, args: tuple, kwargs: dict) -> Any:
    x, W, _, A, B, mask, scale, fif = _lora_args(args, kwargs)
    o = TRACED if traced(x, W, A, B, mask, *gs) else RAW
    return _lora_tangent(o, argnums, gs, ans, x, W, A, B, mask, scale, fif)


def _to_flat(args: tuple, kwargs: dict) -> tuple:
    """``lora_linear_tree``'s arguments as ``lora_linear``'s (x, W, b, A, B, mask)."""
    lora = args[3]
    mask = args[4] if len(args) > 4 else kwargs.get("mask")
    return (args[0], args[1], args[2], lora["A"], lora["B"], mask)


def _flat_argnums(argnums: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(n for a in argnums for n in ((3, 4) if a == 3 else ((5,) if a == 4 else (a,))))


def _lora_tree_vjp(argnums: tuple[int, ...], ans: Any, args: tuple, kwargs: dict) -> Any:
    flat_args = _to_flat(args, kwargs)
    x, _, _, A, B, mask = flat_args
    scale = kwargs.get("scale", 1.0)
    # A training step's case: only the adapter differentiated, no mask, plain NumPy. The formulas
    # of _lora_cotangents for i = 3, 4, in the same order of operations (so the same bits), with
    # the scalings written in place.
    b_first = next(iter(args[3])) == "B"  # the gradient dict keeps the adapter's key order
    usual = argnums == (3,) and mask is None and type(x) is np.ndarray and type(A) is np.ndarray and \
        type(B) is np.ndarray

    def vjp(g: Any) -> list[Any]:
        if usual and type(g) is np.ndarray:
            gB = mul_into(g @ B, scale)  # (..., r)
            X = flat_rows(x, x.shape[-1], np)
            H = mul_into(X @ A.T, scale)  # (n, r): the forward's h again
            return [pack_ab.fun(flat_rows(gB, A.shape[0], np).T @ X, flat_rows(g, g.shape[-1], np).T @ H,
                                b_first=b_first)]
        grads = iter(_lora_linear_vjp(_flat_argnums(argnums), ans, flat_args, kwargs)(g))
        out = [(next(grads), next(grads)) if a == 3 else next(grads) for a in argnums]
        # a traced gradient dict must be a traced container (autograd's dict), not a dict of boxes
        pack = pack_ab if traced(*[t for o in out for t in (o if isinstance(o, tuple) else (o,))]) else pack_ab.fun
        return [pack(*o, b_first=b_first) if isinstance(o, tuple) else o for o in out]

    return vjp


def _lora_tree_jvp(argnums: tuple[int, ...], gs: list, ans: Any, args: tuple, kwargs: dict) -> Any:
    flat_gs = [t for a, g in zip(argnums, gs, strict=True) for t in ((g["A"], g["B"]) if a == 3 else (g,))]
    return _lora_linear_jvp(_flat_argnums(argnums), flat_gs, ans, _to_flat(args, kwargs), kwargs)


def _delta_vjp(argnums: tuple[int, ...], ans: Any, args: tuple, kwargs: dict) -> Any:
    A, B = args[0], args[1]
    scale = kwargs.get("scale", 1.0)
    fif = kwargs.get("fan_in_fan_out", False)

    def vjp(g: Any) -> list[Any]:
        o = TRACED if traced(g, A, B) else RAW
        g = o.T(g) if fif else g  # (d_out, d_in)
        return [o.mul(o.matmul(o.T(B), g), scale) if i == 0 else o.mul(o.matmul(g, o.T(A)), scale)
                for i in argnums]

    return vjp


def _delta_jvp(argnums: tuple[int, ...], gs: list, ans: Any, args: tuple, kwargs: dict) -> Any:
    A, B = args[0], args[1]
    scale = kwargs.get("scale", 1.0)
    fif = kwargs.get("fan_in_fan_out", False)
    delta = lora_delta if traced(A, B, *gs) else lora_delta.fun  # bilinear: its own tangent map
    out = None
    for i, t in zip(argnums, gs, strict=True):
        term = delta(*((t, B) if i == 0 else (A, t)), scale=scale, fan_in_fan_out=fif)
        out = term if out is None else (TRACED if traced(out, term) else RAW).add(out, term)
    return out


def _tanh_slope(ans: Any) -> Any:
    """1 - tanh(x)^2, from the forward's output."""
    if traced(ans):
        return TRACED.sub(1.0, TRACED.mul(ans, ans))
    return 1.0 - ans * ans


defvjp_argnums(linear, _linear_vjp)
defjvp_argnums(linear, _linear_jvp)
defvjp_argnums(lora_linear, _lora_linear_vjp)
defjvp_argnums(lora_linear, _lora_linear_jvp)
defvjp_argnums(lora_linear_tree, _lora_tree_vjp)
defjvp_argnums(lora_linear_tree, _lora_tree_jvp)
defvjp_argnums(lora_delta, _delta_vjp)
defjvp_argnums(lora_delta, _delta_jvp)
defvjp(tanh, lambda ans, x: lambda g: (TRACED if traced(g, ans) else RAW).mul(g, _tanh_slope(ans)))
defjvp(tanh, lambda g, ans, x: (TRACED if traced(g, ans) else RAW).mul(g, _tanh_slope(ans)))
