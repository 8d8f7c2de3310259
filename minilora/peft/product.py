"""The float32 product ``B @ A`` of a LoRA merge, summed in the order PyTorch 2.13's CPU matmul
(MKL 2024.2) sums it, so that a merge can reproduce PEFT's bits; and which shapes that holds for.

What torch computes for ``C = B @ A`` (B (m, K), A (K, n), float32, row-major), measured on this
project's machine by comparing its bits with NumPy emulations: at every K from 1 to 512 (and
576-1024 in steps), m and n from 1 to 40 and at model sizes (768 to 14336), with 2 torch threads,
and again at 1, 4, 8, 16, 32 and 64 threads; ``tests/peft/test_product.py`` (``compare`` marker)
checks the regime boundaries against torch again, at one thread and at torch's default:

    K == 1                  the plain product B[i, 0] * A[0, j] (the sign of a zero product kept)
    "fma": m in (4, 8) or   fused multiply-add chains over k in order, each from +0:
    m >= 12, and n in       c = fma(B[i, k], A[k, j], c) (one rounding per step), one chain per
    12-16 or a multiple     block of ``k_blocks(K)``, the chains' sums added left to right in float32:
    of 16                     K <= 192            one chain of K
                              192 < K <= 384      two chains of K // 2 (and, for odd K, a last
                                                  chain of the single last term)
                              384 < K <= 1024     chains of 192 and one of the rest
                            (K > 1024 was not measured: not reproduced)
    "plain": m == 1, or     a chain of separately rounded products and sums over k in order, from
    m in (2, 3) with n in   +0: c = c + B[i, k] * A[k, j], at every K
    (2, 3, 5) or n % 4
    == 0, or m >= 4 with
    n in (2, 3, 4, 8)
    otherwise               not reproduced (``order_problem`` says so): m in 5-7 and 9-11 (MKL's
                            small-m kernels: the order changes from K = 5, and with the thread
                            count), n in 1, 5-7, 9-11 (from K = 5 to 8), m in 2, 3 with another n
                            (from K = 8 to 16; e.g. a 2-label head over an odd hidden size), and
                            n > 16 not a multiple of 16 (with 4 or more threads MKL splits the
                            columns into blocks of 16 and sums a narrow last block otherwise: at
                            n = 17, 20, 24, 40; n = 1002 matched up to 16 threads, but an odd
                            vocabulary such as GPT-2's 50257 under an embedding adapter is refused)

Model layers (sides that are multiples of 16, or a classifier head of 1-4 or 8 outputs over a
hidden size that is a multiple of 4) are inside these, at every thread count measured. Before this
was measured the module assumed chains of 128 for every K > 128, which gives other bits for every
rank from 129 to 192 and for odd ranks (and most even ones) from 193 to 383.

NumPy's BLAS (OpenBLAS) sums in a different order, so ``B @ A`` in NumPy differs from torch's in
the last bit of about 0.1 to 3% of the entries (more with larger K); after the float32 -> bfloat16
rounding of a merge a few elements per large tensor come out one bfloat16 step apart.

``torch_order_matmul`` computes the chain exactly: the product of two float32 numbers is exact in
float64, the float64 sum ``p + c`` is rounded once more, and converting that to float32 is the
correct fma result except where the float64 sum lies exactly half-way between two float32 numbers
(or in float32's subnormal range); there the exact error of the sum (two-sum) decides. It works in
row blocks that stay in cache. Where ``order_problem`` names a problem it still computes the fma
(or plain) order, which then is only one correct rounding of the product among others. Another CPU
(other MKL kernels, another MKL version) may sum in yet another order: bit-equality with PEFT
holds where torch sums as described above.
"""

from __future__ import annotations

import numpy as np

__all__ = ["torch_order_matmul", "torch_order_entries", "fma_chain", "sum_error_bound", "k_blocks", "regime",
           "order_problem", "K_CHAIN", "K_MEASURED"]

K_CHAIN = 192  # the longest single fma chain torch's kernels sum (see the module doc)
K_MEASURED = 1024  # the largest inner dimension measured
_BLOCK_ELEMENTS = 1 << 15  # float64 elements per row block (256 KiB per buffer)
_F32_TINY = float(np.finfo(np.float32).tiny)


def k_blocks(K: int) -> list[int]:
    """The lengths of the fma chains (in order over k) that torch sums for an inner dimension K
    in the "fma" regime; their sums are added left to right in float32."""
    if K <= K_CHAIN:
        return [K]
    if K <= 2 * K_CHAIN:
        return [K // 2, K // 2] + [1] * (K % 2)
    return [K_CHAIN] * (K // K_CHAIN) + ([K % K_CHAIN] if K % K_CHAIN else [])


def regime(m: int, K: int, n: int) -> str | None:
    """How torch 2.13 CPU sums ``B @ A`` for B (m, K), A (K, n): "product" (K == 1), "fma",
    "plain", or None where its order is not reproduced (the module doc has the table)."""
    if K == 1:
        return "product"
    if K > K_MEASURED:
        return None
    if (12 <= n <= 16 or n % 16 == 0) and (m in (4, 8) or m >= 12):
        return "fma"
    if m == 1 or (m in (2, 3) and (n in (2, 3, 5) or n % 4 == 0)) or (m >= 4 and n in (2, 3, 4, 8)):
        return "plain"
    return None


def order_problem(m: int, K: int, n: int) -> str | None:
    """None where ``torch_order_matmul`` has torch's bits for B (m, K) @ A (K, n); otherwise
    why not, as a phrase for an error message."""
    if regime(m, K, n) is not None:
        return None
    if K > K_MEASURED:
        return f"torch's float32 summation order for an inner dimension (rank) over {K_MEASURED} was not measured"
    return (f"torch's float32 summation order for a ({m}, {K}) x ({K}, {n}) product B A is not reproduced by "
            "minilora (MKL's kernels for this shape sum otherwise, some depending on the thread count)")


def _fma_step(p: np.ndarray, c: np.ndarray, s: np.ndarray, c32: np.ndarray) -> None:
    """c <- fma(...) for p (the exact float64 products) and c (float32 values held in float64),
    in place; s and c32 are scratch buffers of c's shape (float64, float32)."""
    np.add(p, c, out=s)
    np.copyto(c32, s, casting="unsafe")
    bits = s.view(np.int64)
    # RN32(RN64(x)) != RN32(x) only when RN64(x) is a float32 half-way point (bits below the
    # float32 mantissa: 1 followed by 28 zeros) or float32-subnormal: check those exactly
    suspect = (bits & 0x1FFFFFFF) == 0x10000000
    suspect |= (np.abs(s) < _F32_TINY) & (s != 0)  # an exact float64 zero is the exact sum
    if suspect.any():
        idx = np.nonzero(suspect)
        ps, cs, ss = p[idx], c[idx], s[idx]
        bp = ss - cs
        err = (ps - bp) + (cs - (ss - bp))  # exact: x = ss + err
        sb = ss.view(np.int64).copy()
        # round to odd in float64 (53 >= 24 + 2 bits, so rounding that to float32 is exact RN)
        fix = (err != 0) & ((sb & 1) == 0)
        away = (err > 0) == (ss > 0)
        sb[fix] += np.where(away[fix], 1, -1)
        c32[idx] = sb.view(np.float64).astype(np.float32)
    np.copyto(c, c32)


def fma_chain(B: np.ndarray, A: np.ndarray) -> np.ndarray:
    """sum_k B[:, k] A[k, :] as a float32 fused-multiply-add chain over k in order (from +0),
    exactly; B (m, K), A (K, n) float32 -> (m, n) float32."""
    m, K = B.shape
    n = A.shape[1]
    out = np.empty((m, n), np.float32)
    B64, A64 = B.astype(np.float64), A.astype(np.float64)
    rows = max(1, min(m, _BLOCK_ELEMENTS // max(n, 1)))
    p = np.empty((rows, n))
    c = np.empty((rows, n))
    s = np.empty((rows, n))
    c32 = np.empty((rows, n), np.float32)
    for i0 in range(0, m, rows):
        i1 = min(m, i0 + rows)
        h = i1 - i0
        pb, cb, sb, c32b = p[:h], c[:h], s[:h], c32[:h]
        cb.fill(0.0)
        for k in range(K):
            np.multiply(B64[i0:i1, k:k + 1], A64[k], out=pb)
            _fma_step(pb, cb, sb, c32b)
        out[i0:i1] = c32b
    return out


def torch_order_matmul(B: np.ndarray, A: np.ndarray) -> np.ndarray:
    """``B @ A`` in float32 with torch 2.13 CPU's summation order (see the module doc); where
    ``order_problem`` names a problem, the fma order (one correct rounding, not torch's bits)."""
    B = np.ascontiguousarray(B, dtype=np.float32)
    A = np.ascontiguousarray(A, dtype=np.float32)
    m, K = B.shape
    n = A.shape[1]
    how = regime(m, K, n)
    if how == "product":
        return np.multiply(B, A)
    if how == "plain":
        out = np.zeros((m, n), np.float32)
        for k in range(K):
            out += np.multiply(B[:, k:k + 1], A[k:k + 1])
        return out
    sizes = k_blocks(K)
    k0 = sizes[0]
    total = fma_chain(B[:, :k0], A[:k0])
    for size in sizes[1:]:  # the chains' sums, left to right in float32
        total += fma_chain(B[:, k0:k0 + size], A[k0:k0 + size])
        k0 += size
    return total


def _chain(b: np.ndarray, a: np.ndarray) -> np.ndarray:
    """fma_chain for pairs: b, a (N, K) float32 -> (N,) float32, sum_k b[:, k] a[:, k]."""
    b64, a64 = b.astype(np.float64), a.astype(np.float64)
    n = b.shape[0]
    p, c, s = np.empty(n), np.zeros(n), np.empty(n)
    c32 = np.empty(n, np.float32)
    for k in range(b.shape[1]):
        np.multiply(b64[:, k], a64[:, k], out=p)
        _fma_step(p, c, s, c32)
    return c32


def torch_order_entries(B: np.ndarray, A: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """The entries (i, j) of ``torch_order_matmul(B, A)`` (index arrays), computed alone."""
    B = np.asarray(B, dtype=np.float32)
    A = np.asarray(A, dtype=np.float32)
    m, K = B.shape
    n = A.shape[1]
    b, a = B[i], A[:, j].T
    how = regime(m, K, n)
    if how == "product":
        return np.multiply(b[:, 0], a[:, 0])
    if how == "plain":
        out = np.zeros(len(i), np.float32)
        for k in range(K):
            out += np.multiply(b[:, k], a[:, k])
        return out
    sizes = k_blocks(K)
    k0 = sizes[0]
    total = _chain(b[:, :k0], a[:, :k0])
    for size in sizes[1:]:  # the chains' sums, left to right in float32
        total += _chain(b[:, k0:k0 + size], a[:, k0:k0 + size])
        k0 += size
    return total


def sum_error_bound(B: np.ndarray, A: np.ndarray) -> float:
    """A bound on |C - C'| for any two float32 evaluations C, C' of ``B @ A`` (any summation order,
    fused or not): both lie within gamma_K * sum_k |B_ik| |A_kj| of the exact product (Higham,
    Accuracy and Stability, 3.1), and sum_k |B_ik| |A_kj| <= max |B| * max_j sum_k |A_kj|."""
    K = B.shape[1]
    u = 2.0 ** -24
    gamma = K * u / (1 - K * u)
    if B.size == 0 or A.size == 0:
        return 0.0
    m = float(np.max(np.abs(B.astype(np.float64)))) * float(np.max(np.sum(np.abs(A.astype(np.float64)), axis=0)))
    return 2.0 * gamma * m * (1 + 1e-6)
