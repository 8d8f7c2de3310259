"""The DoRA and LoRA-embedding primitives, with their hand-written VJPs and JVPs (as in ``minilora.ops``).

The public functions that check their arguments and call these are in ``minilora.variants.dora``
and ``minilora.variants.embedding``.
"""

from __future__ import annotations

from typing import Any

from autograd.extend import defjvp_argnums, defvjp_argnums, primitive
from autograd.tracer import getval

from minilora.array_ops import RAW, TRACED, traced
from minilora.backend import namespace_of
from minilora.errors import MiniLoraValueError
from minilora.ops import right_factor

# =====================================================================================
#   dora_linear (Liu et al. 2024, arXiv 2402.09353 eq. 5 and section 4.3; PEFT
#   tuners/lora/dora.py DoraLinearLayer.forward + variants.py DoraLinearVariant.forward):
#       n = ||W + s B A||_row   (d_out,), computed from the values: no gradient flows through it
#       c = m / n               xm = x * mask (x when mask is None)
#       y = x W^T + b + (c - 1) * (xm W^T) + c * s (xm A^T) B^T
#   Without dropout xm = x and y = c (x W^T + s (x A^T) B^T) + b; with dropout PEFT recomputes
#   the base term on the dropped input, which is what the (c - 1) (xm W^T) term is.
#   Derivatives (g (..., d_out); u = xm W^T; l = s (xm A^T) B^T; gc = g * c):
#       dx = g W + ((g (c - 1)) W + s (gc B) A) * mask        dW = G^T X + (G (c-1))^T Xm
#       db = sum g      dm = sum_batch(g * (u + l)) / n      dA = s (gc B)^T Xm
#       dB = s gc^T (Xm A^T)                                 dmask = ((g (c-1)) W + s (gc B) A) * x
#   (fan_in_fan_out: W stored (d_in, d_out); products with W transposed accordingly.)
#
#   lora_embedding (PEFT tuners/lora/layer.py Embedding.forward, loralib Embedding):
#       E = W[ids] (..., dim),  H = A^T[ids] (..., r),  y = E + s H B^T
#   with DoRA (PEFT DoraEmbeddingLayer: the norm is per embedding dimension, over the vocabulary):
#       n = ||W + s (B A)^T||_col (dim,), c = m / n,  y = c * (E + s H B^T)
#   Derivatives use the one-hot matrix P (n_ids, num): dW = P^T (g c), dA = (P^T (s (g c) B))^T,
#   dB = s (g c)^T H, dm = sum_batch(g * (E + s H B^T)) / n.
# =====================================================================================

__all__ = ["dora_linear", "dora_norm", "lora_embedding"]


def dora_norm(W: Any, A: Any, B: Any, *, scale: float, fan_in_fan_out: bool = False) -> Any:
    """||W + scale B A|| per output row (d_out,), on plain values (PEFT ``get_weight_norm``)."""
    xp = namespace_of(W, A, B)
    V = (W.T if fan_in_fan_out else W) + xp.matmul(B, A) * scale  # (d_out, d_in)
    return xp.sqrt(xp.sum(V * V, axis=1))


@primitive
def dora_linear(x: Any, W: Any, b: Any, A: Any, B: Any, m: Any, mask: Any = None, *, scale: float = 1.0,
                fan_in_fan_out: bool = False) -> Any:
    """DoRA: y = x W^T + b + (c - 1)(xm W^T) + c s (xm A^T) B^T with c = m / ||W + s B A||_row
    (detached). x (..., d_in), W (d_out, d_in) [fif: (d_in, d_out)], b (d_out,) or None,
    A (r, d_in), B (d_out, r), m (d_out,), mask x-shaped or None -> (..., d_out)."""
    xp = namespace_of(x, W, b, A, B, m, mask)
    c = m / dora_norm(W, A, B, scale=scale, fan_in_fan_out=fan_in_fan_out)
    Wt = right_factor(W, fan_in_fan_out)
    xm = x if mask is None else x * mask
    lora = xp.matmul(xp.matmul(xm, A.T) * scale, B.T)
    if mask is None:
        y = (xp.matmul(x, Wt) + lora) * c
    else:
        y = xp.matmul(x, Wt) + (c - 1) * xp.matmul(xm, Wt) + c * lora
    return y if b is None else y + b


def _dora_parts(args: tuple, kwargs: dict) -> tuple:
    x, W, b, A, B, m = args[:6]
    mask = args[6] if len(args) > 6 else kwargs.get("mask")
    scale = kwargs.get("scale", 1.0)
    fif = kwargs.get("fan_in_fan_out", False)
    # the norm is detached (PEFT): computed from the values, a constant for every derivative
    n = dora_norm(getval(W), getval(A), getval(B), scale=scale, fan_in_fan_out=fif)
    return x, W, A, B, m, mask, scale, fif, n


def _dora_vjp(argnums: tuple[int, ...], ans: Any, args: tuple, kwargs: dict) -> Any:
    x, W, A, B, m, mask, scale, fif, n = _dora_parts(args, kwargs)
    d_in = x.shape[-1]

    def vjp(g: Any) -> list[Any]:
        o = TRACED if traced(g, x, W, A, B, m, mask) else RAW
        d_out = g.shape[-1]
        c = o.mul(m, 1.0 / n) if o is TRACED else m / n
        xm = x if mask is None else o.mul(x, mask)
        Wr = o.T(W) if fif else W  # (d_out, d_in)
        gc = o.mul(g, c)
        gc1 = o.mul(g, o.sub(c, 1.0))  # g (c - 1)
        gB = o.mul(o.matmul(gc, B), scale)  # (..., r)
        out = []
        for i in argnums:
            if i == 0:
                inner = o.add(o.matmul(gc1, Wr), o.matmul(gB, A))
                out.append(o.add(o.matmul(g, Wr), inner if mask is None else o.mul(inner, mask)))
            elif i == 1:
                G, X = o.rows(g, d_out), o.rows(x, d_in)
                dW = o.add(o.matmul(o.T(G), X), o.matmul(o.T(o.rows(gc1, d_out)), o.rows(xm, d_in)))
                out.append(o.T(dW) if fif else dW)
            elif i == 2:
                out.append(o.sum_to(o.rows(g, d_out), (d_out,)))
            elif i == 3:
                out.append(o.matmul(o.T(o.rows(gB, A.shape[0])), o.rows(xm, d_in)))
            elif i == 4:
                H = o.mul(o.matmul(o.rows(xm, d_in), o.T(A)), scale)
                out.append(o.matmul(o.T(o.rows(gc, d_out)), H))
            elif i == 5:
                u = o.add(o.matmul(xm, o.T(Wr)), o.matmul(o.mul(o.matmul(xm, o.T(A)), scale), o.T(B)))
                gu = o.sum_to(o.rows(o.mul(g, u), d_out), (d_out,))
                out.append(o.mul(gu, 1.0 / n) if o is TRACED else gu / n)
            else:
                out.append(o.mul(o.add(o.matmul(gc1, Wr), o.matmul(gB, A)), x))
        return out

    return vjp


def _dora_jvp(argnums: tuple[int, ...], gs: list, ans: Any, args: tuple, kwargs: dict) -> Any:
    x, W, A, B, m, mask, scale, fif, n = _dora_parts(args, kwargs)
    o = TRACED if traced(x, W, A, B, m, mask, *gs) else RAW
    c = o.mul(m, 1.0 / n) if o is TRACED else m / n
    c1 = o.sub(c, 1.0)
    xm = x if mask is None else o.mul(x, mask)
    Wt = W if fif else o.T(W)

    def lora(z: Any, A_: Any, B_: Any) -> Any:
        return o.matmul(o.mul(o.matmul(z, o.T(A_)), scale), o.T(B_))

    out = None
    for i, t in zip(argnums, gs, strict=True):
        if i == 0:
            tm = t if mask is None else o.mul(t, mask)
            term = o.add(o.add(o.matmul(t, Wt), o.mul(c1, o.matmul(tm, Wt))), o.mul(c, lora(tm, A, B)))
        elif i == 1:
            Tt = t if fif else o.T(t)
            term = o.add(o.matmul(x, Tt), o.mul(c1, o.matmul(xm, Tt)))
        elif i == 2:
            term = o.broadcast_to(t, tuple(ans.shape))
        elif i == 3:
            term = o.mul(c, lora(xm, t, B))
        elif i == 4:
            term = o.mul(c, lora(xm, A, t))
        elif i == 5:
            tn = o.mul(t, 1.0 / n) if o is TRACED else t / n
            term = o.mul(tn, o.add(o.matmul(xm, Wt), lora(xm, A, B)))
        else:
            xt = o.mul(x, t)
            term = o.add(o.mul(c1, o.matmul(xt, Wt)), o.mul(c, lora(xt, A, B)))
        out = term if out is None else o.add(out, term)
    return out


def _embedding_norm(W: Any, A: Any, B: Any, scale: float) -> Any:
    xp = namespace_of(W, A, B)
    V = W + xp.matmul(B, A).T * scale  # (num, dim)
    return xp.sqrt(xp.sum(V * V, axis=0))


@primitive
def lora_embedding(ids: Any, W: Any, A: Any, B: Any, m: Any = None, *, scale: float = 1.0) -> Any:
    """y = W[ids] + s A^T[ids] B^T; with a DoRA magnitude m (dim,), y = c (W[ids] + s A^T[ids] B^T),
    c = m / ||W + s (B A)^T||_col. ids integer (...), W (num, dim), A (r, num), B (dim, r)."""
    xp = namespace_of(W, A, B, m)
    flat = xp.reshape(ids, (-1,))
    E = xp.take(W, flat, axis=0)
    H = xp.take(A.T, flat, axis=0)
    y = E + xp.matmul(H, B.T) * scale
    if m is not None:
        y = y * (m / _embedding_norm(W, A, B, scale))
    return xp.reshape(y, (*ids.shape, W.shape[1]))


def _embedding_parts(args: tuple, kwargs: dict) -> tuple:
    ids, W, A, B = args[:4]
    m = args[4] if len(args) > 4 else kwargs.get("m")
    scale = kwargs.get("scale", 1.0)
    flat = namespace_of(W, A, B, m).reshape(ids, (-1,))
    # the norm is detached (PEFT): computed from the values, a constant for every derivative
    n = None if m is None else _embedding_norm(getval(W), getval(A), getval(B), scale)
    return ids, W, A, B, m, scale, flat, n


def _no_ids(i: int) -> None:
    if i == 0:
        raise MiniLoraValueError("lora_embedding is not differentiable with respect to the integer ids")


def _embedding_vjp(argnums: tuple[int, ...], ans: Any, args: tuple, kwargs: dict) -> Any:
    ids, W, A, B, m, scale, flat, n = _embedding_parts(args, kwargs)
    num, dim = W.shape

    def vjp(g: Any) -> list[Any]:
        o = TRACED if traced(g, W, A, B, m) else RAW
        G = o.reshape(g, (-1, dim))
        Gc = G if m is None else o.mul(G, o.mul(m, 1.0 / n) if o is TRACED else m / n)
        out = []
        for i in argnums:
            _no_ids(i)
            if i == 1:
                out.append(o.scatter_rows(Gc, flat, num))
            elif i == 2:
                out.append(o.T(o.scatter_rows(o.mul(o.matmul(Gc, B), scale), flat, num)))
            elif i == 3:
                out.append(o.mul(o.matmul(o.T(Gc), o.take_rows(o.T(A), flat)), scale))
            else:
                u = o.add(o.take_rows(W, flat), o.mul(o.matmul(o.take_rows(o.T(A), flat), o.T(B)), scale))
                gu = o.sum_to(o.mul(G, u), (dim,))
                out.append(o.mul(gu, 1.0 / n) if o is TRACED else gu / n)
        return out

    return vjp


def _embedding_jvp(argnums: tuple[int, ...], gs: list, ans: Any, args: tuple, kwargs: dict) -> Any:
    ids, W, A, B, m, scale, flat, n = _embedding_parts(args, kwargs)
    o = TRACED if traced(W, A, B, m, *gs) else RAW
    c = None if m is None else (o.mul(m, 1.0 / n) if o is TRACED else m / n)
    out = None
    for i, t in zip(argnums, gs, strict=True):
        _no_ids(i)
        if i == 1:
            term = o.take_rows(t, flat)
        elif i == 2:
            term = o.mul(o.matmul(o.take_rows(o.T(t), flat), o.T(B)), scale)
        elif i == 3:
            term = o.mul(o.matmul(o.take_rows(o.T(A), flat), o.T(t)), scale)
        if i == 4:
            u = o.add(o.take_rows(W, flat), o.mul(o.matmul(o.take_rows(o.T(A), flat), o.T(B)), scale))
            term = o.mul(u, o.mul(t, 1.0 / n) if o is TRACED else t / n)
        elif c is not None:
            term = o.mul(term, c)
        term = o.reshape(term, (*ids.shape, W.shape[1]))
        out = term if out is None else o.add(out, term)
    return out


defvjp_argnums(dora_linear, _dora_vjp)
defjvp_argnums(dora_linear, _dora_jvp)
defvjp_argnums(lora_embedding, _embedding_vjp)
defjvp_argnums(lora_embedding, _embedding_jvp)
