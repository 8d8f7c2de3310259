"""PEFT LoRA adapter folders, read and written with NumPy alone.

A PEFT adapter folder (``PeftModel.save_pretrained``, PEFT ``utils/save_and_load.py``) holds

    adapter_config.json          {"peft_type": "LORA", "r", "lora_alpha", "use_rslora", "use_dora",
                                  "fan_in_fan_out", "rank_pattern", "alpha_pattern", "target_modules",
                                  "lora_bias", "bias", ...}
    adapter_model.safetensors    base_model.model.<module>.lora_A.weight          (r, d_in)
                                 base_model.model.<module>.lora_B.weight          (d_out, r)
                                 base_model.model.<module>.lora_B.bias            (d_out,)  lora_bias
                                 base_model.model.<module>.lora_embedding_A       (r, num_embeddings)
                                 base_model.model.<module>.lora_embedding_B       (dim, r)
                                 base_model.model.<module>.lora_magnitude_vector  (d_out,)  DoRA
                                 base_model.model.<module>.bias                   bias="all"/"lora_only"

The adapter name ("default") is not part of the keys. Each module's scale is
``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA), where r and alpha come from ``rank_pattern`` /
``alpha_pattern`` when a pattern key matches the module name (PEFT ``get_pattern_key``: the
first key k, in the dict's order, with ``re.match(rf"(.*\\.)?({k})$", name)``), else from
``r`` / ``lora_alpha``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from minilora.errors import ShapeError
from minilora.formats import safetensors as st
from minilora.formats.fileio import atomic_open, read_json
from minilora.peft.config import PeftFileError, check_config
from minilora.peft.targets import pattern_value

__all__ = [
    "PeftFileError",
    "PeftAdapter",
    "load_peft_adapter",
    "save_peft_adapter",
    "check_config",
    "pattern_value",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "PREFIX",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."

_SUFFIXES = {
    "lora_A.weight": ("linear", "A"),
    "lora_B.weight": ("linear", "B"),
    "lora_B.bias": ("linear", "lora_bias"),
    "lora_embedding_A": ("embedding", "A"),
    "lora_embedding_B": ("embedding", "B"),
    "lora_magnitude_vector": (None, "m"),
}


@dataclass
class PeftAdapter:
    """A LoRA adapter as PEFT stores it, held as NumPy arrays.

    config: the adapter_config.json dict. modules: {module name (no "base_model.model."):
    {"A": (r, d_in) [embedding: (r, num_embeddings)], "B": (d_out, r) [embedding: (dim, r)],
    optional "lora_bias": (d_out,), optional "m": (d_out,) DoRA magnitude}}. kinds: {module:
    "linear" | "embedding"}. extra: other tensors in the file (base biases saved by
    ``bias="all"``/``"lora_only"``), keyed by base-model name, e.g. "fc1.bias".
    """

    config: dict
    modules: dict[str, dict[str, np.ndarray]]
    kinds: dict[str, str] = field(default_factory=dict)
    extra: dict[str, np.ndarray] = field(default_factory=dict)

    def rank(self, module: str) -> int:
        return int(self.modules[module]["A"].shape[0])

    def alpha(self, module: str) -> float:
        return float(pattern_value(self.config.get("alpha_pattern") or {}, module, self.config["lora_alpha"],
                                   what="alpha_pattern key"))

    def scale(self, module: str) -> float:
        """alpha / r, or alpha / sqrt(r) with ``use_rslora`` (PEFT ``LoraLayer.update_layer``)."""
        r, a = self.rank(module), self.alpha(module)
        return a / math.sqrt(r) if self.config.get("use_rslora") else a / r

    @property
    def fan_in_fan_out(self) -> bool:
        return bool(self.config.get("fan_in_fan_out", False))

    @property
    def use_dora(self) -> bool:
        return bool(self.config.get("use_dora", False))


def _split_key(key: str, path: str) -> tuple[str, str, str | None, str]:
    """'base_model.model.fc1.lora_A.weight' -> ('fc1', 'A', 'linear', suffix)."""
    if not key.startswith(PREFIX):
        raise PeftFileError(f"{path}: tensor {key!r} does not start with {PREFIX!r}")
    rest = key[len(PREFIX):]
    for suffix, (kind, role) in _SUFFIXES.items():
        if rest.endswith("." + suffix):
            return rest[: -len(suffix) - 1], role, kind, suffix
    return rest, "extra", None, ""


def load_peft_adapter(folder: str | os.PathLike) -> PeftAdapter:
    """Read a PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors).

    Tensors keep their stored dtype (BF16 comes back as float32, exactly). Checks: every module
    has A and B of consistent shapes (B (d_out, r) against A (r, d_in)), r agrees with
    ``rank_pattern``/``r``, DoRA magnitudes have d_out entries and appear iff ``use_dora``.
    """
    folder = os.fspath(folder)
    cpath = os.path.join(folder, CONFIG_NAME)
    wpath = os.path.join(folder, WEIGHTS_NAME)
    if not os.path.isdir(folder):
        raise PeftFileError(f"{folder}: adapter folder not found")
    config = read_json(cpath, PeftFileError, missing="file not found (not a PEFT adapter folder?)",
                       invalid="corrupt JSON", unique_keys=True)
    check_config(config, cpath)
    if not os.path.exists(wpath):
        if os.path.exists(os.path.join(folder, "adapter_model.bin")):
            raise PeftFileError(f"{wpath}: not found; only adapter_model.bin (a torch pickle) is there, which "
                                "minilora does not read: re-save with safe_serialization=True")
        raise PeftFileError(f"{wpath}: file not found")
    tensors = st.load(wpath)  # SafetensorsError (a MiniLoraValueError) names the file
    modules: dict[str, dict[str, np.ndarray]] = {}
    kinds: dict[str, str] = {}
    extra: dict[str, np.ndarray] = {}
    for key, value in tensors.items():
        module, role, kind, _ = _split_key(key, wpath)
        if role == "extra":  # a wrapped layer's own tensors are saved as "<m>.base_layer.<name>"
            extra[module.replace(".base_layer.", ".")] = value
            continue
        modules.setdefault(module, {})[role] = value
        if kind is not None:
            if kinds.setdefault(module, kind) != kind:
                raise PeftFileError(f"{wpath}: module {module!r} has both linear and embedding LoRA tensors")
    adapter = PeftAdapter(config, modules, kinds, extra)
    for module, t in modules.items():
        _check_module(adapter, module, t, wpath)
    if extra and config.get("bias", "none") == "none":
        raise PeftFileError(f"{wpath}: tensors {sorted(extra)} are not LoRA tensors and bias='none'")
    return adapter


def _check_module(adapter: PeftAdapter, module: str, t: dict, where: str) -> None:
    missing = [k for k in ("A", "B") if k not in t]
    if missing:
        raise PeftFileError(f"{where}: module {module!r} lacks lora {'/'.join(missing)} (has {sorted(t)})")
    A, B = t["A"], t["B"]
    if A.ndim != 2 or B.ndim != 2:
        raise ShapeError(f"{where}: module {module!r}: lora A and B must be 2-D; got {A.shape} and {B.shape}")
    if A.dtype.kind != "f" or B.dtype.kind != "f":
        raise PeftFileError(f"{where}: module {module!r}: lora A/B must be floating point; got {A.dtype}/{B.dtype}")
    r = A.shape[0]
    if B.shape[1] != r:
        raise ShapeError(f"{where}: module {module!r}: lora B must have shape (d_out, r) = ({B.shape[0]}, {r}); "
                         f"got {B.shape}")
    expected = pattern_value(adapter.config.get("rank_pattern") or {}, module, adapter.config["r"],
                             what="rank_pattern key")
    if r != expected:
        raise ShapeError(f"{where}: module {module!r}: lora A has rank {r} but the config gives r={expected}")
    for vec in ("lora_bias", "m"):
        if vec in t and t[vec].shape != (B.shape[0],):
            raise ShapeError(f"{where}: module {module!r}: {vec} must have shape ({B.shape[0]},); got {t[vec].shape}")
    if adapter.use_dora and "m" not in t:
        raise PeftFileError(f"{where}: module {module!r}: use_dora=true but lora_magnitude_vector is missing")
    if "m" in t and not adapter.use_dora:
        raise PeftFileError(f"{where}: module {module!r} has lora_magnitude_vector but use_dora=false")
    if "lora_bias" in t and not adapter.config.get("lora_bias"):
        raise PeftFileError(f"{where}: module {module!r} has lora_B.bias but lora_bias=false")


def default_config(**overrides: Any) -> dict:
    """An adapter_config.json dict with PEFT's defaults for the fields minilora writes."""
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": None,
        "r": 8,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "bias": "none",
        "lora_bias": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "target_modules": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "base_model_name_or_path": None,
        "modules_to_save": None,
    }
    config.update(overrides)
    return config


def save_peft_adapter(folder: str | os.PathLike, modules: dict, config: dict | None = None, *,
                      kinds: dict | None = None, extra: dict | None = None, **config_fields: Any) -> str:
    """Write a PEFT adapter folder that ``PeftModel.from_pretrained`` loads.

    modules: {module name: {"A", "B", optional "lora_bias", "m"}} (shapes as ``PeftAdapter``);
    config: a full config dict, or None to build one from PEFT's defaults and ``config_fields``
    (r, lora_alpha, use_rslora, use_dora, fan_in_fan_out, rank_pattern, alpha_pattern, ...).
    target_modules defaults to the sorted module names. kinds: {module: "embedding"} for
    embedding adapters. extra: base tensors to store (e.g. {"fc1.bias": ...} for bias="all").
    Both files are written atomically. Returns the folder.
    """
    folder = os.fspath(folder)
    kinds = dict(kinds or {})
    config = default_config(**config_fields) if config is None else {**config, **config_fields}
    if config.get("target_modules") is None:
        config["target_modules"] = sorted(modules)
    check_config(config, os.path.join(folder, CONFIG_NAME))
    tensors: dict[str, np.ndarray] = {}
    for module, t in modules.items():
        emb = kinds.get(module, "linear") == "embedding"
        names = {"A": "lora_embedding_A" if emb else "lora_A.weight",
                 "B": "lora_embedding_B" if emb else "lora_B.weight",
                 "lora_bias": "lora_B.bias", "m": "lora_magnitude_vector"}
        for role, value in t.items():
            if role not in names:
                raise PeftFileError(f"module {module!r}: unknown adapter tensor {role!r}; expected {sorted(names)}")
            tensors[f"{PREFIX}{module}.{names[role]}"] = np.asarray(value)
    for name, value in (extra or {}).items():
        owner, _, leaf = name.rpartition(".")
        key = f"{owner}.base_layer.{leaf}" if owner in modules else name  # PEFT's key for a wrapped layer
        tensors[f"{PREFIX}{key}"] = np.asarray(value)
    # validate what we are about to write exactly as a reader would
    probe = PeftAdapter(config, {m: {k: np.asarray(v) for k, v in t.items()} for m, t in modules.items()}, kinds)
    for module, t in probe.modules.items():
        _check_module(probe, module, t, os.path.join(folder, WEIGHTS_NAME))
    os.makedirs(folder, exist_ok=True)
    st.save(tensors, os.path.join(folder, WEIGHTS_NAME), metadata={"format": "pt"})
    with atomic_open(os.path.join(folder, CONFIG_NAME), "w", encoding="utf-8") as fh:
        json.dump(config, fh, indent=2, sort_keys=True)
        fh.write("\n")
    return folder
