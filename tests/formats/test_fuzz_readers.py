"""Fuzzing both safetensors readers with mutated files: whatever the bytes, ``load`` and the
streaming reader (``read_header_streaming`` + ``read_tensor``) either both give the same
tensors or both raise the same ``SafetensorsError``; nothing else escapes and nothing hangs
(a per-example deadline)."""

from __future__ import annotations

import json
import os
import struct
import tempfile

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from minilora.formats.safetensors import SafetensorsError, load, read_header_streaming, read_tensor, save_bytes

VALID = save_bytes({"a": np.arange(6, dtype=np.float32).reshape(2, 3), "m": np.array([True, False]),
                    "h": np.ones(2, np.float16)}, metadata={"k": "v"}, dtypes={"h": "BF16"})
HEADER_LEN = struct.unpack("<Q", VALID[:8])[0]
JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats()
                           | st.text(max_size=4), lambda c: st.lists(c, max_size=3)
                           | st.dictionaries(st.text(max_size=3), c, max_size=3), max_leaves=6)


def _both(data: bytes) -> tuple[object, object]:
    """(outcome of load, outcome of the streaming reader): a dict of arrays or the error text."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "w.safetensors")
        with open(path, "wb") as fh:
            fh.write(data)
        outcomes: list[object] = []
        try:
            outcomes.append(load(path, bf16="bits"))
        except SafetensorsError as exc:
            outcomes.append(str(exc))
        try:
            with open(path, "rb") as fh:
                entries, _, start = read_header_streaming(fh, path)
                outcomes.append({n: read_tensor(fh, start, e, n, path) for n, e in entries.items()})
        except SafetensorsError as exc:
            outcomes.append(str(exc))
    return outcomes[0], outcomes[1]


def _agree(data: bytes) -> None:
    whole, streamed = _both(data)
    if isinstance(whole, str) or isinstance(streamed, str):
        assert whole == streamed
        return
    assert isinstance(whole, dict) and isinstance(streamed, dict) and sorted(whole) == sorted(streamed)
    for name in whole:
        np.testing.assert_array_equal(whole[name], streamed[name])


@settings(max_examples=60, deadline=1000)
@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), min_size=1, max_size=6),
       st.integers(-8, 8))
def test_mutated_bytes(edits: list[tuple[int, int]], resize: int) -> None:
    data = bytearray(VALID)
    for position, value in edits:
        data[position] = value
    data = data[:len(data) + resize] if resize < 0 else data + bytes(resize)
    _agree(bytes(data))


@settings(max_examples=60, deadline=1000)
@given(st.sampled_from(["a", "m", "h", "__metadata__"]), st.sampled_from(["dtype", "shape", "data_offsets", None]),
       JSON_VALUES)
def test_mutated_headers(name: str, key: str | None, value: object) -> None:
    header = json.loads(VALID[8:8 + HEADER_LEN])
    if key is None or name == "__metadata__":
        header[name] = value
    else:
        header[name][key] = value
    text = json.dumps(header).encode()
    _agree(struct.pack("<Q", len(text)) + text + VALID[8 + HEADER_LEN:])
