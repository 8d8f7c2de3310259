"""float32 -> bfloat16 on the float32 bits gives torch's bytes (and the old float64 path's)."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import require

from minilora.formats import safetensors as st
from minilora.formats.rounding import f32_to_bf16_bits


def _edge_values() -> np.ndarray:
    bits = [0x00000000, 0x80000000, 0x00000001, 0x80000001, 0x00007FFF, 0x00008000, 0x00018000, 0x00008001,
            0x007FFFFF, 0x00800000, 0x3F808000, 0x3F818000, 0x3F807FFF, 0x3F808001, 0x7F7FFFFF, 0xFF7FFFFF,
            0x7F7F8000, 0x7F7F7FFF, 0x7F800000, 0xFF800000, 0x3F800000, 0xBF80C000]
    rng = np.random.default_rng(0)
    rand = rng.integers(0, 2**32, size=20000, dtype=np.uint64).astype(np.uint32)
    ties = (rand & np.uint32(0xFFFF0000)) | np.uint32(0x8000)
    out = np.concatenate([np.array(bits, np.uint32), rand, ties]).view(np.float32)
    return out[~np.isnan(out)]


def test_matches_the_float64_path_on_finite_values() -> None:
    x = _edge_values()
    np.testing.assert_array_equal(f32_to_bf16_bits(x), st.float_to_bf16_bits(x))


@pytest.mark.compare
def test_matches_torch_bytes() -> None:
    torch = require("torch")
    x = _edge_values()
    expected = torch.from_numpy(x.copy()).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(f32_to_bf16_bits(x), expected)
    nans = np.array([0x7FC00000, 0xFFC00000, 0x7F800001, 0xFFFFFFFF, 0x7FFFFFFF], np.uint32).view(np.float32)
    got = st.bf16_bits_to_float32(f32_to_bf16_bits(nans))
    assert np.isnan(got).all()  # torch writes 0xFFFF for each; NaN stays NaN here, sign kept
    assert (np.signbit(got) == np.signbit(nans)).all()
    assert f32_to_bf16_bits(x.reshape(2, -1)).shape == (2, x.size // 2)
