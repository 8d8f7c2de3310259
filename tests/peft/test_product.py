"""``minilora.peft.product``: the float32 product B A in torch 2.13 CPU's summation order, and
the merge's use of it (``merge._linear``) against torch's own merge arithmetic at real sizes; the
regime boundaries (the chain splits at K = 192 and 384, the kernels' shapes) against torch, and the
shapes refused as not reproduced really summed otherwise by torch."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from helpers import peft_modules

from minilora.peft.merge import _linear, delta_weight
from minilora.peft.product import (
    K_MEASURED,
    fma_chain,
    k_blocks,
    order_problem,
    regime,
    sum_error_bound,
    torch_order_entries,
    torch_order_matmul,
)


def _differing(x: np.ndarray, y: np.ndarray) -> int:
    return int(np.count_nonzero(x.view(np.uint32) != y.view(np.uint32)))


@pytest.mark.compare
@pytest.mark.slow
@pytest.mark.parametrize("shape", [(2048, 16, 2048), (777, 16, 333), (12, 4, 12), (64, 64, 96), (100, 256, 100),
                                   (3, 8, 5), (1, 16, 2048), (2048, 1, 64), (16, 8, 13)])
def test_torch_order_matmul_equals_torch_bit_for_bit(shape: tuple[int, int, int]) -> None:
    torch, _ = peft_modules()
    m, r, n = shape
    gen = torch.Generator().manual_seed(m * 7 + r * 3 + n)
    B = torch.randn(m, r, generator=gen) * 0.02
    A = torch.randn(r, n, generator=gen) * 0.02
    B[::5] = 0.0  # zero rows: the sign of zero sums
    expected = (B @ A).numpy()
    got = torch_order_matmul(B.numpy(), A.numpy())
    assert got.dtype == np.float32 and got.shape == (m, n)
    assert _differing(got, expected) == 0
    i = np.arange(0, m * n, 97) // n
    j = np.arange(0, m * n, 97) % n
    assert _differing(torch_order_entries(B.numpy(), A.numpy(), i, j), expected[i, j]) == 0


@pytest.mark.compare
def test_another_summation_order_differs_at_real_size() -> None:
    """Why the module exists: a float32 B @ A summed in another order (here the same FMA chain
    over k reversed) is not torch's at (2048, 16) x (16, 2048), though both stay within
    sum_error_bound of each other; NumPy's own product stays within it too. (Whether NumPy's BLAS
    sums like torch depends on the CPU: OpenBLAS's AVX-512 kernels do, its AVX2 kernels do not.)"""
    torch, _ = peft_modules()
    gen = torch.Generator().manual_seed(3)
    B, A = torch.randn(2048, 16, generator=gen) * 0.02, torch.randn(16, 2048, generator=gen) * 0.02
    expected = (B @ A).numpy()
    bound = sum_error_bound(B.numpy(), A.numpy())
    reversed_chain = fma_chain(np.ascontiguousarray(B.numpy()[:, ::-1]), np.ascontiguousarray(A.numpy()[::-1]))
    assert _differing(reversed_chain, expected) > 0
    for other in (reversed_chain, B.numpy() @ A.numpy()):
        assert float(np.max(np.abs(other.astype(np.float64) - expected))) <= bound


@pytest.mark.compare
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_linear_merge_equals_peft_arithmetic_at_real_size(dtype: str, fan_in_fan_out: bool) -> None:
    """PEFT's Linear merge on CPU (adapter in float32): W += transpose(B @ A, fifo) * s, the sum in
    float32 and one rounding to W's dtype; at (2048, 16) x (16, 2048) every bit agrees."""
    torch, _ = peft_modules()
    tdtype = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(11)
    W = (torch.randn(2048, 2048, generator=gen) * 0.02).to(tdtype)
    B, A = torch.randn(2048, 16, generator=gen) * 0.01, torch.randn(16, 2048, generator=gen) * 0.01
    s = 2.0
    delta = (B @ A) * s
    expected = W.clone()
    expected += delta.T if fan_in_fan_out else delta
    kind = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}[dtype]
    got = _linear("q_proj", "q_proj.weight", W.float().numpy(), B.numpy(), A.numpy(), np.float32(s),
                  fan_in_fan_out, kind)
    view = torch.int32 if dtype == "float32" else torch.int16
    want = expected.contiguous().view(view).numpy()
    assert got.shape == want.shape
    assert int(np.count_nonzero(got.view(want.dtype) != want)) == 0


# ---------------------------------------------------------------- regimes and their boundaries

BOUNDARY_K = [2, 127, 128, 129, 150, 191, 192, 193, 199, 200, 255, 256, 257, 301, 383, 384, 385, 386, 511, 512, 577,
              1024]


def _random(torch: object, m: int, K: int, n: int, seed: int) -> tuple:
    gen = torch.Generator().manual_seed(seed)  # type: ignore[attr-defined]
    B = torch.randn(m, K, generator=gen)  # type: ignore[attr-defined]
    A = torch.randn(K, n, generator=gen)  # type: ignore[attr-defined]
    return B, A


def test_k_blocks_cover_k_in_order() -> None:
    for K in range(1, K_MEASURED + 1):
        sizes = k_blocks(K)
        assert sum(sizes) == K and all(0 < s <= 192 for s in sizes), K
    assert k_blocks(192) == [192] and k_blocks(193) == [96, 96, 1] and k_blocks(200) == [100, 100]
    assert k_blocks(385) == [192, 192, 1] and k_blocks(512) == [192, 192, 128]


def test_regime_table() -> None:
    assert regime(2048, 1, 2048) == "product" and regime(5, 1, 7) == "product"
    for m, n in [(2048, 2048), (4, 12), (8, 1008), (12, 13), (13, 96), (4096, 768), (768, 50304)]:
        assert regime(m, 16, n) == "fma" and order_problem(m, 16, n) is None
    for m, n in [(1, 1), (1, 4097), (2, 768), (3, 1000), (2, 5), (16, 8), (4096, 3)]:
        assert regime(m, 16, n) == "plain" and order_problem(m, 16, n) is None
    for m, n in [(5, 768), (7, 12), (11, 4096), (2, 1002), (3, 13), (2048, 1), (2048, 7), (16, 11), (16, 24),
                 (768, 50257)]:
        assert regime(m, 16, n) is None
        assert f"({m}, 16) x (16, {n}) product" in str(order_problem(m, 16, n))
    assert regime(2048, K_MEASURED + 1, 2048) is None and "not measured" in str(order_problem(64, 2000, 64))


# torch's default: one thread per CPU it may run on (PEFT runs so); tests elsewhere use one thread
DEFAULT_THREADS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextlib.contextmanager
def _threads(torch: Any, n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.mark.compare
@pytest.mark.parametrize("threads", sorted({1, DEFAULT_THREADS, 8}))
@pytest.mark.parametrize("K", BOUNDARY_K)
def test_fma_chain_splits_equal_torch_at_the_boundaries(K: int, threads: int) -> None:
    """Every entry of a (64, K) x (K, 96) product, and sampled entries (the last rows and columns
    included, where MKL's edge tiles are) of (2048, K) x (K, 2048), bit for bit, at one thread,
    torch's default and 8 (where MKL splits the columns into blocks)."""
    torch, _ = peft_modules()
    with _threads(torch, threads):
        B, A = _random(torch, 64, K, 96, K)
        assert regime(64, K, 96) == "fma"
        assert _differing(torch_order_matmul(B.numpy(), A.numpy()), (B @ A).numpy()) == 0
        B, A = _random(torch, 2048, K, 2048, K + 1)
        expected = (B @ A).numpy()
    rng = np.random.default_rng(K)
    i = np.concatenate([rng.integers(0, 2048, 1500), np.full(64, 2047), np.arange(64)])
    j = np.concatenate([rng.integers(0, 2048, 1500), np.arange(64), np.full(64, 2047)])
    assert _differing(torch_order_entries(B.numpy(), A.numpy(), i, j), expected[i, j]) == 0


@pytest.mark.compare
@pytest.mark.parametrize("threads", sorted({1, DEFAULT_THREADS, 8}))
@pytest.mark.parametrize("shape", [(1, 4096), (2, 768), (3, 1000), (16, 8), (2048, 3), (4, 12), (8, 48), (13, 96),
                                   (768, 16), (1001, 2048)])
@pytest.mark.parametrize("K", [5, 193, 200])
def test_plain_and_small_fma_shapes_equal_torch(shape: tuple[int, int], K: int, threads: int) -> None:
    torch, _ = peft_modules()
    m, n = shape
    B, A = _random(torch, m, K, n, m + n + K)
    assert order_problem(m, K, n) is None
    with _threads(torch, threads):
        expected = (B @ A).numpy()
    assert _differing(torch_order_matmul(B.numpy(), A.numpy()), expected) == 0


@pytest.mark.compare
@pytest.mark.parametrize(("shape", "threads"), [((5, 768), 2), ((7, 20), 2), ((11, 4096), 2), ((2, 1002), 1),
                                                ((3, 13), 1), ((2048, 7), 2), ((16, 11), 2), ((16, 24), 8),
                                                ((1001, 40), 8)])
def test_shapes_refused_as_not_reproduced_are_summed_otherwise_by_torch(shape: tuple[int, int], threads: int) -> None:
    """Why order_problem refuses them: at K = 64 (at a thread count where it shows) torch's bits
    differ from both emulated orders, while staying within the error bound of any order."""
    torch, _ = peft_modules()
    m, n = shape
    B, A = _random(torch, m, 64, n, m * n)
    assert order_problem(m, 64, n) is not None
    with _threads(torch, threads):
        expected = (B @ A).numpy()
    fma = torch_order_matmul(B.numpy(), A.numpy())  # the fma order, used where not reproduced
    plain = np.zeros((m, n), np.float32)
    for k in range(64):
        plain += np.multiply(B.numpy()[:, k:k + 1], A.numpy()[k:k + 1])
    assert _differing(fma, expected) > 0 and _differing(plain, expected) > 0
    assert float(np.max(np.abs(fma.astype(np.float64) - expected))) <= sum_error_bound(B.numpy(), A.numpy())


@pytest.mark.compare
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("r", [129, 193, 200, 255])
def test_high_rank_linear_merge_equals_peft_arithmetic(dtype: str, r: int) -> None:
    """The ranks the 128-term chains merged with other bits than PEFT (768 x 768, GPT-2's size)."""
    torch, _ = peft_modules()
    tdtype = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(r)
    W = (torch.randn(768, 768, generator=gen) * 0.02).to(tdtype)
    B, A = torch.randn(768, r, generator=gen) * 0.01, torch.randn(r, 768, generator=gen) * 0.01
    s = 16 / r
    expected = W.clone()
    expected += (B @ A) * s
    kind = {"bfloat16": "BF16", "float32": "F32"}[dtype]
    got = _linear("q_proj", "q_proj.weight", W.float().numpy(), B.numpy(), A.numpy(), np.float32(s), False, kind)
    want = expected.contiguous().view(torch.int32 if dtype == "float32" else torch.int16).numpy()
    assert int(np.count_nonzero(got.view(want.dtype) != want)) == 0


@pytest.mark.compare
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("r", [16, 200])
def test_delta_weight_equals_peft_get_delta_weight_rounded(dtype: str, fan_in_fan_out: bool, r: int) -> None:
    """The delta of an embedding merge and of every unmerge: PEFT's transpose(B @ A, fifo) * s
    rounded to the base dtype (``delta.to(orig_dtype)``), every bit, at torch's default threads."""
    torch, _ = peft_modules()
    tdtype = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(r)
    B, A = torch.randn(256, r, generator=gen) * 0.01, torch.randn(r, 512, generator=gen) * 0.01
    s = 16 / r
    with _threads(torch, DEFAULT_THREADS):
        product = B @ A
    want = ((product.T if fan_in_fan_out else product) * s).to(tdtype).contiguous()
    kind = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}[dtype]
    got = delta_weight(B.numpy(), A.numpy(), np.float32(s), fan_in_fan_out, kind)
    assert got.dtype == np.float32 and got.shape == tuple(want.shape)
    np.testing.assert_array_equal(got, want.float().numpy())
    assert np.array_equal(np.signbit(got), np.signbit(want.float().numpy()))
