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

from .backend import namespace_of

__all__ = [
    "linear", "lora_linear", "lora_linear_tree", "lora_delta", "tanh", "l1_loss_op", "mse_loss_op",
]


def _flat(a: Any, d: int, xp: Any) -> Any:
    """(..., d) -> (n, d): batch dimensions folded into one, for the weight gradients."""
    return a if a.ndim == 2 else xp.reshape(a, (-1, d))


def _add_(y: Any, z: Any) -> Any:
    """y + z, written into y when y is a NumPy array (y must be a temporary this module made)."""
    return np.add(y, z, out=y) if type(y) is np.ndarray else y + z


def _mul_(y: Any, z: Any) -> Any:
    """y * z, written into y when y is a NumPy array (y must be a temporary this module made)."""
    return np.multiply(y, z, out=y) if type(y) is np.ndarray else y * z


def _div_(y: Any, z: Any) -> Any:
    """y / z, written into y when y is a NumPy array (y must be a temporary this module made)."""
    return np.divide(y, z, out=y) if type(y) is np.ndarray else y / z


def _weight(W: Any, fan_in_fan_out: bool) -> Any:
    """The base weight as a (d_in, d_out) right factor: ``x @ _weight(W)``."""
    return W if fan_in_fan_out else W.T


# ---------------------------------------------------------------- forward definitions


@primitive
def linear(x: Any, W: Any, b: Any = None, *, fan_in_fan_out: bool = False) -> Any:
    """y = x W^T + b (PyTorch ``F.linear``); with fan_in_fan_out, y = x W + b.

    x (..., d_in), W (d_out, d_in) [fan_in_fan_out: (d_in, d_out)], b (d_out,) or None
    -> y (..., d_out).
    """
    xp = namespace_of(x, W, b)
    y = xp.matmul(x, _weight(W, fan_in_fan_out))
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
    h = _mul_(xp.matmul(xm, A.T), scale)  # (..., r)
    y = _add_(xp.matmul(x, _weight(W, fan_in_fan_out)), xp.matmul(h, B.T))
    y = y if b is None else _add_(y, b)
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
def l1_loss_op(pred: Any, target: Any, *, mean: bool = True) -> Any:
    """sum |pred - target| (divided by its element count when ``mean``); a 0-d array."""
    xp = namespace_of(pred, target)
    if _blockable(pred, target):
        s, total = _blocked_l1(pred, target)
    else:
        d = pred - target
        s = xp.sign(d)
        # On NumPy, sum |d| = sign(d) . d: one BLAS pass over arrays the gradient needs anyway,
        # instead of an |d| temporary and a reduction (the same exact products, in BLAS's order)
        total = np.vdot(s, d) if xp is np else xp.sum(xp.abs(d))
    _remember("d", pred, s)  # the gradient is sign(d) * c
    return total / _count(s) if mean else total


@primitive
def mse_loss_op(pred: Any, target: Any, *, mean: bool = True) -> Any:
    """sum (pred - target)^2 (divided by its element count when ``mean``); a 0-d array."""
    xp = namespace_of(pred, target)
    d = pred - target
    _remember("d", pred, d)
    total = np.vdot(d, d) if xp is np else xp.sum(d * d)  # vdot: one BLAS pass, no d*d temporary
    return total / _count(d) if mean else total


# Above this size L1's forward runs in blocks of _BLOCK_BYTES: each block of d = pred - target is
# formed, signed and reduced while it is in cache, and the whole of d is never held, only sign(d):
# one (n, d_out) array fewer, which at this size the allocator fetches from the kernel page by
# page at every step (docs/performance.md). Below it, and for MSE (which keeps d itself as the
# gradient's buffer), the plain passes measured as fast.
_BLOCK_FROM = 8 << 20
_BLOCK_BYTES = 256 << 10


def _blockable(pred: Any, target: Any) -> bool:
    return (type(pred) is np.ndarray and type(target) is np.ndarray and pred.nbytes >= _BLOCK_FROM
            and pred.shape == target.shape and pred.dtype == target.dtype
            and pred.flags.c_contiguous and target.flags.c_contiguous)


def _blocked_l1(pred: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, Any]:
    """(sign(d), sum |d|) for d = pred - target, block by block: the same sign(d) as the plain
    passes; the sum adds the blocks' BLAS dot products sign(d) . d."""
    s = np.empty_like(pred)
    p, t, o = pred.reshape(-1), target.reshape(-1), s.reshape(-1)
    m = max(1, _BLOCK_BYTES // pred.itemsize)
    parts = np.empty(-(-p.size // m), dtype=pred.dtype)
    for k, i in enumerate(range(0, p.size, m)):
        db = p[i:i + m] - t[i:i + m]  # a fresh block: np.sign into another array is the fast path
        parts[k] = np.vdot(np.sign(db, out=o[i:i + m]), db)
    return s, np.add.reduce(parts)


@primitive
def tanh(x: Any) -> Any:
    """tanh(x) elementwise in x's namespace: an activation for models on any backend
    (autograd's own ``np.tanh`` would compute on host NumPy)."""
    return namespace_of(x).tanh(x)


def _count(a: Any) -> int:
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
#   l1 (d = pred - target; sign(d) from the forward): dpred = sign(d) * (g / N)  dtarget = -dpred
#   mse:                                         dpred = d * (2/N * g)          dtarget = -dpred
#
# The loss formulas keep PyTorch's order of rounding (``l1_loss`` = mean(abs(d)) backward,
# ATen ``mse_loss_backward``: d * (norm * g)), so gradients agree bit for bit where the
# forward does.


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
                G, X = _flat(g, d_out, xp), _flat(x, x.shape[-1], xp)
                out.append(xp.matmul(X.T, G) if fif else xp.matmul(G.T, X))
            else:
                out.append(xp.sum(_flat(g, d_out, xp), axis=0))
        return out

    return vjp


def _linear_jvp(argnums: tuple[int, ...], gs: list, ans: Any, args: tuple, kwargs: dict) -> Any:
    x, W = args[0], args[1]
    fif = kwargs.get("fan_in_fan_out", False)
    xp = namespace_of(x, W)
    out = None
    for i, t in zip(argnums, gs):
        if i == 0:
            term = xp.matmul(t, _weight(W, fif))
        elif i == 1:
            term = xp.matmul(x, _weight(t, fif))
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
        G = _flat(g, d_out, xp)
        need = set(argnums)
        gB = xp.matmul(g, B) * scale if need & {0, 3, 5} else None  # (..., r), s g B
        xm = x if mask is None else x * mask
        out = []
        for i in argnums:
            if i == 0:
                back = xp.matmul(gB, A)  # (..., d_in)
                out.append(xp.matmul(g, W.T if fif else W) + (back if mask is None else back * mask))
            elif i == 1:
                X = _flat(x, d_in, xp)
                out.append(xp.matmul(X.T, G) if fif else xp.matmul(G.T, X))
            elif i == 2:
                out.append(xp.sum(G, axis=0))
            elif i == 3:
                out.append(xp.matmul(_flat(gB, A.shape[0], xp).T, _flat(xm, d_in, xp)))
            elif i == 4:
                out.append(xp.matmul(G.T, _flat(h, A.shape[0], xp)))
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
    for i, t in zip(argnums, gs):
        if i == 0:
            tm = t if mask is None else t * mask
            term = xp.matmul(t, _weight(W, fif)) + xp.matmul(xp.matmul(tm, A.T) * scale, B.T)
        elif i == 1:
            term = xp.matmul(x, _weight(t, fif))
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
    flat_gs = [t for a, g in zip(argnums, gs) for t in ((g["A"], g["B"]) if a == 3 else (g,))]
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
    for i, t in zip(argnums, gs):
        pair = (t, B) if i == 0 else (A, t)
        term = lora_delta.fun(*pair, scale=scale, fan_in_fan_out=fif)
        out = term if out is None else out + term
    return out


def _loss_vjp(grad_of: Any, kept: Any = lambda d, xp: d) -> Any:
    """VJP maker of a loss of d = pred - target. The forward keeps ``kept(d, xp)`` (d for MSE,
    sign(d) for L1) in the memo; the gradient is ``grad_of(k, g, n, xp, own)`` of that array
    (``own``: it may be overwritten)."""

    def maker(argnums: tuple[int, ...], ans: Any, args: tuple, kwargs: dict) -> Any:
        pred, target = args[0], args[1]
        xp = namespace_of(pred, target)
        memo = _recall("d", pred)  # this module's own temporary: nobody else holds it
        k = kept(pred - target, xp) if memo is None else memo
        n = _count(k) if kwargs.get("mean", True) else 1
        spent = [False]

        def vjp(g: Any) -> list[Any]:
            # The first call may write the gradient over the kept array (one (n, d_out)
            # temporary fewer in the step); a second call (make_vjp allows it) recomputes it.
            own = not spent[0]
            spent[0] = True
            gd = grad_of(k if own else kept(pred - target, xp), g, n, xp, own)
            return [gd if i == 0 else -gd for i in argnums]

        return vjp

    return maker


def _loss_jvp(dot_of_d: Any) -> Any:
    def jvp(argnums: tuple[int, ...], gs: list, ans: Any, args: tuple, kwargs: dict) -> Any:
        pred, target = args[0], args[1]
        xp = namespace_of(pred, target)
        d = pred - target
        t = None
        for i, tangent in zip(argnums, gs):
            t = (tangent if i == 0 else -tangent) if t is None else (t + tangent if i == 0 else t - tangent)
        s = dot_of_d(d, t, xp)
        return s / _count(d) if kwargs.get("mean", True) else s

    return jvp


def _l1_grad(s: Any, g: Any, n: int, xp: Any, own: bool) -> Any:
    """sign(d) * (g / N), given s = sign(d) (kept by the forward; written over when ``own``)."""
    c = g / n
    return np.multiply(s, c, out=s) if own and type(s) is np.ndarray and np.ndim(c) == 0 else s * c


def _mse_grad(d: Any, g: Any, n: int, xp: Any, own: bool) -> Any:
    """d * (2/N * g), ATen's order of rounding; written over d when ``own``."""
    c = (2.0 / n) * g
    return np.multiply(d, c, out=d) if own and type(d) is np.ndarray and np.ndim(c) == 0 else d * c


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
defvjp_argnums(l1_loss_op, _loss_vjp(_l1_grad, kept=lambda d, xp: xp.sign(d)))
defjvp_argnums(l1_loss_op, _loss_jvp(lambda d, t, xp: xp.sum(xp.sign(d) * t)))
defvjp_argnums(mse_loss_op, _loss_vjp(_mse_grad))
defjvp_argnums(mse_loss_op, _loss_jvp(lambda d, t, xp: xp.sum(d * t) * 2.0))


# =====================================================================================
# PEFT variants (issue 4): DoRA and the LoRA embedding. Appended; nothing above changes.
#
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

__all__ += ["dora_linear", "dora_norm", "lora_embedding"]


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
    Wt = _weight(W, fan_in_fan_out)
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
                G, X = _flat(g, d_out, xp), _flat(x, d_in, xp)
                Gc, Xm = _flat(g * (c - 1), d_out, xp), _flat(xm, d_in, xp)
                dW = xp.matmul(G.T, X) + xp.matmul(Gc.T, Xm)
                out.append(dW.T if fif else dW)
            elif i == 2:
                out.append(xp.sum(_flat(g, d_out, xp), axis=0))
            elif i == 3:
                out.append(xp.matmul(_flat(gB, A.shape[0], xp).T, _flat(xm, d_in, xp)))
            elif i == 4:
                H = xp.matmul(_flat(xm, d_in, xp), A.T) * scale
                out.append(xp.matmul(_flat(gc, d_out, xp).T, H))
            elif i == 5:
                u = xp.matmul(xm, Wr.T) + xp.matmul(xp.matmul(xm, A.T) * scale, B.T)
                out.append(xp.sum(_flat(g * u, d_out, xp), axis=0) / n)
            else:
                out.append((xp.matmul(g * (c - 1), Wr) + xp.matmul(gB, A)) * x)
        return out

    return vjp


def _dora_jvp(argnums: tuple[int, ...], gs: list, ans: Any, args: tuple, kwargs: dict) -> Any:
    x, W, A, B, m, mask, scale, fif, xp, n, c = _dora_parts(args, kwargs)
    xm = x if mask is None else x * mask
    Wt = _weight(W, fif)

    def lora(z: Any, A_: Any, B_: Any) -> Any:
        return xp.matmul(xp.matmul(z, A_.T) * scale, B_.T)

    out = None
    for i, t in zip(argnums, gs):
        if i == 0:
            tm = t if mask is None else t * mask
            term = xp.matmul(t, Wt) + (c - 1) * xp.matmul(tm, Wt) + c * lora(tm, A, B)
        elif i == 1:
            Tt = _weight(t, fif)
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
    for i, t in zip(argnums, gs):
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
