"""minilora.safetensors_io: round trips of every dtype (NaN payloads included), agreement with the
reference ``safetensors`` package in both directions, strict refusal of malformed files with
SafetensorsError naming the file, and fuzzing: any bytes either load or raise that error."""

from __future__ import annotations

import json
import os
import struct
from typing import Any

import numpy as np
import pytest
from helpers import require
from hypothesis import given
from hypothesis import strategies as st

import minilora as ml
from minilora.formats.safetensors import (
    DTYPES,
    SafetensorsError,
    bf16_bits_to_float32,
    float_to_bf16_bits,
    load,
    load_bytes,
    read_header,
    save,
    save_bytes,
)

NUMPY_DTYPES = ["float64", "float32", "float16", "int64", "int32", "int16", "int8", "uint64", "uint32", "uint16",
                "uint8", "bool"]


def sample_tensors(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for i, dt in enumerate(NUMPY_DTYPES):
        shape = [(2, 3), (4,), (), (0, 5), (1, 1, 2)][i % 5]
        if dt == "bool":
            out[dt] = np.asarray(rng.random(shape) > 0.5)
        elif dt.startswith(("int", "uint")):
            info = np.iinfo(dt)
            out[dt] = rng.integers(info.min, info.max, size=shape, dtype=dt, endpoint=True)
        else:
            out[dt] = np.asarray(rng.standard_normal(shape) * 100).astype(dt)
    return out


def bits(a: np.ndarray) -> np.ndarray:
    return a.view(f"u{a.dtype.itemsize}") if a.dtype.kind == "f" else a


def assert_same(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        np.testing.assert_array_equal(bits(a[k]), bits(b[k]))


# --------------------------------------------------------------------------- round trips


def test_every_dtype_round_trips(tmp_path: Any) -> None:
    tensors = sample_tensors()
    path = tmp_path / "t.safetensors"
    save(tensors, path, {"who": "minilora", "ünïcode": "ok"})
    assert_same(load(path), tensors)
    entries, metadata = read_header(path)
    assert metadata == {"who": "minilora", "ünïcode": "ok"}
    assert {k: v["dtype"] for k, v in entries.items()} == {
        "float64": "F64", "float32": "F32", "float16": "F16", "int64": "I64", "int32": "I32", "int16": "I16",
        "int8": "I8", "uint64": "U64", "uint32": "U32", "uint16": "U16", "uint8": "U8", "bool": "BOOL"}


def test_layout_is_the_documented_one() -> None:
    data = save_bytes({"b": np.array([1.0, 2.0], "<f4"), "a": np.array([7], "<i8")})
    (n,) = struct.unpack("<Q", data[:8])
    assert n % 8 == 0  # padded with spaces: tensors start 8-byte aligned
    header = json.loads(data[8 : 8 + n])
    assert header == {"a": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]},
                      "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}
    assert data[8 + n :] == struct.pack("<q", 7) + struct.pack("<2f", 1.0, 2.0)


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16"])
def test_non_finite_values_keep_their_bits(dtype: str) -> None:
    width = np.dtype(dtype).itemsize * 8
    u = f"uint{width}"
    quiet_nan_payload = {"float64": 0x7FF8_0000_0000_1234, "float32": 0x7FC0_1234, "float16": 0x7E12}[dtype]
    signalling_neg = {"float64": 0xFFF0_0000_0000_0001, "float32": 0xFF80_0001, "float16": 0xFC01}[dtype]
    raw = np.array([quiet_nan_payload, signalling_neg], dtype=u).view(dtype)
    values = np.concatenate([raw, np.array([np.inf, -np.inf, -0.0, np.finfo(dtype).smallest_subnormal], dtype)])
    back = load_bytes(save_bytes({"v": values}))["v"]
    np.testing.assert_array_equal(back.view(u), values.view(u))


def test_big_endian_input_is_written_little_endian() -> None:
    a = np.arange(5, dtype=">f8") / 3
    back = load_bytes(save_bytes({"a": a}))["a"]
    assert back.dtype == np.dtype("float64") and back.dtype.isnative
    np.testing.assert_array_equal(back, a)


def test_loaded_arrays_are_new_and_writable() -> None:
    data = save_bytes({"a": np.zeros(3)})
    a = load_bytes(data)["a"]
    a[0] = 1.0  # not a read-only view of the bytes
    assert load_bytes(data)["a"][0] == 0.0


# --------------------------------------------------------------------------- bfloat16


def test_bf16_is_written_from_floats_and_read_back_as_float32() -> None:
    values = np.array([1.0, -2.5, 1 / 3, np.inf, np.nan, 0.0, -0.0, 1e30], dtype=np.float64)
    data = save_bytes({"w": values}, dtypes={"w": "BF16"})
    header = json.loads(data[8 : 8 + struct.unpack("<Q", data[:8])[0]])
    assert header["w"]["dtype"] == "BF16" and header["w"]["data_offsets"] == [0, 16]
    as_float = load_bytes(data)["w"]
    assert as_float.dtype == np.float32
    as_bits = load_bytes(data, bf16="bits")["w"]
    assert as_bits.dtype == np.uint16
    np.testing.assert_array_equal(as_bits, float_to_bf16_bits(values))
    np.testing.assert_array_equal(as_float, bf16_bits_to_float32(as_bits))
    np.testing.assert_array_equal(as_float[[0, 1, 3, 5, 6]], values[[0, 1, 3, 5, 6]].astype(np.float32))
    assert np.isnan(as_float[4]) and as_float[2] == np.float32(0.333984375)
    # raw bit patterns go through unchanged, NaN payloads included
    raw = np.array([0x7FC1, 0xFF81, 0x3F80], dtype=np.uint16)
    np.testing.assert_array_equal(load_bytes(save_bytes({"r": raw}, dtypes={"r": "BF16"}), bf16="bits")["r"], raw)


@pytest.mark.compare
def test_bf16_agrees_with_torch() -> None:
    torch = require("torch")
    values = np.random.default_rng(1).standard_normal(500) * 10.0 ** np.random.default_rng(2).uniform(-40, 38, 500)
    expected = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(float_to_bf16_bits(values), expected)


def test_bad_save_arguments() -> None:
    with pytest.raises(SafetensorsError, match="'x': dtype complex128 has no safetensors equivalent"):
        save_bytes({"x": np.zeros(2, complex)})
    with pytest.raises(SafetensorsError, match="BF16 needs a float or uint16 array"):
        save_bytes({"x": np.zeros(2, np.int32)}, dtypes={"x": "BF16"})
    with pytest.raises(SafetensorsError, match="not given"):
        save_bytes({"x": np.zeros(2)}, dtypes={"y": "BF16"})
    with pytest.raises(SafetensorsError, match="cannot be written as F32"):
        save_bytes({"x": np.zeros(2)}, dtypes={"x": "F32"})
    with pytest.raises(SafetensorsError, match="metadata must map str to str"):
        save_bytes({}, {"n": 1})  # type: ignore[dict-item]
    with pytest.raises(SafetensorsError, match="__metadata__"):
        save_bytes({"__metadata__": np.zeros(1)})


# --------------------------------------------------------------------------- the reference package


def test_files_we_write_load_in_the_safetensors_package(tmp_path: Any) -> None:
    st_numpy = require("safetensors.numpy")
    tensors = sample_tensors(3)
    path = tmp_path / "ours.safetensors"
    save(tensors, path, {"format": "np"})
    theirs = st_numpy.load_file(str(path))
    for k, v in tensors.items():
        np.testing.assert_array_equal(bits(np.asarray(theirs[k]).reshape(v.shape)), bits(v))
    safetensors = require("safetensors")
    with safetensors.safe_open(str(path), framework="np") as fh:
        assert fh.metadata() == {"format": "np"}


def test_files_the_safetensors_package_writes_load_here(tmp_path: Any) -> None:
    st_numpy = require("safetensors.numpy")
    tensors = sample_tensors(4)
    path = tmp_path / "theirs.safetensors"
    st_numpy.save_file(tensors, str(path), metadata={"a": "b"})
    assert_same(load(path), tensors)
    assert read_header(path)[1] == {"a": "b"}


@pytest.mark.compare
def test_bf16_files_from_torch_load_here(tmp_path: Any) -> None:
    torch = require("torch")
    st_torch = require("safetensors.torch")
    t = torch.tensor([1.0, -3.5, 0.1, float("nan")], dtype=torch.bfloat16)
    path = tmp_path / "bf16.safetensors"
    st_torch.save_file({"t": t}, str(path))
    got = load(path)["t"]
    np.testing.assert_array_equal(got[:3], t[:3].float().numpy())
    assert np.isnan(got[3])
    back = st_torch.load(save_bytes({"t": got}, dtypes={"t": "BF16"}))["t"]
    assert back.dtype == torch.bfloat16 and torch.equal(back[:3], t[:3])


# --------------------------------------------------------------------------- malformed input


def header_file(header: Any, data: bytes = b"", *, raw: bytes | None = None, length: int | None = None) -> bytes:
    text = raw if raw is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + data


GOOD = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
EIGHT = b"\x00" * 8

MALFORMED = [
    (b"", "truncated: 0 bytes"),
    (b"\x01\x00", "truncated: 2 bytes"),
    (header_file(GOOD, EIGHT, length=10_000), "truncated: the header claims 10000 bytes"),
    (header_file(GOOD, EIGHT, length=2**63), "exceeds the 100000000-byte limit"),
    (header_file(None, raw=b"[1, 2]"), "must be a JSON object starting with"),
    (header_file(None, raw=b"{not json}"), "not valid UTF-8 JSON"),
    (header_file(None, raw=b"{\"a\": \xff}"), "not valid UTF-8 JSON"),
    (header_file(None, raw=b'{"a": 1, "a": 2}'), "duplicate key"),
    (header_file(None, raw=b'{"a": NaN}'), "not valid UTF-8 JSON"),
    (header_file({"a": {"dtype": "F32", "shape": [2]}}, EIGHT), "expected the keys dtype, shape, data_offsets"),
    (header_file({"a": [1, 2]}, EIGHT), "expected the keys dtype, shape, data_offsets"),
    (header_file({"a": {"dtype": "F8", "shape": [2], "data_offsets": [0, 8]}}, EIGHT), "unknown dtype 'F8'"),
    (header_file({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, EIGHT), "non-negative integers"),
    (header_file({"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, EIGHT), "non-negative integers"),
    (header_file({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0]}}, EIGHT), "must be [begin, end]"),
    (header_file({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, EIGHT), "needs 12 bytes"),
    (header_file({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, EIGHT), "needs 8 bytes"),
    (header_file(GOOD, b"\x00" * 4), "truncated: tensor 'a' ends at byte 8 of the data but the data has 4"),
    (header_file(GOOD, b"\x00" * 12), "4 trailing bytes after the last tensor"),
    (header_file({"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\x00" * 12),
     "leaves bytes 0..4 unowned"),
    (header_file({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                  "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, EIGHT), "overlaps"),
    (header_file({"__metadata__": {"k": 1}}), "__metadata__ must map strings to strings"),
    (header_file({"a": {"dtype": "BOOL", "shape": [2], "data_offsets": [0, 2]}}, b"\x01\x07"),
     "BOOL holds bytes other than 0 and 1"),
    (header_file({"a": {"dtype": "U8", "shape": [1] * 70, "data_offsets": [0, 1]}}, b"\x00"), "at most 64 are supported"),
]


@pytest.mark.parametrize(("data", "message"), MALFORMED, ids=[m for _, m in MALFORMED])
def test_malformed_input_is_refused_with_a_clear_error(data: bytes, message: str) -> None:
    with pytest.raises(SafetensorsError) as info:
        load_bytes(data, name="weights.safetensors")
    text = str(info.value)
    assert text.startswith("weights.safetensors: ") and message in text, text
    assert "\n" not in text
    assert isinstance(info.value, ml.MiniLoraValueError)  # part of the library's error family


def test_the_minimal_files_are_accepted() -> None:
    assert load_bytes(header_file({})) == {}
    assert load_bytes(header_file({}, raw=b"{}      ")) == {}  # space padding after the JSON
    empty = load_bytes(header_file({"e": {"dtype": "F64", "shape": [0, 3], "data_offsets": [0, 0]}}))
    assert empty["e"].shape == (0, 3)


def test_file_errors_name_the_file(tmp_path: Any) -> None:
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(SafetensorsError, match=f"{missing}: file not found"):
        load(missing)
    path = tmp_path / "cut.safetensors"
    path.write_bytes(save_bytes({"w": np.ones((4, 4))})[:-3])
    with pytest.raises(SafetensorsError, match=f"{path}: truncated"):
        load(path)
    with pytest.raises(SafetensorsError, match=f"{tmp_path}: cannot read"):
        load(tmp_path)


def test_save_is_atomic(tmp_path: Any) -> None:
    path = tmp_path / "w.safetensors"
    save({"w": np.ones(3)}, path)
    before = path.read_bytes()
    with pytest.raises(SafetensorsError):
        save({"w": np.zeros(3, complex)}, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["w.safetensors"]


# --------------------------------------------------------------------------- fuzzing

VALID = save_bytes({"x": np.arange(6.0).reshape(2, 3), "m": np.array([True, False]), "i": np.arange(3, dtype=np.int32)},
                   {"k": "v"})


def load_or_refuse(data: bytes) -> None:
    try:
        out = load_bytes(data, name="fuzz")
    except SafetensorsError as exc:
        assert str(exc).startswith("fuzz: ")
        return
    for name, a in out.items():
        assert isinstance(name, str) and isinstance(a, np.ndarray)


@given(st.binary(max_size=300))
def test_fuzz_random_bytes(data: bytes) -> None:
    load_or_refuse(data)


@given(st.binary(max_size=200), st.integers(0, 400))
def test_fuzz_bytes_behind_a_plausible_length(tail: bytes, n: int) -> None:
    load_or_refuse(struct.pack("<Q", n) + b"{" + tail)


@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), min_size=1, max_size=6),
       st.integers(0, len(VALID)))
def test_fuzz_mutations_of_a_valid_file(edits: list, cut: int) -> None:
    data = bytearray(VALID)
    for position, value in edits:
        data[position] = value
    load_or_refuse(bytes(data[:cut]))
    load_or_refuse(bytes(data))


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                    max_leaves=12),
       st.binary(max_size=64))
def test_fuzz_any_json_header(header: Any, data: bytes) -> None:
    text = json.dumps(header).encode()
    load_or_refuse(struct.pack("<Q", len(text)) + text + data)


def test_dtype_table_matches_the_format() -> None:
    assert {k: v.itemsize for k, v in DTYPES.items()} == {
        "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
        "U16": 2, "U8": 1, "BOOL": 1}
