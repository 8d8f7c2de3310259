"""Error bounds for DoRA and LoRA-embedding layers, built from ``tolerance``'s rules (gamma_k
chains, the float64 reference's own share, ``SAFETY``), elementwise like ``lora_bounds``.

DoRA's norm. With V = W + s B A (d_out, d_in) and Mv = |W| + |s| |B| |A|, the computed V has
|dV| <= gamma_(r+2) Mv (the merge bound). The squared row norm n^2 = sum_j V_ij^2 sums d_in
positive terms; computed from the perturbed V,

    |fl(n^2) - n^2| <= gamma_(2 d_in + 4) n^2 + 2 gamma_(r+2) sum_j |V_ij| Mv_ij + gamma_(r+2)^2 sum_j Mv_ij^2

(the length 2 d_in + 4 rather than d_in + 1 covers norms that scale each term before squaring,
as LAPACK's nrm2 and torch.linalg.norm may, each element then rounding twice; with sums carried
in a wider ``accumulate``, gamma_(r+2) is that dtype's plus gamma_4 of the storage dtype (B A, the
scale, the sum with W, one spare) and gamma_(2 d_in + 4) plus gamma_2 of it (a stored square,
the stored sum)). So with the row's
condition number kappa_i = sum_j |V_ij| Mv_ij / n_i^2 (>= 1; large when W and s B A cancel), the
relative error of n^2 is d2 = gamma_(2 d_in + 4) + 2 kappa gamma_(r+2) + gamma_(r+2)^2 sum Mv^2 / n^2,
the square root gives dn = 1 - sqrt(1 - d2) (exact, not a first-order guess) plus one rounding,
and c = m / n errs by dc = (1 + u)(1 + dn / (1 - dn)) - 1 relative. No bound exists when d2 >= 1
(refused, as ``gamma`` refuses k u >= 1).

Every DoRA output is then a LoRA-like computation in which some terms carry a factor c known to
dc relative. With M the magnitude of the terms free of c, T that of the terms carrying c, and
T_dc the same as T with each row's c weighted by its own dc (a sum over output rows, as in dx and
dA, mixes the rows' c's):

    bound = SAFETY (gamma_K(accumulate) (M + T) + T_dc  [+ gamma_stores(dtype) (M + T) when sums are wider])

    ======== ============================================================== ===============
    key      M, and T (the terms with c)                                    K
    ======== ============================================================== ===============
    y        M = |x||W|^T + |b| + |c - 1| (|xm||W|^T),                      d_in + r + 6
             T = |c| (|xm||W|^T + |s| (|xm||A|^T)|B|^T)
    x        M = |g||W| + ((|g||c - 1|)|W|) |m|,                            d_out + r + 6
             T = (|s| ((|g||c|)|B|)|A| + (|g||c|)|W|) |m|
    A        T = |s| ((|G||c|) |B|)^T |Xm|                                  d_out + n + 4
    B        T = |s| (|G||c|)^T (|Xm||A|^T)                                 d_in + n + 4
    m        T = sum_n |g| (|xm||W|^T + |s| (|xm||A|^T)|B|^T) / n (1/n errs   d_in + r + n + 6
             by at most dc)
    W        T = |c| Mv row by row                (merge)                   r + 3
    y_merged M = |b|, T = |x| (|c| Mv)^T          (the merged layer)        d_in + r + 6
    W_back   T = Mv, charged 2 dc (the merge's c and the unmerge's)         2 r + 8
    ======== ============================================================== ===============

(m the dropout mask, xm = x * m, g the cotangent, G and Xm the batch folded into n rows; fan_in_fan_out
transposes W's bounds. A form that computes c (x W^T + s (x A^T) B^T) + b without dropout, or the
forward pass through the merged weight, stays within M + T since |c| <= 1 + |c - 1|.) The
reference's own float64 error is added as in ``lora_bounds``.

Embedding (y = W[ids] + s A^T[ids] B^T, gathers exact): y: M = |W[ids]| + |s| |A^T[ids]||B|^T,
K = r + 3; dA: M = |s| (P^T (|G||B|))^T, K = dim + n + 3 (P the one-hot of ids: a row of A^T
sums its occurrences); dB: M = |s| |G|^T |A^T[ids]|, K = n + 3; merge: M = |W| + |s| (|B||A|)^T,
K = r + 2; the merged table at ids: that bound gathered.

Underflow is not charged (unlike ``dot_bound``'s k eta): the problems' inputs are 0 or at least
2^-8 in magnitude and below 8, so no product of the four factors in a chain comes near float32's
smallest normal number (float16's smallest normal 2^-14 included: a product of two inputs is at
least 2^-16, but every chain here sums in the declared ``accumulate`` dtype, float32 for the
built-in adapters, and stores only sums of such products).

Mixed precision (``adapter`` wider than ``dtype``: PEFT keeps lora_A/B and DoRA's magnitude in
float32 under a float16/bfloat16 base, casts x to float32, and computes W + s B A and its row norm
in float32 from the base weight, which widens exactly). Then:

* dc is ``dora_factor_error`` in the adapter dtype (the norm and m / n never touch the base dtype);
* A, B and m (stored and computed in the adapter dtype) are bounded in it, gamma_K(adapter) with
  no base-dtype stores, except m's one term that reads a base-dtype value: PEFT's base output
  x W^T + b is computed and stored in ``dtype``, then its bias subtracted in ``dtype``, so m's
  bound adds SAFETY (gamma_3(dtype) + gamma_(d_in+3)(accumulate)) sum_n |g| (|xm||W|^T + |b|) / n;
* the outputs stored in the base dtype (y, x, W, y_merged, W_back) keep the base model above: the
  adapter's own float32 roundings are each smaller than the base dtype's, so charging every
  stored intermediate as a base-dtype rounding (``_gamma_chain``) bounds them too; only their dc
  is the adapter dtype's.

y's M includes |c - 1| |b| (PEFT forms (c - 1)(y0 - b) from the stored y0 = x W^T + b, whose
rounding is relative to |x W^T + b|). The embedding under a wider adapter dtype: dA and dB are
bounded in the adapter dtype (the cotangent widens exactly, the gathers are exact), y, W and the
merged table in the base dtype as above.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from minilora.errors import MiniLoraValueError
from minilora.testing.tolerance import SAFETY, STORED, dtype_name, gamma, unit_roundoff, wider

__all__ = ["dora_factor_error", "dora_bounds", "embedding_bounds"]


def _gamma_chain(k: int, dtype: str, accumulate: str, stores: int = max(STORED.values()) + 2) -> float:
    """gamma_k in the accumulation dtype, plus the roundings of ``stores`` intermediates stored
    in ``dtype`` when sums are carried wider (as ``dot_bound``; default 8, the most of any
    output: ``STORED``'s 6, c and the final cast)."""
    out = gamma(k, accumulate)
    if accumulate != dtype:
        out += gamma(stores, dtype)
    return out


def dora_factor_error(W: Any, A: Any, B: Any, *, scale: float, dtype: Any, accumulate: Any = None,
                      fan_in_fan_out: bool = False) -> np.ndarray:
    """dc (d_out,): the relative error an honest implementation in ``dtype`` may make in DoRA's
    c = m / ||W + s B A||_row (the module docstring has the derivation). Raises
    ``MiniLoraValueError`` where no bound exists (the computed norm may be off by 100%)."""
    dt = dtype_name(dtype)
    acc = dtype_name(accumulate) if accumulate is not None else dt
    u = unit_roundoff(dt)
    W = np.asarray(W, dtype=np.float64)
    W = W.T if fan_in_fan_out else W
    A, B = np.asarray(A, dtype=np.float64), np.asarray(B, dtype=np.float64)
    r, d_in = A.shape
    V = W + scale * (B @ A)
    Mv = np.abs(W) + abs(scale) * (np.abs(B) @ np.abs(A))
    n2 = np.sum(V * V, axis=1)
    # with sums carried wider, V stores B A, its scaling and the sum with W (one spare), the norm
    # V * V (an elementwise square) and its sum; the square root's rounding is the (1 + u) below
    gv = _gamma_chain(r + 2, dt, acc, stores=STORED["W"] + 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        d2 = (_gamma_chain(2 * d_in + 4, dt, acc, stores=2) + 2 * gv * np.sum(np.abs(V) * Mv, axis=1) / n2
              + gv * gv * np.sum(Mv * Mv, axis=1) / n2)
    d2 = np.where(n2 > 0, d2, np.inf)
    if not np.all(d2 < 1.0):
        raise MiniLoraValueError(
            f"no error bound for DoRA's row norm in {dt}: a row of W + s B A (d_in {d_in}) is zero or cancels "
            f"so far that its computed norm may be off by 100% (relative error bound {float(np.max(d2)):.3g})")
    dn = 1.0 - np.sqrt(1.0 - d2)
    dn = (1.0 + dn) * (1.0 + u) - 1.0
    return (1.0 + u) * (1.0 + dn / (1.0 - dn)) - 1.0


def _dora_one(p: Any, dt: str, acc: str, ad: str, bias: str = "peft") -> dict[str, np.ndarray]:
    s = abs(float(p.scale))
    x = np.asarray(p.x, dtype=np.float64)
    W = np.asarray(p.W, dtype=np.float64)
    W_oi = W.T if p.fan_in_fan_out else W
    A, B = np.asarray(p.A, dtype=np.float64), np.asarray(p.B, dtype=np.float64)
    r, d_in = A.shape
    d_out = B.shape[0]
    V = W_oi + p.scale * (B @ A)
    n = np.sqrt(np.sum(V * V, axis=1))  # (d_out,)
    c = np.asarray(p.magnitude, dtype=np.float64) / n
    mixed = ad != dt  # factors, m and the norm in the adapter dtype (module docstring)
    ad_acc = wider(acc, ad)
    dc = dora_factor_error(p.W, p.A, p.B, scale=p.scale, dtype=ad if mixed else dt,
                           accumulate=ad_acc if mixed else acc, fan_in_fan_out=p.fan_in_fan_out)
    ac, ac1 = np.abs(c), np.abs(c - 1.0)
    aW, aA, aB = np.abs(W_oi), np.abs(A), np.abs(B)
    mask = None if p.mask is None else np.abs(np.asarray(p.mask, dtype=np.float64))
    ax = np.abs(x)
    axm = ax if mask is None else ax * mask
    ab = 0.0 if p.b is None else np.abs(np.asarray(p.b, dtype=np.float64))
    g = np.abs(np.asarray(p.cotangent, dtype=np.float64))
    n_rows = int(np.prod(g.shape[:-1], dtype=np.int64))
    G, Xm = g.reshape(-1, d_out), axm.reshape(-1, d_in)
    Mv = aW + s * (aB @ aA)

    def bound(k: int, M: Any, T: Any, T_dc: Any, own: bool = False) -> np.ndarray:
        # T the part that carries a factor c, T_dc the same with each c weighted by its dc; own:
        # an output stored and computed in the adapter dtype
        chain = _gamma_chain(k, ad, ad_acc) if own and mixed else _gamma_chain(k, dt, acc)
        return SAFETY * (chain * (M + T) + T_dc)

    def masked(a: np.ndarray) -> np.ndarray:
        return a if mask is None else a * mask

    base_m = axm @ aW.T  # |xm||W|^T
    lora_m = s * (axm @ aA.T) @ aB.T
    out = {}
    scaled_b = ac * ab if bias == "scaled" else 0.0  # torchtune's c b
    t_y = ac * (base_m + lora_m) + scaled_b
    out["y"] = bound(d_in + r + 6, ax @ aW.T + ab + ac1 * (base_m + ab), t_y, dc * t_y)
    gc, gcd = g * ac, g * ac * dc  # dx, dA sum over the output rows: each row's c with its own dc
    out["x"] = bound(d_out + r + 6, g @ aW + masked((g * ac1) @ aW), masked(s * (gc @ aB) @ aA + gc @ aW),
                     masked(s * (gcd @ aB) @ aA + gcd @ aW))
    Gc, Gcd = G * ac, G * ac * dc
    out["A"] = bound(d_out + n_rows + 4, 0.0, s * (Gc @ aB).T @ Xm, s * (Gcd @ aB).T @ Xm, own=True)
    t_B = s * Gc.T @ (Xm @ aA.T)
    out["B"] = bound(d_in + n_rows + 4, 0.0, t_B, dc[:, None] * t_B, own=True)
    t_m = np.sum(G * (Xm @ aW.T + s * (Xm @ aA.T) @ aB.T + (ab if bias == "scaled" else 0.0)), axis=0) / n
    out["m"] = bound(d_in + r + n_rows + 6, 0.0, t_m, dc * t_m, own=True)  # 1/n errs by at most dc
    if mixed:  # the base output x W^T + b stored in dtype, its bias subtracted in dtype (PEFT)
        base_read = np.sum(G * (Xm @ aW.T + ab), axis=0) / n
        out["m"] = out["m"] + SAFETY * (gamma(3, dt) + gamma(d_in + 3, acc)) * base_read
    Wm = ac[:, None] * Mv  # (d_out, d_in)
    Wmd = dc[:, None] * Wm
    out["W"] = bound(r + 3, 0.0, Wm.T if p.fan_in_fan_out else Wm, Wmd.T if p.fan_in_fan_out else Wmd)
    out["y_merged"] = bound(d_in + r + 6, ab, ax @ Wm.T, ax @ Wmd.T)
    Mvd = 2.0 * dc[:, None] * Mv  # the merge's c and the unmerge's
    out["W_back"] = bound(2 * r + 8, 0.0, Mv.T if p.fan_in_fan_out else Mv, Mvd.T if p.fan_in_fan_out else Mvd)
    return out


def _adapter_dtype(dt: str, adapter: Any) -> str:
    """The dtype the factors are kept in: ``adapter`` when it is wider than the base ``dt``."""
    return dt if adapter is None else wider(dt, dtype_name(adapter))


def dora_bounds(p: Any, *, dtype: Any = None, accumulate: Any = None, adapter: Any = None,
                reference: Any = "float64", bias: str = "peft") -> dict:
    """Elementwise tolerances for a ``DoraProblem``'s outputs: {"y", "x", "A", "B", "m", "W",
    "y_merged", "W_back"} (the module docstring's table), in ``dtype`` (default p.dtype) with
    sums in ``accumulate`` and the factors, m and the row norm in ``adapter`` (default: ``dtype``;
    a wider one is PEFT's mixed precision, see the module docstring), plus the float64
    reference's own bound. ``bias="scaled"`` (the forward c (x W^T + b + ...)): y's T gains
    |c| |b|, m's gains sum_n |g| |b| / n."""
    dt = dtype_name(dtype if dtype is not None else p.dtype)
    acc = dtype_name(accumulate) if accumulate is not None else dt
    out = _dora_one(p, dt, acc, _adapter_dtype(dt, adapter), bias)
    if reference is not None:
        ref_dt = dtype_name(reference)
        ref = _dora_one(p, ref_dt, ref_dt, ref_dt, bias)
        out = {k: out[k] + ref[k] for k in out}
    return out


def _embedding_one(p: Any, dt: str, acc: str, ad: str) -> dict[str, np.ndarray]:
    s = abs(float(p.scale))
    ids = np.asarray(p.ids)
    aW, aA, aB = (np.abs(np.asarray(a, dtype=np.float64)) for a in (p.W, p.A, p.B))
    r, num = aA.shape
    dim = aB.shape[0]
    g = np.abs(np.asarray(p.cotangent, dtype=np.float64))
    H = aA.T[ids]  # (..., r)
    flat_ids, G = ids.reshape(-1), g.reshape(-1, dim)
    n = flat_ids.size
    P = np.zeros((n, num))
    P[np.arange(n), flat_ids] = 1.0
    Mw = aW + s * (aB @ aA).T

    def bound(k: int, M: Any, own: bool = False) -> np.ndarray:
        # own: a gradient of a factor kept in the adapter dtype
        chain = _gamma_chain(k, ad, wider(acc, ad)) if own and ad != dt else _gamma_chain(k, dt, acc)
        return SAFETY * chain * M

    return {
        "y": bound(r + 3, aW[ids] + s * H @ aB.T),
        "A": bound(dim + n + 3, s * (P.T @ (G @ aB)).T, own=True),
        "B": bound(n + 3, s * G.T @ H.reshape(-1, r), own=True),
        "W": bound(r + 2, Mw),
        "y_merged": bound(r + 2, Mw[ids]),
    }


def embedding_bounds(p: Any, *, dtype: Any = None, accumulate: Any = None, adapter: Any = None,
                     reference: Any = "float64") -> dict:
    """Elementwise tolerances for an ``EmbeddingProblem``'s outputs: {"y", "A", "B", "W",
    "y_merged"} (the module docstring), in ``dtype`` (default p.dtype) with sums in
    ``accumulate`` and the factors in ``adapter`` (default ``dtype``), plus the reference's."""
    dt = dtype_name(dtype if dtype is not None else p.dtype)
    acc = dtype_name(accumulate) if accumulate is not None else dt
    out = _embedding_one(p, dt, acc, _adapter_dtype(dt, adapter))
    if reference is not None:
        ref_dt = dtype_name(reference)
        ref = _embedding_one(p, ref_dt, ref_dt, ref_dt)
        out = {k: out[k] + ref[k] for k in out}
    return out
