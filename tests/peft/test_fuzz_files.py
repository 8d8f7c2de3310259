"""Fuzzing the adapter loader and the ``inspect``/``merge`` commands with mutated
adapter_config.json and adapter_model.safetensors files: only the library's errors escape
``load_peft_adapter`` and ``describe``; the commands (``minilora.cli.main.main`` in-process)
return 0, or 1 with one line on stderr; nothing hangs (a per-example deadline)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minilora.cli.main import main
from minilora.errors import MiniLoraError
from minilora.formats import safetensors as sft
from minilora.peft.files import load_peft_adapter, save_peft_adapter
from minilora.peft.inspect import describe

FIELDS = ["r", "lora_alpha", "use_rslora", "use_dora", "fan_in_fan_out", "bias", "lora_bias", "rank_pattern",
          "alpha_pattern", "target_modules", "exclude_modules", "peft_type", "base_model_name_or_path",
          "use_qalora", "modules_to_save", "inference_mode", "other"]
KEYS = st.sampled_from(["fc", r"layers\.0\..*", "(a+)+", "(.*)*$", "(", r"(a)\1", "a)|(b", "\ud800", "(?i)fc",
                        "(?=x)", "[^.]+", "a{0,5000}"]) | st.text(alphabet="ab.*+?()[]|\\", max_size=6)
SCALARS = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=4)
           | st.sampled_from(["false", "true", "8", "none", "all", "LORA"]))
VALUES = st.recursive(SCALARS | st.dictionaries(KEYS, SCALARS, max_size=3),
                      lambda c: st.lists(c, max_size=3) | st.dictionaries(KEYS, c, max_size=3), max_leaves=6)
RAW = st.sampled_from(["1e400", "-1e400", "NaN", "Infinity", '"\\ud800"', "[" * 3000 + "]" * 3000, '{"fc": 1e400}'])


@contextlib.contextmanager
def _adapter() -> Iterator[tuple[str, str, str]]:
    """A fresh (adapter folder, base file, output path) in a temporary folder."""
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as root:
        folder = os.path.join(root, "ad")
        modules = {"layers.0.fc": {"A": rng.standard_normal((2, 4)), "B": rng.standard_normal((3, 2))},
                   "layers.0.emb": {"A": rng.standard_normal((2, 5)), "B": rng.standard_normal((4, 2))}}
        save_peft_adapter(folder, modules, kinds={"layers.0.emb": "embedding"}, r=2, lora_alpha=4,
                          rank_pattern={"fc": 2}, alpha_pattern={r"layers\.0\..*": 8})
        base = os.path.join(root, "base.safetensors")
        sft.save({"layers.0.fc.weight": rng.standard_normal((3, 4)).astype(np.float32),
                  "layers.0.emb.weight": rng.standard_normal((5, 4)).astype(np.float32),
                  "mask": np.array([True, False])}, base)
        yield folder, base, os.path.join(root, "out.safetensors")


def _set_field(folder: str, field: str, raw: str) -> None:
    path = os.path.join(folder, "adapter_config.json")
    with open(path) as fh:
        config = json.load(fh)
    config.pop(field, None)
    text = json.dumps(config)
    with open(path, "w") as fh:
        fh.write(text[:-1] + f', "{field}": {raw}}}')


def _mutate(path: str, edits: list[tuple[int, int]], resize: int) -> None:
    with open(path, "rb") as fh:
        data = bytearray(fh.read())
    for position, value in edits:
        data[position % len(data)] = value
    data = data[:max(len(data) + resize, 0)] if resize < 0 else data + bytes(resize)
    with open(path, "wb") as fh:
        fh.write(bytes(data))


def _check(folder: str, base: str, out: str) -> None:
    try:
        describe(load_peft_adapter(folder))
    except MiniLoraError:
        pass
    for argv in (["inspect", folder], ["inspect", "--json", folder], ["merge", base, folder, out]):
        err = io.StringIO()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            rc = main(argv)
        assert rc in (0, 1), (argv, rc)
        if rc:
            lines = err.getvalue().splitlines()
            assert len(lines) == 1 and lines[0].startswith("minilora: error: "), err.getvalue()


pytestmark = pytest.mark.slow  # about 5 s in all: each example writes and reads a folder three times
EDITS = st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=5)


@settings(max_examples=40, deadline=3000)
@given(st.sampled_from(FIELDS), VALUES.map(lambda v: json.dumps(v)) | RAW)
def test_mutated_config_fields(field: str, raw: str) -> None:
    with _adapter() as (folder, base, out):
        _set_field(folder, field, raw)
        _check(folder, base, out)


@settings(max_examples=30, deadline=3000)
@given(EDITS, st.integers(-16, 16))
def test_mutated_config_bytes(edits: list[tuple[int, int]], resize: int) -> None:
    with _adapter() as (folder, base, out):
        _mutate(os.path.join(folder, "adapter_config.json"), edits, resize)
        _check(folder, base, out)


@settings(max_examples=30, deadline=3000)
@given(EDITS, st.integers(-16, 16), st.booleans())
def test_mutated_safetensors(edits: list[tuple[int, int]], resize: int, weights: bool) -> None:
    with _adapter() as (folder, base, out):
        _mutate(os.path.join(folder, "adapter_model.safetensors") if weights else base, edits, resize)
        _check(folder, base, out)
