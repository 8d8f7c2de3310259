"""A Linear merge into a float16 or bfloat16 weight with PEFT's bits, in row blocks that stay in cache.

PEFT merges a Linear layer on CPU as ``W += transpose(B @ A, fan_in_fan_out) * s``: the product
and the sum in float32 (the adapter's dtype), then one rounding to W's dtype. The float32 product
is torch's (``minilora.peft.product``: an FMA chain over k), which NumPy's BLAS sums in another
order; the two differ in the last bit of a few percent of the entries, and that changes the
rounded weight wherever the sum lies close enough to a rounding boundary of the half-precision
type. So the merge computes every row block with NumPy's product, rounds it, and marks each element
that another evaluation could round otherwise; only those are computed again in torch's order.

Which elements (for one element, y = W + s P with P = sum_k B_ik A_kj, K terms):
any two float32 evaluations of P (any order, fused or not) lie within gamma_K S of the exact
value, S = sum_k |B_ik| |A_kj| (Higham, Accuracy and Stability, 3.1), so they differ by at most
2 gamma_K S; the product by s and the sum with W add one rounding each per evaluation, at most
u |s P| and u |y| (u = 2^-24). The bound used is

    reach = 2.1 |s| 2 gamma_K (1 + 4 gamma_K) S'  +  2^-21 |y'|      (S', y': NumPy's values)

where S' = |B| @ |A| in float32 is at least (1 - gamma_K) S, 2.1 instead of 2 covers u |s P| and
the float32 roundings of the bound itself, and 2^-21 |y'| is four times the sums' two roundings.
An element is recomputed when its distance d to the half-way point above its truncation (exact in
float32: same binade) is at most 2 reach (the nearest half-way point below is at least half as far
just above a power of two), plus 2^-140 for products in float32's subnormal range; float16: every
value below 2^-14 too (its subnormals round on another grid). At random 2048 x 2048 layers that is
about 0.25% of the elements (a bound per tensor, max |B| times the largest column sum of |A|,
took ten times more).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from minilora.formats.rounding import f32_to_bf16_bits
from minilora.peft.product import torch_order_entries

__all__ = ["rounded_linear_merge", "BLOCK_ELEMENTS"]

BLOCK_ELEMENTS = 1 << 15  # at most this many float32 elements per row block (128 KiB per buffer)
# and fewer where r is larger: OpenBLAS runs a product of m n k >= 2^18 on all its threads, which
# for a product this small costs more in hand-offs than it saves (and much more on a busy machine)
_SINGLE_THREAD_MNK = (1 << 18) - 1


def _product(L: np.ndarray, Rt: np.ndarray, out: np.ndarray) -> None:
    """The bulk product of one row block (NumPy's BLAS, in whatever order it sums); the bound
    below holds for any order, and tests replace this with another one to show it."""
    np.matmul(L, Rt, out=out)


def _round(x: np.ndarray, kind: str) -> np.ndarray:
    return f32_to_bf16_bits(x) if kind == "BF16" else x.astype(np.float16)


def rounded_linear_merge(value: np.ndarray, B: np.ndarray, A: np.ndarray, s: Any, fan_in_fan_out: bool,
                         kind: str) -> tuple[np.ndarray, np.ndarray]:
    """W' = W + (B A) s (transposed for ``fan_in_fan_out``), rounded to ``kind`` ("BF16": uint16
    bit patterns, "F16": float16) with torch's bits; also returns the float32 sums (NumPy's).

    value: W in float32, (d_out, d_in) ((d_in, d_out) for fan_in_fan_out); B (d_out, r) and
    A (r, d_in) float32; s a float32 scalar."""
    R, C = value.shape
    # the rows of W' are the rows of L @ Rt: B @ A, or (B @ A)^T = A^T @ B^T
    L, Rt = (np.ascontiguousarray(A.T), np.ascontiguousarray(B.T)) if fan_in_fan_out else (B, A)
    K = L.shape[1]
    absL, absR = np.abs(L), np.abs(Rt)
    u = 2.0 ** -24
    gamma = K * u / (1 - K * u)
    c_prod = np.float32(2.1 * abs(float(s)) * 2.0 * gamma * (1.0 + 4.0 * gamma))
    c_sum = np.float32(2.0 ** -21)
    tiny = np.float32(max(2.0 ** -140, K * 2.0 ** -146))
    low = 16 if kind == "BF16" else 13
    keep = np.uint32((0xFFFFFFFF >> low) << low)
    half = np.uint32(1 << (low - 1))
    new = np.empty((R, C), np.float32)
    out = np.empty((R, C), np.uint16 if kind == "BF16" else np.float16)
    rows = max(1, min(R, BLOCK_ELEMENTS // max(C, 1), _SINGLE_THREAD_MNK // max(C * K, 1)))
    bound = np.empty((rows, C), np.float32)
    dist = np.empty((rows, C), np.float32)
    mid = np.empty((rows, C), np.uint32)
    marked = []
    with np.errstate(over="ignore", invalid="ignore"):
        for i0 in range(0, R, rows):
            i1 = min(R, i0 + rows)
            h = i1 - i0
            y, lim, d, m = new[i0:i1], bound[:h], dist[:h], mid[:h]
            _product(L[i0:i1], Rt, y)
            np.multiply(y, s, out=y)
            np.add(y, value[i0:i1], out=y)  # (B A) s + W: PEFT's order of rounding
            out[i0:i1] = _round(y, kind)
            np.matmul(absL[i0:i1], absR, out=lim)
            np.multiply(lim, c_prod, out=lim)
            np.abs(y, out=d)
            np.multiply(d, c_sum, out=d)
            np.add(lim, d, out=lim)
            np.multiply(lim, np.float32(2.0), out=lim)
            np.add(lim, tiny, out=lim)
            np.bitwise_and(y.view(np.uint32), keep, out=m)
            np.bitwise_or(m, half, out=m)
            np.subtract(y, m.view(np.float32), out=d)
            np.abs(d, out=d)
            take = np.less_equal(d, lim)
            if kind == "F16":
                np.bitwise_and(y.view(np.uint32), np.uint32(0x7FFFFFFF), out=m)
                take |= m < np.uint32(0x38800000)  # |y| < 2**-14, float16's subnormals
            idx = np.flatnonzero(take)
            if idx.size:
                marked.append(idx + i0 * C)
    if marked:
        near = np.concatenate(marked)
        r, col = np.divmod(near, C)
        i, j = (col, r) if fan_in_fan_out else (r, col)
        exact = np.multiply(torch_order_entries(B, A, i, j), s)
        exact += value.reshape(-1)[near]
        out.reshape(-1)[near] = _round(exact, kind)
    return out, new
