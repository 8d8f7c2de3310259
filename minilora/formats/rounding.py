"""float32 -> bfloat16 rounding on the float32 bits, with integer operations only (no float64
detour): round to nearest, ties to even, as ``torch.Tensor.to(torch.bfloat16)``.

For the float32 bit pattern b (uint32), the bfloat16 bits are the top 16 bits of
b + 0x7FFF + ((b >> 16) & 1): the added 0x7FFF carries into bit 16 exactly when the dropped
half is over 0x8000, and the last bit of the kept half decides a tie (0x8000). That is right for
subnormals, for the largest values (a carry into the exponent gives infinity) and for infinities
(the low half is zero). NaN is the one exception (the sum could carry into the sign): NaN stays a
NaN, quiet, its sign and top payload bits kept. torch 2.13 on CPU writes 0xFFFF for every NaN
instead; both are NaN, and the merge refuses a non-finite result anyway.
"""

from __future__ import annotations

import numpy as np

__all__ = ["f32_to_bf16_bits"]


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """The bfloat16 bit patterns (uint16, ``x``'s shape) of the float32 array ``x``, rounded to
    nearest even; a few in-place integer passes over a uint32 scratch array."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    b = x.reshape(-1).view(np.uint32)
    t = np.right_shift(b, np.uint32(16))
    np.bitwise_and(t, np.uint32(1), out=t)
    t += np.uint32(0x7FFF)
    t += b  # wraps only for NaN patterns near 0xFFFFFFFF, fixed below
    t >>= np.uint32(16)
    out = t.astype(np.uint16)
    nan = np.isnan(x.reshape(-1))
    if nan.any():
        out[nan] = ((b[nan] >> np.uint32(16)) | np.uint32(0x0040)).astype(np.uint16)
    return out.reshape(x.shape)
