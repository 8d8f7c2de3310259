"""The elementary differentiable array operations the derivative formulas are written in.

Like ``autograd.numpy`` for autograd's own ``numpy_vjps.py``, but computing in the array
namespace of the inputs (NumPy, CuPy, array_api_strict, ...): each is an autograd primitive whose
VJP and JVP are written with these same operations, so they can be differentiated to any order
in both modes. ``minilora.ops``, ``minilora.losses`` and ``minilora.variants.primitives`` use
them when a derivative is itself being traced (a Hessian-vector product, grad of grad, a JVP of
a gradient); an untraced derivative runs the same formula on plain arrays (``RAW``).

Shapes: ``matmul(a, b)`` takes a (..., k) and a 2-D b (k, m); ``T`` transposes a 2-D array;
``add``, ``sub`` and ``mul`` broadcast as NumPy does (a Python float is a constant); ``sum_to``
sums an array down to a shape it was broadcast from; ``dot`` is the full contraction
sum(a * b) of two arrays of one shape (a 0-d result).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from autograd.extend import Box, defjvp, defjvp_argnums, defvjp, primitive, vspace

from minilora.backend import namespace_of
from minilora.errors import MiniLoraValueError

__all__ = ["matmul", "T", "reshape", "add", "sub", "mul", "neg", "sum_to", "broadcast_to", "dot",
           "take_rows", "scatter_rows", "pack_ab", "rows", "traced", "RAW", "TRACED"]


def _shape(a: Any) -> tuple:
    return tuple(getattr(a, "shape", ()))


@primitive
def matmul(a: Any, b: Any) -> Any:
    """a (..., k) @ b (k, m) -> (..., m)."""
    if len(_shape(b)) != 2:
        raise MiniLoraValueError(f"array_ops.matmul takes a 2-D right factor; got shape {_shape(b)}")
    return a @ b


@primitive
def T(a: Any) -> Any:
    """The transpose of a 2-D array."""
    return a.T


@primitive
def reshape(a: Any, shape: tuple) -> Any:
    return namespace_of(a).reshape(a, shape)


def rows(a: Any, k: int) -> Any:
    """(..., k) -> (n, k): batch dimensions folded into one (a 2-D array is returned as is)."""
    return a if len(_shape(a)) == 2 else reshape(a, (-1, k))


@primitive
def add(a: Any, b: Any) -> Any:
    return a + b


@primitive
def sub(a: Any, b: Any) -> Any:
    return a - b


@primitive
def mul(a: Any, b: Any) -> Any:
    return a * b


@primitive
def neg(a: Any) -> Any:
    return -a


@primitive
def sum_to(a: Any, shape: tuple) -> Any:
    """Sum ``a`` down to ``shape``, a shape it was broadcast from (leading axes and size-1 axes)."""
    shape = tuple(shape)
    if _shape(a) == shape:
        return a
    xp = namespace_of(a)
    lead = len(_shape(a)) - len(shape)
    out = xp.sum(a, axis=tuple(range(lead))) if lead else a
    ones = tuple(i for i, n in enumerate(shape) if n == 1 and out.shape[i] != 1)
    if ones:
        out = xp.sum(out, axis=ones, keepdims=True)
    return out


@primitive
def broadcast_to(a: Any, shape: tuple) -> Any:
    return namespace_of(a).broadcast_to(a, tuple(shape))


@primitive
def dot(a: Any, b: Any) -> Any:
    """sum(a * b) over every element of two same-shaped arrays (a 0-d array)."""
    xp = namespace_of(a, b)
    if xp is np:
        return np.vdot(a, b)
    return xp.sum(xp.reshape(a, (-1,)) * xp.reshape(b, (-1,)))


@primitive
def take_rows(W: Any, ids: Any) -> Any:
    """W[ids] for a flat integer array ids: (len(ids), dim)."""
    return namespace_of(W).take(W, ids, axis=0)


@primitive
def scatter_rows(g: Any, ids: Any, num: int) -> Any:
    """The adjoint of ``take_rows``: a (num, dim) array whose row i is the sum of g's rows where
    ids == i (a one-hot product, so that every namespace can do it)."""
    xp = namespace_of(g)
    if xp is np:
        out = np.zeros((num, g.shape[1]), dtype=g.dtype)
        np.add.at(out, ids, g)
        return out
    cols = xp.arange(num, device=g.device)
    P = xp.astype(ids[:, None] == cols[None, :], g.dtype)  # (n_ids, num)
    return P.T @ g


@primitive
def pack_ab(A: Any, B: Any, *, b_first: bool = False) -> dict:
    """{"A": A, "B": B} ({"B": B, "A": A} with ``b_first``, so a gradient keeps its adapter's key
    order): an adapter's gradient dict as a traced container (a dict of traced arrays is not itself
    traced, and autograd's own dict has no forward-mode derivative)."""
    return {"B": B, "A": A} if b_first else {"A": A, "B": B}


# ---------------------------------------------------------------- their derivatives, in themselves


def _unbroadcast(g: Any, like: Any) -> Any:
    return sum_to(g, _shape(like)) if _shape(g) != _shape(like) else g


def _broadcast_like(t: Any, like: Any) -> Any:
    """A tangent of a broadcast operand, spread to the output's shape (the JVP of broadcasting)."""
    return broadcast_to(t, _shape(like)) if _shape(t) != _shape(like) else t


defvjp(matmul,
       lambda ans, a, b: lambda g: matmul(g, T(b)),
       lambda ans, a, b: lambda g: matmul(T(rows(a, _shape(a)[-1])), rows(g, _shape(g)[-1])))
defjvp(matmul,
       lambda t, ans, a, b: matmul(t, b),
       lambda t, ans, a, b: matmul(a, t))
defvjp(T, lambda ans, a: lambda g: T(g))
defjvp(T, lambda t, ans, a: T(t))
defvjp(reshape, lambda ans, a, shape: lambda g: reshape(g, _shape(a)))
defjvp(reshape, lambda t, ans, a, shape: reshape(t, shape))
defvjp(add,
       lambda ans, a, b: lambda g: _unbroadcast(g, a),
       lambda ans, a, b: lambda g: _unbroadcast(g, b))
defjvp(add,
       lambda t, ans, a, b: _broadcast_like(t, ans),
       lambda t, ans, a, b: _broadcast_like(t, ans))
defvjp(sub,
       lambda ans, a, b: lambda g: _unbroadcast(g, a),
       lambda ans, a, b: lambda g: neg(_unbroadcast(g, b)))
defjvp(sub,
       lambda t, ans, a, b: _broadcast_like(t, ans),
       lambda t, ans, a, b: neg(_broadcast_like(t, ans)))
defvjp(mul,
       lambda ans, a, b: lambda g: _unbroadcast(mul(g, b), a),
       lambda ans, a, b: lambda g: _unbroadcast(mul(g, a), b))
defjvp(mul,
       lambda t, ans, a, b: mul(t, b),
       lambda t, ans, a, b: mul(a, t))
defvjp(neg, lambda ans, a: lambda g: neg(g))
defjvp(neg, lambda t, ans, a: neg(t))
defvjp(sum_to, lambda ans, a, shape: lambda g: broadcast_to(g, _shape(a)))
defjvp(sum_to, lambda t, ans, a, shape: sum_to(t, shape))
defvjp(broadcast_to, lambda ans, a, shape: lambda g: sum_to(g, _shape(a)))
defjvp(broadcast_to, lambda t, ans, a, shape: broadcast_to(t, shape))
defvjp(dot,
       lambda ans, a, b: lambda g: mul(g, b),
       lambda ans, a, b: lambda g: mul(g, a))
defjvp(dot,
       lambda t, ans, a, b: dot(t, b),
       lambda t, ans, a, b: dot(a, t))
defvjp(take_rows, lambda ans, W, ids: lambda g: scatter_rows(g, ids, _shape(W)[0]))
defjvp(take_rows, lambda t, ans, W, ids: take_rows(t, ids))
defvjp(scatter_rows, lambda ans, g, ids, num: lambda c: take_rows(c, ids))
defjvp(scatter_rows, lambda t, ans, g, ids, num: scatter_rows(t, ids, num))
defvjp(pack_ab, lambda ans, A, B, **kw: lambda g: g["A"], lambda ans, A, B, **kw: lambda g: g["B"])


def _pack_jvp(argnums: tuple[int, ...], gs: list, ans: Any, args: tuple, kwargs: dict) -> Any:
    t = dict(zip(argnums, gs, strict=True))
    return pack_ab(t[0] if 0 in t else vspace(args[0]).zeros(), t[1] if 1 in t else vspace(args[1]).zeros(),
                   b_first=kwargs.get("b_first", False))


defjvp_argnums(pack_ab, _pack_jvp)


# ---------------------------------------------------------------- the two ways to run a formula


def traced(*values: Any) -> bool:
    """True when any value is an autograd box: a derivative is being differentiated again."""
    for v in values:
        if isinstance(v, Box):
            return True
    return False


class _Ops:
    """A set of the operations above: ``TRACED`` (the primitives) or ``RAW`` (plain array code,
    for derivatives nobody differentiates; the same formulas, without autograd's wrapper)."""

    def __init__(self, **ops: Any) -> None:
        self.__dict__.update(ops)

    matmul: Any
    T: Any
    reshape: Any
    rows: Any
    add: Any
    sub: Any
    mul: Any
    neg: Any
    sum_to: Any
    broadcast_to: Any
    dot: Any
    take_rows: Any
    scatter_rows: Any


def _raw_rows(a: Any, k: int) -> Any:
    return a if a.ndim == 2 else namespace_of(a).reshape(a, (-1, k))


TRACED = _Ops(matmul=matmul, T=T, reshape=reshape, rows=rows, add=add, sub=sub, mul=mul, neg=neg, sum_to=sum_to,
              broadcast_to=broadcast_to, dot=dot, take_rows=take_rows, scatter_rows=scatter_rows)
RAW = _Ops(matmul=lambda a, b: a @ b, T=lambda a: a.T, reshape=reshape.fun, rows=_raw_rows,
           add=lambda a, b: a + b, sub=lambda a, b: a - b, mul=lambda a, b: a * b, neg=lambda a: -a,
           sum_to=sum_to.fun, broadcast_to=broadcast_to.fun, dot=dot.fun, take_rows=take_rows.fun,
           scatter_rows=scatter_rows.fun)
