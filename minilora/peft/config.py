"""adapter_config.json validated as data: every field of PEFT's ``LoraConfig`` (PEFT 0.21
``tuners/lora/config.py``) that minilora reads gets its type and range checked before use, and
every refusal is a ``PeftFileError`` naming the file, the field and the value.

    peft_type                    "LORA"
    r                            int >= 1                  (JSON integer; PEFT ``r: int``)
    lora_alpha                   finite number > 0         (PEFT ``lora_alpha: int``; floats work there)
    use_rslora, use_dora,        JSON true/false           (PEFT ``bool``; "false" is not false)
    fan_in_fan_out, lora_bias,
    inference_mode
    bias                         "none" | "all" | "lora_only"
    lora_dropout                 number in [0, 1]          (PEFT ``nn.Dropout(p)``; not used by a merge)
    rank_pattern                 null | {regex key: int >= 1}
    alpha_pattern                null | {regex key: finite number > 0}
    target_modules,              null | a regex string | a list of strings
    exclude_modules
    base_model_name_or_path      null | string
    options minilora does not implement (``UNSUPPORTED``): absent or at their PEFT default

A key may appear only once in the file (``json`` would keep the last one silently).
Pattern keys and regex strings must be matchable in bounded time (``minilora.peft.targets``).
No string anywhere in the config may hold a lone surrogate (``"\\ud800"`` parses as JSON but
is not Unicode text).
"""

from __future__ import annotations

import math
from typing import Any

from minilora.errors import MiniLoraValueError
from minilora.peft.targets import check_pattern, pattern_regex

__all__ = ["check_config", "PeftFileError", "UNSUPPORTED"]


class PeftFileError(MiniLoraValueError):
    """A PEFT adapter folder that is missing, corrupt, inconsistent or uses an unsupported option.
    The message names the file and the module."""


# Options that change the mathematics and that minilora does not implement: refused when set
# to anything but these values or {} (PEFT 0.21 ``LoraConfig`` field names), compared with
# their JSON type (0 is not false).
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "use_qalora": (False, None),
    "layer_replication": (None, []),
    "target_parameters": (None, []),
    "trainable_token_indices": (None, {}),
    "modules_to_save": (None, []),
    "alora_invocation_tokens": (None,),
    "use_bdlora": (None, False, {}),
    "arrow_config": (None, {}),
    "velora_config": (None, {}),
    "kasa_config": (None, {}),
    "monteclora_config": (None, {}),
    "megatron_config": (None, {}),
}
BOOLEANS = ("use_rslora", "use_dora", "fan_in_fan_out", "lora_bias", "inference_mode")


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _rank(v: Any) -> bool:
    return _is_int(v) and v >= 1


def _alpha(v: Any) -> bool:
    return _is_real(v) and math.isfinite(v) and v > 0


def _show(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


def _strings(config: dict) -> list[tuple[str, str]]:
    """(field, string) for every key and string value, at any depth (iteratively: the parser
    already allowed the nesting, a recursive walk might not)."""
    out, stack = [], [(k, k, v) for k, v in config.items()]
    while stack:
        top, key, value = stack.pop()
        out.append((top, key))
        if isinstance(value, str):
            out.append((top, value))
        elif isinstance(value, dict):
            stack += [(top, k, v) for k, v in value.items()]
        elif isinstance(value, list):
            stack += [(top, "", v) for v in value]
    return out


def _patterns(config: dict, where: str, key: str) -> None:
    """null | {regex key: value}; the value passes ``ok``, the key is matchable."""
    pats = config.get(key)
    if pats is None:
        return
    if not isinstance(pats, dict):
        raise PeftFileError(f"{where}: {key} must be an object of regex keys; got {_show(pats)}")
    ok, want = (_rank, "a positive integer") if key == "rank_pattern" else (_alpha, "a positive finite number")
    for k, v in pats.items():
        if not ok(v):
            raise PeftFileError(f"{where}: {key}[{k!r}] must be {want}; got {_show(v)}")
        try:
            check_pattern(pattern_regex(k), f"{key} key {k!r}, matched as")
        except MiniLoraValueError as exc:
            raise PeftFileError(f"{where}: {exc}") from None


def _module_list(config: dict, where: str, key: str) -> None:
    v = config.get(key)
    if v is None:
        return
    if isinstance(v, str):
        try:
            check_pattern(v, key)
        except MiniLoraValueError as exc:
            raise PeftFileError(f"{where}: {exc}") from None
    elif not (isinstance(v, list) and all(isinstance(t, str) for t in v)):
        raise PeftFileError(f"{where}: {key} must be null, a regex string or a list of strings; got {_show(v)}")


def check_config(config: Any, path: str = "adapter_config.json") -> dict:
    """Validate an adapter_config dict (rules in the module docstring); returns it unchanged."""
    where = path
    if not isinstance(config, dict):
        raise PeftFileError(f"{where}: expected a JSON object, got {type(config).__name__}")
    for top, text in _strings(config):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise PeftFileError(f"{where}: field {top!r} holds a string that is not valid Unicode "
                                f"(a lone surrogate): {_show(text)}") from None
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise PeftFileError(f"{where}: unsupported peft_type {_show(peft_type)}; minilora reads only 'LORA' adapters")
    if not _rank(config.get("r")):
        raise PeftFileError(f"{where}: r must be a positive integer; got {_show(config.get('r'))}")
    if not _alpha(config.get("lora_alpha")):
        raise PeftFileError(f"{where}: lora_alpha must be a positive finite number; got {_show(config.get('lora_alpha'))}")
    for key in BOOLEANS:
        if key in config and not isinstance(config[key], bool):
            raise PeftFileError(f"{where}: {key} must be true or false (a JSON boolean); got {_show(config[key])}")
    for key, allowed in UNSUPPORTED.items():
        if key in config and not any(_same(config[key], a) for a in (*allowed, {})):
            raise PeftFileError(f"{where}: option {key}={_show(config[key])} is not supported by minilora")
    bias = config.get("bias", "none")
    if not (isinstance(bias, str) and bias in ("none", "all", "lora_only")):
        raise PeftFileError(f"{where}: bias must be 'none', 'all' or 'lora_only'; got {_show(bias)}")
    for key in ("rank_pattern", "alpha_pattern"):
        _patterns(config, where, key)
    for key in ("target_modules", "exclude_modules"):
        _module_list(config, where, key)
    dropout = config.get("lora_dropout", 0.0)
    if not (_is_real(dropout) and 0 <= dropout <= 1):  # PEFT's nn.Dropout(p) refuses the rest
        raise PeftFileError(f"{where}: lora_dropout must be a number from 0 to 1; got {_show(dropout)}")
    name = config.get("base_model_name_or_path")
    if name is not None and not isinstance(name, str):
        raise PeftFileError(f"{where}: base_model_name_or_path must be null or a string; got {_show(name)}")
    return config
