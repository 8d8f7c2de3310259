"""NF4 (QLoRA): the code values, packing, the 8-bit second level, round-trip bounds, and
byte-for-byte equality with bitsandbytes itself; the QLoRA layer; bad input.

The comparison tests run bitsandbytes' own CPU kernels (``require("bitsandbytes")``: they fail in
CI when it is missing).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from helpers import require
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import minilora as ml
from minilora.errors import MiniLoraTypeError, MiniLoraValueError, ShapeError
from minilora.study import nf4, qlora

# QLoRA paper, Appendix E ("NormalFloat 4-bit data type"), the same literals as bitsandbytes'
# get_4bit_type("nf4").
PUBLISHED_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
]

with_fixture = settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def bits(a: np.ndarray) -> np.ndarray:
    """The float32 bit patterns: equality of these is equality bit for bit (and -0 != 0)."""
    return np.asarray(a, np.float32).view(np.uint32)


@pytest.fixture(scope="module")
def bnb() -> Any:
    """bitsandbytes.functional, with its native CPU library (its 8-bit CPU kernel is the one
    reproduced here; without the library bitsandbytes falls back to another rule)."""
    require("torch")
    F = require("bitsandbytes.functional")
    from bitsandbytes.cextension import ErrorHandlerMockBNBNativeLibrary, lib

    assert not isinstance(lib, ErrorHandlerMockBNBNativeLibrary), "bitsandbytes' native CPU library did not load"
    return F


def bnb_quantize(F: Any, x: np.ndarray, blocksize: int, double_quant: bool) -> tuple[Any, Any]:
    import torch

    return F.quantize_4bit(torch.from_numpy(np.ascontiguousarray(x)), blocksize=blocksize, quant_type="nf4",
                           compress_statistics=double_quant)


def data(seed: int, shape: tuple[int, ...], scale: float = 1.0) -> np.ndarray:
    return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


# ---------------------------------------------------------------- the code values


def test_code_equals_the_published_table_bit_for_bit() -> None:
    code = nf4.nf4_code()
    assert code.dtype == np.float32 and code.shape == (16,)
    np.testing.assert_array_equal(bits(code), bits(PUBLISHED_NF4))


def test_code_shape_of_the_data_type() -> None:
    code = nf4.nf4_code()
    assert np.all(np.diff(code) > 0)
    assert (code[0], code[7], code[15]) == (-1.0, 0.0, 1.0)
    assert (code < 0).sum() == 7 and (code > 0).sum() == 8  # asymmetric: one more positive value


def test_code_is_a_copy() -> None:
    code = nf4.nf4_code()
    code[0] = 5.0
    assert nf4.nf4_code()[0] == -1.0


@pytest.mark.compare
def test_code_equals_bitsandbytes(bnb: Any) -> None:
    np.testing.assert_array_equal(bits(nf4.nf4_code()), bits(bnb.get_4bit_type("nf4", device="cpu").numpy()))
    full = bnb.create_normal_map().numpy()  # 256 entries: 7 negative, 241 zeros, 8 positive
    derived = np.concatenate([full[:7], [0.0], full[-8:]]).astype(np.float32)
    np.testing.assert_array_equal(bits(nf4.nf4_code()), bits(derived))


@pytest.mark.compare
def test_dynamic_code_equals_bitsandbytes(bnb: Any) -> None:
    np.testing.assert_array_equal(bits(nf4.dynamic_code()), bits(bnb.create_dynamic_map().numpy()))


@pytest.mark.compare
@pytest.mark.parametrize(("start", "end"), [(0.9677083, 0.5), (0.1, 1.0), (-3.25, 7.1), (0.0, 1.0)])
@pytest.mark.parametrize("steps", [2, 3, 8, 9, 17, 33, 65, 100])
def test_linspace_matches_torch(start: float, end: float, steps: int) -> None:
    torch = require("torch")
    np.testing.assert_array_equal(bits(nf4._linspace_f32(start, end, steps)),
                                  bits(torch.linspace(start, end, steps).numpy()))


# ---------------------------------------------------------------- packing


def test_pack_order_first_element_in_high_nibble() -> None:
    np.testing.assert_array_equal(nf4.pack_4bit([1, 2, 3, 15, 0, 9]), np.array([0x12, 0x3F, 0x09], np.uint8))


def test_pack_pads_an_odd_count_with_the_zero_code() -> None:
    packed = nf4.pack_4bit([4, 5, 6])
    np.testing.assert_array_equal(packed, np.array([0x45, 0x67], np.uint8))
    np.testing.assert_array_equal(nf4.unpack_4bit(packed, 3), [4, 5, 6])


@given(idx=hnp.arrays(np.uint8, st.integers(1, 64), elements=st.integers(0, 15)))
def test_pack_unpack_round_trip(idx: np.ndarray) -> None:
    packed = nf4.pack_4bit(idx)
    assert packed.dtype == np.uint8 and packed.shape == ((idx.size + 1) // 2,)
    np.testing.assert_array_equal(nf4.unpack_4bit(packed, idx.size), idx)


@pytest.mark.parametrize(("indices", "error", "fragment"), [
    ([0, 16], MiniLoraValueError, "[0, 15]"),
    ([-1, 3], MiniLoraValueError, "[0, 15]"),
    (np.array([0.5, 1.0]), MiniLoraTypeError, "integers"),
])
def test_pack_refuses_bad_indices(indices: Any, error: type, fragment: str) -> None:
    with pytest.raises(error, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        nf4.pack_4bit(indices)


def test_unpack_checks_length() -> None:
    with pytest.raises(ShapeError, match=r"\(2,\)"):
        nf4.unpack_4bit(np.zeros(3, np.uint8), 4)


# ---------------------------------------------------------------- equality with bitsandbytes

# (shape, blocksize): the last dimension a multiple of blocksize, as for real weight matrices
CASES = [((64, 256), 64), ((32, 96), 32), ((8, 4096), 4096), ((16, 512), 128), ((1000, 64), 64), ((3, 2048), 2048)]


@pytest.mark.compare
@pytest.mark.parametrize(("shape", "blocksize"), CASES)
@pytest.mark.parametrize("scale", [1.0, 1e-3, 300.0])
def test_quantize_equals_bitsandbytes(bnb: Any, shape: tuple[int, int], blocksize: int, scale: float) -> None:
    x = data(sum(shape) + blocksize, shape, scale)
    packed, state = bnb_quantize(bnb, x, blocksize, False)
    ours = nf4.nf4_quantize(x, blocksize=blocksize)
    np.testing.assert_array_equal(ours["packed"], packed.numpy().reshape(-1))
    np.testing.assert_array_equal(bits(ours["absmax"]), bits(state.absmax.numpy()))
    theirs = bnb.dequantize_4bit(packed, state).numpy().reshape(shape)
    np.testing.assert_array_equal(bits(nf4.nf4_dequantize(ours)), bits(theirs))


@pytest.mark.compare
@pytest.mark.parametrize(("shape", "blocksize"), CASES)
def test_double_quant_equals_bitsandbytes(bnb: Any, shape: tuple[int, int], blocksize: int) -> None:
    x = data(sum(shape) * 7 + blocksize, shape)
    packed, state = bnb_quantize(bnb, x, blocksize, True)
    # given bitsandbytes' offset (torch.mean: see test_default_offset_is_the_mean), every byte agrees
    ours = nf4.nf4_quantize(x, blocksize=blocksize, double_quant=True, offset=state.offset.item())
    np.testing.assert_array_equal(ours["packed"], packed.numpy().reshape(-1))
    np.testing.assert_array_equal(ours["absmax_q"], state.absmax.numpy())
    np.testing.assert_array_equal(bits(ours["absmax_absmax"]), bits(state.state2.absmax.numpy()))
    assert ours["absmax_blocksize"] == state.state2.blocksize == 256
    assert bits(ours["absmax_offset"]) == bits(state.offset.numpy())
    theirs = bnb.dequantize_4bit(packed, state).numpy().reshape(shape)
    np.testing.assert_array_equal(bits(nf4.nf4_dequantize(ours)), bits(theirs))


@pytest.mark.compare
@pytest.mark.parametrize("double_quant", [False, True])
def test_dequantize_reads_a_bitsandbytes_state(bnb: Any, double_quant: bool) -> None:
    """The format is the same: bitsandbytes' bytes and constants, dequantized here, give its values."""
    x = data(5, (24, 128))
    packed, s = bnb_quantize(bnb, x, 64, double_quant)
    state = {"packed": packed.numpy().reshape(-1), "shape": (24, 128), "blocksize": 64, "double_quant": double_quant}
    if double_quant:
        state.update(absmax_q=s.absmax.numpy(), absmax_absmax=s.state2.absmax.numpy(),
                     absmax_offset=s.offset.numpy(), absmax_blocksize=s.state2.blocksize)
    else:
        state["absmax"] = s.absmax.numpy()
    np.testing.assert_array_equal(bits(nf4.nf4_dequantize(state)), bits(bnb.dequantize_4bit(packed, s).numpy()))


@pytest.mark.compare
@pytest.mark.parametrize(("shape", "blocksize"), [((150, 64), 64), ((40, 96), 64), ((1000, 64), 64)])
def test_default_offset_is_the_mean(bnb: Any, shape: tuple[int, int], blocksize: int) -> None:
    """The offset is the mean of the block maxima. bitsandbytes takes torch.mean, whose float32
    summation order depends on the machine; ours is the float64 mean rounded once, so the two may
    differ in the last bits, never more."""
    x = data(11, shape)
    _, state = bnb_quantize(bnb, x, blocksize, True)
    ours = nf4.nf4_quantize(x, blocksize=blocksize, double_quant=True)
    plain = nf4.nf4_quantize(x, blocksize=blocksize)
    exact = math.fsum(plain["absmax"].astype(np.float64).tolist()) / plain["absmax"].size
    assert ours["absmax_offset"] == np.float32(exact)
    assert abs(float(ours["absmax_offset"]) - state.offset.item()) <= 4 * np.spacing(np.float32(exact))


@pytest.mark.compare
def test_ties_take_the_lower_code(bnb: Any) -> None:
    """A value exactly on a midpoint between two codes takes the lower one (torch.bucketize);
    the next float32 above takes the upper one."""
    code = nf4.nf4_code()
    mids = (code[:-1] + code[1:]) / np.float32(2)
    x = np.zeros((4, 64), np.float32)
    x[:, 0] = 1.0  # block maximum 1: the scaled values are the values themselves
    x[0, 1:16], x[1, 1:16] = mids, np.nextafter(mids, np.float32(2))
    x[2, 1:16], x[3, 1:16] = -mids, np.nextafter(-mids, np.float32(-2))
    ours = nf4.nf4_quantize(x, blocksize=64)
    idx = nf4.unpack_4bit(ours["packed"], x.size).reshape(4, 64)
    np.testing.assert_array_equal(idx[0, 1:16], np.arange(15))
    np.testing.assert_array_equal(idx[1, 1:16], np.arange(1, 16))
    packed, _ = bnb_quantize(bnb, x, 64, False)
    np.testing.assert_array_equal(ours["packed"], packed.numpy().reshape(-1))


@pytest.mark.compare
def test_last_dim_smaller_than_blocksize(bnb: Any) -> None:
    """Blocks run over the flattened array, across rows. bitsandbytes' quantizer agrees; its AVX-512
    CPU dequantizer indexes the constants per row and is wrong when a row is not a whole number of
    blocks, so the values are compared with its dequantization of the flattened tensor."""
    x = data(3, (300, 64))
    packed, _ = bnb_quantize(bnb, x, 128, False)
    ours = nf4.nf4_quantize(x, blocksize=128)
    np.testing.assert_array_equal(ours["packed"], packed.numpy().reshape(-1))
    flat_packed, flat_state = bnb_quantize(bnb, x.reshape(-1), 128, False)
    theirs = bnb.dequantize_4bit(flat_packed, flat_state).numpy().reshape(-1)
    np.testing.assert_array_equal(bits(nf4.nf4_dequantize(ours).reshape(-1)), bits(theirs))


@pytest.mark.compare
@pytest.mark.parametrize("n", [256, 1000, 257, 5])
def test_8bit_blockwise_equals_bitsandbytes(bnb: Any, n: int) -> None:
    import torch

    x = data(n, (n,), 0.3)
    q, s = bnb.quantize_blockwise(torch.from_numpy(x), blocksize=256)
    ours_q, ours_absmax = nf4.quantize_blockwise_8bit(x, blocksize=256)
    np.testing.assert_array_equal(ours_q, q.numpy())
    np.testing.assert_array_equal(bits(ours_absmax), bits(s.absmax.numpy()))
    theirs = bnb.dequantize_blockwise(q, s).numpy()
    np.testing.assert_array_equal(bits(nf4.dequantize_blockwise_8bit(ours_q, ours_absmax, blocksize=256)), bits(theirs))


@pytest.mark.compare
def test_8bit_uses_the_lookup_table_not_the_nearest_code(bnb: Any) -> None:
    """bitsandbytes' CPU kernel picks the code nearest the value's 1/65535-wide bin, which for
    the densely packed small codes is not always the code nearest the value; ours does the same."""
    import torch

    code = nf4.dynamic_code()
    mids = (code[:-1] + code[1:]) / np.float32(2)
    x = np.linspace(-1, 1, 255 * 256, dtype=np.float32)
    x = np.concatenate([[1.0], x]).astype(np.float32)[: 256 * 255]
    nearest = np.searchsorted(mids, x, side="left")
    ours, _ = nf4.quantize_blockwise_8bit(x, blocksize=x.size)
    theirs, _ = bnb.quantize_blockwise(torch.from_numpy(x), blocksize=x.size)
    np.testing.assert_array_equal(ours, theirs.numpy())
    assert np.count_nonzero(ours != nearest) > 0


# ---------------------------------------------------------------- round trip


finite_blocks = hnp.arrays(
    np.float32, st.sampled_from([(2, 64), (4, 32), (128,)]),
    elements=st.floats(-1e4, 1e4, allow_nan=False, width=32),
)


@given(x=finite_blocks, double_quant=st.booleans())
def test_round_trip_error_bound(x: np.ndarray, double_quant: bool) -> None:
    """|x - x_hat| <= c * max_gap / 2 per block (c = the block maximum): every scaled value lies
    within half a gap of its code. With double quantization c itself is stored to 8 bits, so the
    bound uses the reconstructed c and adds |c - c_hat|."""
    blocksize = 64 if x.size % 64 == 0 and x.ndim == 2 and x.shape[1] == 64 else 32
    state = nf4.nf4_quantize(x, blocksize=blocksize, double_quant=double_quant)
    x_hat = nf4.nf4_dequantize(state).astype(np.float64).reshape(-1, blocksize)
    blocks = x.astype(np.float64).reshape(-1, blocksize)
    c = np.abs(blocks).max(axis=1, keepdims=True)
    half_gap = np.max(np.diff(nf4.nf4_code().astype(np.float64))) / 2
    c_hat = nf4._state_absmax(state, blocks.shape[0]).astype(np.float64)[:, None] if double_quant else c
    bound = np.maximum(c, c_hat) * half_gap + np.abs(c - c_hat) + 4 * np.spacing(np.float32(c.max() + 1))
    assert np.all(np.abs(blocks - x_hat) <= bound)


def test_block_maxima_and_zeros_are_exact() -> None:
    x = data(2, (4, 64))
    x[1] = 0.0  # a block of zeros
    state = nf4.nf4_quantize(x, blocksize=64)
    x_hat = nf4.nf4_dequantize(state)
    assert np.all(x_hat[1] == 0.0)
    for row in (0, 2, 3):
        k = np.argmax(np.abs(x[row]))
        assert x_hat[row, k] == x[row, k]  # the maximum maps to the code +-1 exactly


def test_float64_input_is_rounded_to_float32_first() -> None:
    x = np.random.default_rng(4).standard_normal((8, 64))
    a, b = nf4.nf4_quantize(x), nf4.nf4_quantize(x.astype(np.float32))
    np.testing.assert_array_equal(a["packed"], b["packed"])
    np.testing.assert_array_equal(a["absmax"], b["absmax"])


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_dequantize_dtype(dtype: str) -> None:
    state = nf4.nf4_quantize(data(1, (2, 64)))
    out = nf4.nf4_dequantize(state, dtype=dtype)
    assert out.dtype == np.dtype(dtype) and out.shape == (2, 64)
    np.testing.assert_array_equal(out, nf4.nf4_dequantize(state).astype(dtype))


@pytest.mark.parametrize(("blocksize", "double_quant", "bits_"), [(64, False, 4.5), (64, True, 4 + 8 / 64 + 32 / (64 * 256)),
                                                                  (32, False, 5.0)])
def test_bits_per_param(blocksize: int, double_quant: bool, bits_: float) -> None:
    assert nf4.nf4_bits_per_param(blocksize, double_quant=double_quant) == bits_
    state = nf4.nf4_quantize(data(0, (256, 256)), blocksize=blocksize, double_quant=double_quant)
    assert nf4.nf4_nbytes(state) * 8 / 65536 == pytest.approx(bits_, abs=32 / 65536)


def test_double_quant_saves_what_the_paper_says() -> None:
    """QLoRA section 3: from 32/64 = 0.5 to 8/64 + 32/(64*256) = 0.127 bits per parameter."""
    assert nf4.nf4_bits_per_param(64) - 4 == 0.5
    assert round(nf4.nf4_bits_per_param(64, double_quant=True) - 4, 3) == 0.127


# ---------------------------------------------------------------- QLoRA layer


def qlayer(seed: int = 0, d_in: int = 64, d_out: int = 32, r: int = 4) -> tuple[dict, dict, dict, np.ndarray]:
    rng = np.random.default_rng(seed)
    base = {"W": rng.uniform(-0.1, 0.1, (d_out, d_in)), "b": rng.uniform(-0.1, 0.1, d_out)}  # host arrays
    lora = {"A": rng.standard_normal((r, d_in)), "B": rng.standard_normal((d_out, r))}
    return base, qlora.qlora_quantize(base), lora, rng.standard_normal((5, d_in))


def test_qlora_dense_is_lora_dense_on_the_dequantized_weight(backend: Any) -> None:
    base, q, lora, x = qlayer()
    W = nf4.nf4_dequantize(q["W"], dtype="float64")
    expected = ml.lora_dense({"W": W, "b": base["b"]}, lora, x, scale=0.5)
    got = qlora.qlora_dense({"W": q["W"], "b": backend.put(base["b"])}, backend.tree(lora), backend.put(x), scale=0.5)
    np.testing.assert_allclose(backend.get(got), expected, rtol=1e-12, atol=1e-12)
    assert np.abs(W - base["W"]).max() > 0  # the weight really is the quantized one


def test_qlora_gradient_equals_lora_gradient() -> None:
    base, q, lora, x = qlayer(1)
    y = np.random.default_rng(2).standard_normal((5, 32))
    frozen = {"W": nf4.nf4_dequantize(q["W"], dtype="float64"), "b": base["b"]}
    g_q = ml.grad(lambda l: ml.mse_loss(qlora.qlora_dense(q, l, x, scale=2.0), y))(lora)
    g_l = ml.grad(lambda l: ml.mse_loss(ml.lora_dense(frozen, l, x, scale=2.0), y))(lora)
    for k in ("A", "B"):
        np.testing.assert_allclose(g_q[k], g_l[k], rtol=1e-12, atol=1e-14)


def test_qlora_trains_with_fit() -> None:
    base, q, _, x = qlayer(3)
    rng = np.random.default_rng(4)
    target = ml.lora_dense(base, {"A": rng.standard_normal((2, 64)), "B": 0.1 * rng.standard_normal((32, 2))}, x)
    lora = ml.lora_init(rng, 64, 32, 4)
    lora, losses = ml.fit(lambda l, q, x, y: ml.mse_loss(qlora.qlora_dense(q, l, x), y), lora, (q, x, target),
                          steps=200, lr=1e-2)
    assert losses[-1] < 0.05 * losses[0]


def test_qlora_quantize_keeps_bias_and_refuses_1d() -> None:
    base, q, _, _ = qlayer()
    assert q["b"] is base["b"] and q["W"]["double_quant"] is True and q["W"]["shape"] == (32, 64)
    with pytest.raises(ShapeError, match="2-D"):
        qlora.qlora_quantize({"W": np.zeros(64)})


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(("blocksize", "error", "fragment"), [
    (0, MiniLoraValueError, "blocksize must be a positive integer; got 0"),
    (-64, MiniLoraValueError, "blocksize must be a positive integer; got -64"),
    (48, MiniLoraValueError, "blocksize must divide the number of values, 256; got 48"),
    (512, MiniLoraValueError, "blocksize must divide the number of values, 256; got 512"),
    (64.0, MiniLoraTypeError, "blocksize must be a positive integer"),
    (True, MiniLoraTypeError, "blocksize must be a positive integer"),
])
def test_bad_blocksize(blocksize: Any, error: type, fragment: str) -> None:
    with pytest.raises(error, match=fragment.replace("(", r"\(")):
        nf4.nf4_quantize(np.ones((4, 64), np.float32), blocksize=blocksize)


@pytest.mark.parametrize("blocksize", [0, -256])
def test_bad_8bit_blocksize(blocksize: int) -> None:
    with pytest.raises(MiniLoraValueError, match="blocksize must be a positive integer"):
        nf4.quantize_blockwise_8bit(np.ones(256, np.float32), blocksize=blocksize)


@pytest.mark.parametrize(("bad", "count", "first"), [
    ({(0, 5): np.nan}, 1, "(0, 5)"),
    ({(3, 1): np.inf, (1, 2): -np.inf}, 2, "(1, 2)"),
    ({(2, 0): np.nan, (2, 1): np.inf, (3, 63): np.nan}, 3, "(2, 0)"),
])
@pytest.mark.parametrize("double_quant", [False, True])
def test_non_finite_input_names_count_and_first_index(bad: dict, count: int, first: str, double_quant: bool) -> None:
    x = np.ones((4, 64), np.float32)
    for where, value in bad.items():
        x[where] = value
    with pytest.raises(MiniLoraValueError) as info:
        nf4.nf4_quantize(x, double_quant=double_quant)
    message = str(info.value)
    assert f"{count} non-finite value(s)" in message and f"at index {first}" in message and "of 256" in message


def test_non_finite_1d_input_names_a_plain_index() -> None:
    x = np.ones(128, np.float32)
    x[70] = np.inf
    with pytest.raises(MiniLoraValueError, match=r"1 non-finite value\(s\).* at index 70 \(inf\)"):
        nf4.quantize_blockwise_8bit(x)


@pytest.mark.parametrize(("x", "error", "fragment"), [
    (np.ones((2, 64), np.int32), MiniLoraTypeError, "real floating dtype"),
    (np.ones((0, 64), np.float32), MiniLoraValueError, "must not be empty"),
    ([1.0, 2.0], MiniLoraTypeError, "x must be an array"),
])
def test_bad_input_arrays(x: Any, error: type, fragment: str) -> None:
    with pytest.raises(error, match=fragment):
        nf4.nf4_quantize(x)


def test_bad_offset_refused() -> None:
    with pytest.raises(MiniLoraValueError, match="offset must be finite"):
        nf4.nf4_quantize(np.ones((2, 64), np.float32), double_quant=True, offset=float("nan"))
    with pytest.raises(MiniLoraValueError, match="pass double_quant=True"):
        nf4.nf4_quantize(np.ones((2, 64), np.float32), offset=0.5)


@pytest.mark.parametrize(("mutate", "error", "fragment"), [
    (lambda s: s.pop("packed"), MiniLoraValueError, "'packed'"),
    (lambda s: s.update(packed=s["packed"][:-1]), ShapeError, "packed must have shape"),
    (lambda s: s.update(absmax=s["absmax"][:-1]), ShapeError, "n / blocksize = 2"),
    (lambda s: s.update(blocksize=48), MiniLoraValueError, "must divide"),
    (lambda s: s.update(double_quant=True), MiniLoraValueError, "'absmax_q'"),
])
def test_bad_state(mutate: Any, error: type, fragment: str) -> None:
    state = nf4.nf4_quantize(np.ones((2, 64), np.float32))
    mutate(state)
    with pytest.raises(error, match=fragment):
        nf4.nf4_dequantize(state)


@pytest.mark.parametrize(("state", "kind"), [(None, MiniLoraTypeError), ({"absmax": 1}, MiniLoraValueError)])
def test_nf4_nbytes_refuses_what_is_not_a_state(state: Any, kind: type) -> None:
    with pytest.raises(kind, match="state"):  # was AttributeError / KeyError 'packed'
        nf4.nf4_nbytes(state)
