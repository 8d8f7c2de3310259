"""The DoRA and LoRA-embedding primitives, with their hand-written VJPs and JVPs (as in ``minilora.ops``).

The public functions that check their arguments and call these are in ``minilora.variants.dora``
and ``minilora.variants.embedding``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from autograd.extend import defjvp_argnums, defvjp_argnums, primitive

from minilora.backend import namespace_of
from minilora.ops import flat_rows, right_factor

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
    xp = namespace_of(x, W, A, B, m, mask)
    n = dora_norm(W, A, B, scale=scale, fan_in_fan_out=fif)
    return x, W, A, B, m, mask, scale, fif, xp, n, m / n


def _dora_vjp(argnums: tuple[int, ...], ans: Any, args: tuple, kwargs: dict) -> Any:
    x, W, A, B, m, mask, scale, fif, xp, n, c = _dora_parts(args, kwargs)
    d_in = x.shape[-1]
    xm = x if mask is None else x * mask
    Wr = W.T if fif else W  # (d_out, d_in)

    def vjp(g: Any) -> list[Any]:
        d_out = g.shape[-1]
        gc = g * c
        gB = xp.matmul(gc, B) * scale  # (..., r)
        out = []
        for i in argnums:
            if i == 0:
                inner = xp.matmul(g * (c - 1), Wr) + xp.matmul(gB, A)
                out.append(xp.matmul(g, Wr) + (inner if mask is None else inner * mask))
            elif i == 1:
                G, X = flat_rows(g, d_out, xp), flat_rows(x, d_in, xp)
                Gc, Xm = flat_rows(g * (c - 1), d_out, xp), flat_rows(xm, d_in, xp)
                dW = xp.matmul(G.T, X) + xp.matmul(Gc.T, Xm)
                out.append(dW.T if fif else dW)
            elif i == 2:
                out.append(xp.sum(flat_rows(g, d_out, xp), axis=0))
            elif i == 3:
                out.append(xp.matmul(flat_rows(gB, A.shape[0], xp).T, flat_rows(xm, d_in, xp)))
            elif i == 4:
                H = xp.matmul(flat_rows(xm, d_in, xp), A.T) * scale
                out.append(xp.matmul(flat_rows(gc, d_out, xp).T, H))
            elif i == 5:
                u = xp.matmul(xm, Wr.T) + xp.matmul(xp.matmul(xm, A.T) * scale, B.T)
                out.append(xp.sum(flat_rows(g * u, d_out, xp), axis=0) / n)
            else:
                out.append((xp.matmul(g * (c - 1), Wr) + xp.matmul(gB, A)) * x)
        return out

    return vjp


def _dora_jvp(argnums: tuple[int, ...], gs: list, ans: Any, args: tuple, kwargs: dict) -> Any:
    x, W, A, B, m, mask, scale, fif, xp, n, c = _dora_parts(args, kwargs)
    xm = x if mask is None else x * mask
    Wt = right_factor(W, fif)

    def lora(z: Any, A_: Any, B_: Any) -> Any:
        return xp.matmul(xp.matmul(z, A_.T) * scale, B_.T)

    out = None
    for i, t in zip(argnums, gs, strict=True):
        if i == 0:
            tm = t if mask is None else t * mask
            term = xp.matmul(t, Wt) + (c - 1) * xp.matmul(tm, Wt) + c * lora(tm, A, B)
        elif i == 1:
            Tt = right_factor(t, fif)
            term = xp.matmul(x, Tt) + (c - 1) * xp.matmul(xm, Tt)
        elif i == 2:
            term = xp.broadcast_to(t, ans.shape)
        elif i == 3:
            term = c * lora(xm, t, B)
        elif i == 4:
            term = c * lora(xm, A, t)
        elif i == 5:
            term = (t / n) * (xp.matmul(xm, Wt) + lora(xm, A, B))
        else:
            xt = x * t
            term = (c - 1) * xp.matmul(xt, Wt) + c * lora(xt, A, B)
        out = term if out is None else out + term
    return out


def _one_hot(ids: Any, num: int, like: Any) -> Any:
    """(n_ids, num) one-hot rows of the flattened ids, in ``like``'s namespace and dtype."""
    xp = namespace_of(like)
    flat = xp.reshape(ids, (-1,))
    cols = xp.arange(num, device=like.device) if xp is not np else np.arange(num)
    return xp.astype(flat[:, None] == cols[None, :], like.dtype)


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


def _embedding_vjp(argnums: tuple[int, ...], ans: Any, args: tuple, kwargs: dict) -> Any:
    ids, W, A, B = args[:4]
    m = args[4] if len(args) > 4 else kwargs.get("m")
    scale = kwargs.get("scale", 1.0)
    xp = namespace_of(W, A, B, m)
    flat = xp.reshape(ids, (-1,))
    dim = W.shape[1]
    n = _embedding_norm(W, A, B, scale) if m is not None else None

    def vjp(g: Any) -> list[Any]:
        G = xp.reshape(g, (-1, dim))
        Gc = G if m is None else G * (m / n)
        P = _one_hot(ids, W.shape[0], W)  # (n_ids, num)
        out = []
        for i in argnums:
            if i == 1:
                out.append(xp.matmul(P.T, Gc))
            elif i == 2:
                out.append(xp.matmul(P.T, xp.matmul(Gc, B) * scale).T)
            elif i == 3:
                out.append(xp.matmul(Gc.T, xp.take(A.T, flat, axis=0)) * scale)
            elif i == 4:
                u = xp.take(W, flat, axis=0) + xp.matmul(xp.take(A.T, flat, axis=0), B.T) * scale
                out.append(xp.sum(G * u, axis=0) / n)
            else:
                raise ValueError("lora_embedding is not differentiable with respect to the integer ids")
        return out

    return vjp


def _embedding_jvp(argnums: tuple[int, ...], gs: list, ans: Any, args: tuple, kwargs: dict) -> Any:
    ids, W, A, B = args[:4]
    m = args[4] if len(args) > 4 else kwargs.get("m")
    scale = kwargs.get("scale", 1.0)
    xp = namespace_of(W, A, B, m)
    flat = xp.reshape(ids, (-1,))
    c = 1.0 if m is None else m / _embedding_norm(W, A, B, scale)
    out = None
    for i, t in zip(argnums, gs, strict=True):
        if i == 1:
            term = xp.take(t, flat, axis=0) * c
        elif i == 2:
            term = xp.matmul(xp.take(t.T, flat, axis=0), B.T) * scale * c
        elif i == 3:
            term = xp.matmul(xp.take(A.T, flat, axis=0), t.T) * scale * c
        elif i == 4:
            u = xp.take(W, flat, axis=0) + xp.matmul(xp.take(A.T, flat, axis=0), B.T) * scale
            term = u * (t / _embedding_norm(W, A, B, scale))
        else:
            raise ValueError("lora_embedding is not differentiable with respect to the integer ids")
        term = xp.reshape(term, (*ids.shape, W.shape[1]))
        out = term if out is None else out + term
    return out


defvjp_argnums(dora_linear, _dora_vjp)
defjvp_argnums(dora_linear, _dora_jvp)
defvjp_argnums(lora_embedding, _embedding_vjp)
defjvp_argnums(lora_embedding, _embedding_jvp)
