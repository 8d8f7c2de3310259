"""adapter_config.json validated as data (``minilora.peft.config``): a value of the wrong JSON
type or out of range is refused before use, with a PeftFileError naming the file, the field and
the value; nothing is silently reinterpreted ("false" is not false, "8" is not 8)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from minilora.errors import MiniLoraValueError
from minilora.peft.config import PeftFileError, check_config
from minilora.peft.files import load_peft_adapter, save_peft_adapter


def _adapter(folder: Path) -> Path:
    rng = np.random.default_rng(0)
    save_peft_adapter(folder, {"layers.0.fc": {"A": rng.standard_normal((2, 4)), "B": rng.standard_normal((3, 2))}},
                      r=2, lora_alpha=4)
    return folder / "adapter_config.json"


def _with(folder: Path, field: str, raw: str) -> Path:
    """The adapter's config with ``field`` set to the JSON text ``raw`` (so that Infinity,
    1e400 and escapes reach the parser as they would from a file)."""
    path = _adapter(folder)
    config = json.loads(path.read_text())
    config.pop(field, None)
    text = json.dumps(config)
    path.write_text(text[:-1] + f', "{field}": {raw}}}')
    return path


BAD = [
    ("use_rslora", '"false"'), ("use_rslora", "1"), ("use_rslora", "null"), ("use_dora", '"no"'),
    ("fan_in_fan_out", '"no"'), ("fan_in_fan_out", "0"), ("lora_bias", '"false"'), ("inference_mode", '"true"'),
    ("r", '"2"'), ("r", "2.0"), ("r", "true"), ("r", "0"), ("r", "-2"), ("r", "null"), ("r", "1e400"),
    ("lora_alpha", '"4"'), ("lora_alpha", "0"), ("lora_alpha", "-4"), ("lora_alpha", "true"),
    ("lora_alpha", "Infinity"), ("lora_alpha", "NaN"), ("lora_alpha", "1e400"), ("lora_alpha", "[4]"),
    ("alpha_pattern", '{"fc": "8"}'), ("alpha_pattern", '{"fc": -4}'), ("alpha_pattern", '{"fc": 0}'),
    ("alpha_pattern", '{"fc": true}'), ("alpha_pattern", '{"fc": Infinity}'), ("alpha_pattern", '{"fc": 1e400}'),
    ("alpha_pattern", '{"fc": null}'), ("alpha_pattern", '{"fc": [8]}'), ("alpha_pattern", '{"fc": {"a": 1}}'),
    ("alpha_pattern", '{"fc": NaN}'), ("alpha_pattern", "[1]"), ("alpha_pattern", '"fc"'),
    ("rank_pattern", '{"fc": "2"}'), ("rank_pattern", '{"fc": 2.0}'), ("rank_pattern", '{"fc": true}'),
    ("rank_pattern", '{"fc": 0}'), ("rank_pattern", '{"fc": null}'), ("rank_pattern", '{"fc": 1e400}'),
    ("rank_pattern", '{"(": 2}'), ("rank_pattern", '{"(a)\\\\1": 2}'), ("rank_pattern", '{"a++": 2}'),
    ("alpha_pattern", '{"[z-a]": 2}'),
    ("bias", '["none"]'), ("bias", '"some"'), ("bias", "null"),
    ("target_modules", "3"), ("target_modules", "[1]"), ("target_modules", '"("'), ("exclude_modules", "{}"),
    ("base_model_name_or_path", "3"), ("base_model_name_or_path", '"\\ud800"'),
    ("use_qalora", "0"), ("use_qalora", '"false"'), ("modules_to_save", '["lm_head"]'),
    ("peft_type", '"lora"'), ("peft_type", "null"),
    ("lora_dropout", '"0.1"'), ("lora_dropout", "2"), ("lora_dropout", "-0.1"), ("lora_dropout", "null"),
    ("lora_dropout", "NaN"), ("lora_dropout", "true"),
]


@pytest.mark.parametrize(("field", "raw"), BAD)
def test_a_bad_field_is_refused_naming_file_field_and_value(tmp_path: Path, field: str, raw: str) -> None:
    path = _with(tmp_path, field, raw)
    with pytest.raises(PeftFileError) as info:
        load_peft_adapter(tmp_path)
    message = str(info.value)
    assert str(path) in message and field in message, message
    if field in ("rank_pattern", "alpha_pattern") and raw.startswith("{"):
        assert next(iter(json.loads(raw))) in message.replace("\\\\", "\\"), message


def test_a_lone_surrogate_in_a_pattern_key_names_its_field(tmp_path: Path) -> None:
    _with(tmp_path, "rank_pattern", '{"fc\\udc80": 2}')
    with pytest.raises(PeftFileError, match="'rank_pattern'.*lone surrogate"):
        load_peft_adapter(tmp_path)


def test_deeply_nested_json_is_a_corrupt_file(tmp_path: Path) -> None:
    path = _with(tmp_path, "notes", "[" * 100_000 + "]" * 100_000)
    with pytest.raises(PeftFileError, match="corrupt JSON") as info:
        load_peft_adapter(tmp_path)
    assert str(path) in str(info.value)


def test_nesting_the_parser_allows_is_checked_without_recursion(tmp_path: Path) -> None:
    _with(tmp_path, "notes", "[" * 900 + '"\\ud800"' + "]" * 900)
    with pytest.raises(PeftFileError, match="'notes'.*lone surrogate"):
        load_peft_adapter(tmp_path)


def test_valid_values_are_used_as_given(tmp_path: Path) -> None:
    path = _adapter(tmp_path)
    config = json.loads(path.read_text())
    config.update(alpha_pattern={r"layers\.0\..*": 8.5}, use_rslora=True, rank_pattern={"fc": 2}, notes=[{"a": 1}],
                  target_modules=r".*\.fc", modules_to_save=None, use_qalora=False)
    path.write_text(json.dumps(config))
    adapter = load_peft_adapter(tmp_path)
    assert adapter.alpha("layers.0.fc") == 8.5
    assert adapter.scale("layers.0.fc") == 8.5 / math.sqrt(2)


@pytest.mark.parametrize("kwargs", [{"use_rslora": "false"}, {"fan_in_fan_out": "no"}, {"lora_alpha": "8"},
                                    {"rank_pattern": {"fc": "2"}}])
def test_writing_refuses_the_same_values(tmp_path: Path, kwargs: dict[str, Any]) -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(PeftFileError, match=next(iter(kwargs))):
        save_peft_adapter(tmp_path, {"fc": {"A": rng.standard_normal((2, 4)), "B": rng.standard_normal((3, 2))}},
                          r=2, **{"lora_alpha": 4, **kwargs})
    assert not (tmp_path / "adapter_config.json").exists()


def test_check_config_is_a_library_error_for_non_objects() -> None:
    with pytest.raises(PeftFileError, match="cfg.json: expected a JSON object, got list"):
        check_config([1], "cfg.json")
    assert issubclass(PeftFileError, MiniLoraValueError)


def test_a_crafted_pattern_key_does_not_hang_inspect(tmp_path: Path) -> None:
    """``{"(a+)+": 2}`` against a module "aaa...a!" took time doubling per character in ``re``."""
    import contextlib
    import io
    import time

    from minilora.cli.main import main

    rng = np.random.default_rng(0)
    name = "a" * 40 + "!"
    save_peft_adapter(tmp_path, {name: {"A": rng.standard_normal((2, 4)), "B": rng.standard_normal((3, 2))}},
                      r=2, lora_alpha=4, rank_pattern={"(a+)+": 3}, alpha_pattern={"(a+)+": 5})
    t = time.perf_counter()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["inspect", str(tmp_path)]) == 0
    assert time.perf_counter() - t < 2.0
    assert load_peft_adapter(tmp_path).alpha(name) == 4  # the key does not match (the "!"), as in re


@pytest.mark.parametrize("field", ["r", "lora_alpha", "use_rslora", "target_modules"])
def test_a_field_given_twice_is_refused_not_read_as_the_last(tmp_path: Path, field: str) -> None:
    path = _adapter(tmp_path)
    text = path.read_text().rstrip().rstrip("}")
    path.write_text(text + f', "{field}": {json.dumps(json.loads(path.read_text())[field])}}}')
    with pytest.raises(PeftFileError) as info:
        load_peft_adapter(tmp_path)
    assert str(path) in str(info.value) and f"{field!r} appears twice" in str(info.value), info.value
