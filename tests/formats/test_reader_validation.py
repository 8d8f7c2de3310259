"""The streaming reader (``read_header_streaming`` + ``read_tensor``, used by ``minilora
merge``) refuses exactly what the whole-file reader (``load``) refuses, with the same message:
both go through one header validation (``_validate``) and one value check (``_check_values``)."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from minilora.formats import safetensors as st
from minilora.formats.safetensors import SafetensorsError, load, read_header_streaming, read_tensor, save
from minilora.peft.files import save_peft_adapter
from minilora.peft.merge import merge_adapter_file


def _file(header: dict, data: bytes = b"", raw: str | None = None) -> bytes:
    text = (raw if raw is not None else json.dumps(header)).encode("utf-8")
    return struct.pack("<Q", len(text)) + text + data


def _u8(shape: list, begin: int = 0, end: int = 0) -> dict:
    return {"dtype": "U8", "shape": shape, "data_offsets": [begin, end]}


# (file bytes, what the message must say)
BAD = [
    (_file({"a": _u8([1] * 65, 0, 1)}, b"\x00"), "65 dimensions; at most 64"),
    (_file({"a": _u8([0, 10**30])}), "too large for an array"),
    (_file({"a": _u8([2**62, 0, 4])}), "too large for an array"),
    (_file({}, raw='{"a\\ud800": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}') + b"\x00",
     "lone surrogate"),
    (_file({}, raw='{"__metadata__": {"k": "\\udc80"}}'), "lone surrogate"),
    (_file({}, raw='{"__metadata__": {"\\ud800": "v"}}'), "lone surrogate"),
    (_file({"a": {"dtype": "BOOL", "shape": [3], "data_offsets": [0, 3]}}, b"\x00\x01\x02"),
     "BOOL holds bytes other than 0 and 1"),
    (_file({"a": _u8([2], 0, 2)}, b"\x00"), "ends at byte 2 of the data but the data has 1"),
    (_file({"a": _u8([1], 0, 1)}, b"\x00\x00"), "1 trailing bytes"),
    (_file({"a": _u8([1], 1, 2)}, b"\x00\x00"), "leaves bytes 0..1 unowned"),
    (_file({"a": _u8([2], 0, 2), "b": _u8([1], 1, 2)}, b"\x00\x00"), "overlaps the previous tensor"),
    (b"\x01\x00", "truncated: 2 bytes"),
    (struct.pack("<Q", 2**63) + b"{}", "exceeds the 100000000-byte limit"),
]


def _stream(path: Path) -> dict[str, np.ndarray]:
    with open(path, "rb") as fh:
        entries, _, start = read_header_streaming(fh, str(path))
        return {name: read_tensor(fh, start, entry, name, str(path)) for name, entry in entries.items()}


@pytest.mark.parametrize(("data", "reason"), BAD, ids=[r for _, r in BAD])
def test_both_readers_refuse_with_the_same_message(tmp_path: Path, data: bytes, reason: str) -> None:
    path = tmp_path / "w.safetensors"
    path.write_bytes(data)
    with pytest.raises(SafetensorsError) as whole:
        load(path)
    with pytest.raises(SafetensorsError) as streamed:
        _stream(path)
    assert reason in str(whole.value) and str(path) in str(whole.value), str(whole.value)
    assert str(streamed.value) == str(whole.value)


def test_both_readers_accept_the_same_file(tmp_path: Path) -> None:
    tensors: dict[str, Any] = {"b": np.array([True, False]), "e": np.zeros((0, 3), np.float32),
                               "w": np.arange(6, dtype=np.float64).reshape(2, 3), "é名": np.ones(1, np.int8)}
    path = save(tensors, tmp_path / "w.safetensors", metadata={"k": "√"})
    whole, streamed = load(path), _stream(Path(path))
    assert sorted(whole) == sorted(streamed) == sorted(tensors)
    for name, value in tensors.items():
        np.testing.assert_array_equal(whole[name], value)
        np.testing.assert_array_equal(streamed[name], value)


def test_merge_refuses_a_bool_byte_and_writes_no_out(tmp_path: Path) -> None:
    """A BOOL byte of 2 was copied into OUT, which ``load`` then refused; now merge refuses it."""
    rng = np.random.default_rng(0)
    adapter = save_peft_adapter(tmp_path / "ad", {"fc": {"A": rng.standard_normal((2, 4)),
                                                          "B": rng.standard_normal((3, 2))}}, r=2, lora_alpha=4)
    base = tmp_path / "base.safetensors"
    save({"fc.weight": rng.standard_normal((3, 4)), "mask": np.array([True, False, True])}, base)
    data = bytearray(base.read_bytes())
    data[-1] = 2  # the last byte is the last BOOL of "mask" (sorted after "fc.weight")
    base.write_bytes(bytes(data))
    out = tmp_path / "out.safetensors"
    with pytest.raises(SafetensorsError, match="'mask' of BOOL holds bytes other than 0 and 1") as info:
        merge_adapter_file(base, adapter, out)
    assert str(base) in str(info.value)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["ad", "base.safetensors"]


@pytest.mark.parametrize("data", ["text", None, 3, [1, 2]])
def test_load_bytes_refuses_what_is_not_bytes(data: object) -> None:
    """A str was 'string argument without an encoding', -1 'negative count'."""
    with pytest.raises(st.SafetensorsError, match="data must be bytes"):
        st.load_bytes(data)  # type: ignore[arg-type]


@pytest.mark.parametrize("bits", [-1, [70000], np.array([1.5]), "x"])
def test_bf16_bits_must_be_uint16_values(bits: object) -> None:
    with pytest.raises(st.SafetensorsError, match="bfloat16 bit patterns"):
        st.bf16_bits_to_float32(bits)


def test_bf16_bits_from_other_integer_arrays_in_range_still_convert() -> None:
    assert np.array_equal(st.bf16_bits_to_float32(np.array([0x3F80, 0], np.int64)), np.array([1.0, 0.0], np.float32))
