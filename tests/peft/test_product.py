"""``minilora.peft.product``: the float32 product B A in torch 2.13 CPU's summation order, and
the merge's use of it (``merge._linear``) against torch's own merge arithmetic at real sizes."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import peft_modules

from minilora.peft.merge import _linear
from minilora.peft.product import fma_chain, sum_error_bound, torch_order_entries, torch_order_matmul


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
