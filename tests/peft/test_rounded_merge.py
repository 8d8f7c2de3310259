"""``minilora.peft.rounded_merge``: a Linear merge rounded to float16/bfloat16 equals the same merge
with the whole product in torch's order (``torch_order_matmul``, itself checked against torch in
test_product.py), bit for bit, although only the elements near a rounding boundary take that path."""

from __future__ import annotations

import numpy as np
import pytest

from minilora.formats.rounding import f32_to_bf16_bits
from minilora.peft import rounded_merge
from minilora.peft.product import torch_order_matmul
from minilora.peft.rounded_merge import rounded_linear_merge


def _reference(value: np.ndarray, B: np.ndarray, A: np.ndarray, s: np.float32, fifo: bool, kind: str) -> np.ndarray:
    P = torch_order_matmul(B, A)
    y = np.multiply(P.T if fifo else P, s, order="C")
    y += value
    return f32_to_bf16_bits(y) if kind == "BF16" else y.astype(np.float16)


def _case(rng: np.random.Generator, shape: tuple[int, int], r: int, fifo: bool, kind: str, w: float, ab: float):
    d_out, d_in = shape
    W = (rng.standard_normal((d_in, d_out) if fifo else (d_out, d_in)) * w).astype(np.float32)
    # W as the model stores it: already on the half-precision grid
    W = W.astype(np.float16).astype(np.float32) if kind == "F16" else \
        (f32_to_bf16_bits(W).astype(np.uint32) << np.uint32(16)).view(np.float32)
    B = (rng.standard_normal((d_out, r)) * ab).astype(np.float32)
    A = (rng.standard_normal((r, d_in)) * ab).astype(np.float32)
    return W, B, A


@pytest.mark.parametrize("kind", ["BF16", "F16"])
@pytest.mark.parametrize("fifo", [False, True])
@pytest.mark.parametrize(("shape", "r"), [((256, 768), 16), ((96, 40), 64), ((700, 33), 8), ((5, 3000), 200)])
def test_equals_the_merge_with_the_whole_product_in_torch_order(kind: str, fifo: bool, shape: tuple, r: int) -> None:
    rng = np.random.default_rng(shape[0] * 31 + r + fifo)
    for w, ab, s in [(0.02, 0.01, 2.0), (0.0, 0.3, 1.0), (1.0, 0.05, 0.125)]:  # delta small, alone, mixed
        W, B, A = _case(rng, shape, r, fifo, kind, w, ab)
        got, new = rounded_linear_merge(W, B, A, np.float32(s), fifo, kind)
        want = _reference(W, B, A, np.float32(s), fifo, kind)
        assert got.shape == want.shape == W.shape and new.shape == W.shape
        assert np.array_equal(got.view(np.uint16), want.view(np.uint16)), (w, ab, s)


def _float64_product(L: np.ndarray, Rt: np.ndarray, out: np.ndarray) -> None:
    """The product summed in float64 and rounded once: a summation order unlike torch's FMA chain
    on every machine (NumPy's own float32 BLAS may happen to match torch's on some CPUs)."""
    np.copyto(out, L.astype(np.float64) @ Rt.astype(np.float64), casting="unsafe")


def test_it_is_the_recomputation_that_makes_the_bits_right(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a bulk product in another order, rounding it directly gives other bits than torch's
    for some elements, and the merge still gives torch's: the bound marks every element where the
    order matters, whatever order the bulk product used."""
    rng = np.random.default_rng(5)
    for fifo in (False, True):
        W, B, A = _case(rng, (512, 2048), 64, fifo, "BF16", 0.0, 0.3)
        P = np.empty(W.shape, np.float32)
        if fifo:
            _float64_product(np.ascontiguousarray(A.T), np.ascontiguousarray(B.T), P)
        else:
            _float64_product(B, A, P)
        plain = f32_to_bf16_bits(np.multiply(P, np.float32(1.0)) + W)
        want = _reference(W, B, A, np.float32(1.0), fifo, "BF16")
        assert np.count_nonzero(plain != want) > 0
        monkeypatch.setattr(rounded_merge, "_product", _float64_product)
        got, _ = rounded_linear_merge(W, B, A, np.float32(1.0), fifo, "BF16")
        monkeypatch.undo()
        assert np.array_equal(got, want)


def test_row_blocks_cover_every_row(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(9)
    W, B, A = _case(rng, (37, 50), 4, False, "BF16", 0.02, 0.01)
    whole, _ = rounded_linear_merge(W, B, A, np.float32(2.0), False, "BF16")
    monkeypatch.setattr(rounded_merge, "BLOCK_ELEMENTS", 120)  # 2 rows of 50 a block: 19 blocks, the last short
    blocked, new = rounded_linear_merge(W, B, A, np.float32(2.0), False, "BF16")
    assert np.array_equal(whole, blocked)
    np.testing.assert_allclose(new, np.float32(2.0) * (B @ A) + W, rtol=1e-6, atol=1e-9)
