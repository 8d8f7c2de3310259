"""What a merge will do, decided before any tensor is read: the adapter as PEFT saved it (LoRA
factors, saved base layers, ``modules_to_save``, biases), each module's base tensor (across the
key prefixes PEFT and ``transformers`` use) and its orientation.

Orientation (PEFT sets ``fan_in_fan_out`` per layer from its type and saves only the last value,
so the saved flag says nothing about the other modules):

    layer type known   config.json beside the base names a ``transformers`` model_type (no
                       ``auto_map``): Conv1D for the names in ``CONV1D`` (GPT-2 and kin), Linear
                       otherwise; a shape that disagrees is refused
    else, shape        when exactly one orientation fits the base tensor's shape, that one
    else               (square) the adapter's fan_in_fan_out flag, except for a Conv1D-style name
                       (c_attn, c_proj, c_fc, q_attn) of unknown type: refused, naming the module

Key prefixes: a module's tensor is looked up as named, without its first component
(``transformer.h.0`` -> ``h.0``, the hub's GPT-2 layout) and under each first component of the
base's own names (``model.`` + name); two hits are refused by name.

Bit-equality with PEFT (``minilora.peft.product``): a LoRA or embedding module into a float32,
float16 or bfloat16 tensor gets PEFT's bits where torch's summation order of its product B A is
reproduced (``product.order_problem``); elsewhere it is refused, naming the module, its rank and
why, unless ``allow_inexact`` (then the row says ``"bit_equal": false`` and why). DoRA (the norm
is summed in another order: equal to rounding) and float64 (NumPy's product) rows say so too.

Saved tensors other than LoRA factors replace the base tensor before the merge, as
``PeftModel.from_pretrained`` loads them over the base's: ``<m>.base_layer.weight``
(``save_embedding_layers``), the modules of ``modules_to_save`` (saved whole), and the biases of
``bias="all"|"lora_only"``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import numpy as np

from minilora.errors import MiniLoraValueError, ShapeError
from minilora.formats import safetensors as st
from minilora.formats.fileio import read_json
from minilora.peft.files import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    PeftAdapter,
    PeftFileError,
    _check_module,
    _split_key,
    check_config,
)
from minilora.peft.product import order_problem

__all__ = ["CONV1D", "MergeError", "Plan", "inexact_reason", "load_for_merge", "make_plan"]

FLOAT = ("F64", "F32", "F16", "BF16")
_CONV1D_NAMES = frozenset({"c_attn", "q_attn", "c_proj", "c_fc"})
# transformers model types whose Conv1D layers (leaf names) PEFT merges with fan_in_fan_out=True
CONV1D: dict[str, frozenset[str]] = {
    "gpt2": _CONV1D_NAMES, "decision_transformer": _CONV1D_NAMES, "imagegpt": _CONV1D_NAMES,
    "openai-gpt": frozenset({"c_attn", "c_proj", "c_fc"}), "clvp": frozenset({"c_fc", "c_proj"}),
}
_OUTPUT_EMBEDDINGS = ("lm_head", "cls.predictions.decoder")


class MergeError(MiniLoraValueError):
    """An adapter that does not fit the base (names, shapes, dtypes, options)."""


@dataclass
class Job:
    """What happens to one base tensor: role "weight" (LoRA merge), "bias" (lora_bias), or
    "replace" (copied from the adapter); ``replace`` names the adapter tensor loaded first."""

    module: str
    role: str
    fan_in_fan_out: bool = False
    replace: str | None = None
    why: str = ""


@dataclass
class Plan:
    jobs: dict[str, Job] = field(default_factory=dict)  # base tensor name -> job
    refused: list[dict] = field(default_factory=list)  # [{"module", "reason"}]
    rows: list[dict] = field(default_factory=list)


def load_for_merge(folder: str | os.PathLike) -> tuple[PeftAdapter, dict[str, str]]:
    """(adapter, {extra tensor: its source}) for a PEFT adapter folder, read as
    ``files.load_peft_adapter`` does but also accepting what merge_and_unload uses: saved base
    layers and ``modules_to_save``. adapter.extra is keyed by the model's tensor name."""
    folder = os.fspath(folder)
    cpath, wpath = os.path.join(folder, CONFIG_NAME), os.path.join(folder, WEIGHTS_NAME)
    if not os.path.isdir(folder):
        raise PeftFileError(f"{folder}: adapter folder not found")
    config = read_json(cpath, PeftFileError, missing="file not found (not a PEFT adapter folder?)",
                       invalid="corrupt JSON", unique_keys=True)
    if not isinstance(config, dict):
        raise PeftFileError(f"{cpath}: expected a JSON object, got {type(config).__name__}")
    saved = config.get("modules_to_save") or []
    if not isinstance(saved, list) or not all(isinstance(s, str) for s in saved):
        raise PeftFileError(f"{cpath}: modules_to_save must be a list of module names; got {saved!r}")
    check_config({k: v for k, v in config.items() if k != "modules_to_save"}, cpath)
    if not os.path.exists(wpath):
        raise PeftFileError(f"{wpath}: file not found" + (
            " (only adapter_model.bin, a torch pickle, is there: re-save with safe_serialization=True)"
            if os.path.exists(os.path.join(folder, "adapter_model.bin")) else ""))
    tensors = st.load(wpath)
    modules: dict[str, dict[str, np.ndarray]] = {}
    kinds: dict[str, str] = {}
    extra: dict[str, np.ndarray] = {}
    sources: dict[str, str] = {}
    bias_mode = config.get("bias", "none")
    for key, value in tensors.items():
        module, role, kind, _ = _split_key(key, wpath)
        if role != "extra":
            modules.setdefault(module, {})[role] = value
            if kind is not None and kinds.setdefault(module, kind) != kind:
                raise PeftFileError(f"{wpath}: module {module!r} has both linear and embedding LoRA tensors")
            continue
        # a module of modules_to_save is saved whole, submodules included (RoBERTa's classifier
        # holds dense and out_proj): any module above the tensor may be the one named
        parts = module.split(".")[:-1]
        owners = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
        if any(o == s or o.endswith("." + s) for o in owners for s in saved):
            source = "modules_to_save"
        elif ".base_layer." in module and module.endswith(".weight"):
            source = "saved base layer"
        elif module.endswith(".bias") and bias_mode != "none":
            source = f"bias={bias_mode}"
        else:
            raise PeftFileError(f"{wpath}: tensor {key!r} is neither a LoRA tensor, a saved base layer, a module of "
                                f"modules_to_save ({saved}) nor a bias (bias={bias_mode!r})")
        name = module.replace(".base_layer.", ".")
        extra[name], sources[name] = value, source
    if not modules:
        raise PeftFileError(f"{wpath}: holds no LoRA tensors (lora_A/lora_B); nothing to merge")
    adapter = PeftAdapter(config, modules, kinds, extra)
    for module, t in modules.items():
        _check_module(adapter, module, t, wpath)
    return adapter, sources


def _prefixes(entries: dict) -> list[str]:
    return sorted({k.split(".", 1)[0] + "." for k in entries if "." in k and not k.split(".", 1)[0].isdigit()})


def resolve(name: str, entries: dict, prefixes: list[str], where: str) -> str | None:
    """The base tensor for the model tensor ``name`` (see the module doc); None when absent."""
    head, _, rest = name.partition(".")
    cands = [name] + ([rest] if rest and not head.isdigit() else []) + [p + name for p in prefixes]
    hits = list(dict.fromkeys(c for c in cands if c in entries))
    if len(hits) > 1:
        raise MergeError(f"{name!r} is ambiguous in {where}: it could be any of {hits}")
    return hits[0] if hits else None


def _shard_hint(where: str) -> str:
    if re.search(r"-\d+-of-\d+\.safetensors$", where):
        return (" (BASE is one shard of a sharded checkpoint: pass its folder or its model.safetensors.index.json "
                "to merge the whole model)")
    return ""


def _layer_types(config: dict | None) -> frozenset[str] | None:
    """The Conv1D leaf names of the base's model type, or None when the type is not known."""
    if not config or not isinstance(config.get("model_type"), str) or config.get("auto_map"):
        return None
    return CONV1D.get(config["model_type"], frozenset())


def _orientation(module: str, wname: str, shape: tuple, A: np.ndarray, B: np.ndarray, flag: bool,
                 conv1d: frozenset[str] | None) -> tuple[bool, str]:
    d_in, d_out = int(A.shape[1]), int(B.shape[0])
    fits = [f for f in (False, True) if tuple(shape) == ((d_in, d_out) if f else (d_out, d_in))]
    if not fits:
        raise ShapeError(f"module {module!r}: base tensor {wname!r} has shape {tuple(shape)} but the adapter "
                         f"(A {A.shape}, B {B.shape}) needs ({d_out}, {d_in}) (Linear) or ({d_in}, {d_out}) (Conv1D)")
    leaf = module.rsplit(".", 1)[-1]
    if conv1d is not None:
        f = leaf in conv1d
        if f not in fits:
            raise ShapeError(f"module {module!r}: config.json says it is a {'Conv1D' if f else 'Linear'} layer but "
                             f"base tensor {wname!r} has shape {tuple(shape)}, which fits only the other orientation")
        return f, "layer type"
    if len(fits) == 1:
        return fits[0], "shape"
    if leaf in _CONV1D_NAMES:
        raise MergeError(f"module {module!r}: cannot tell whether it is a Conv1D (fan_in_fan_out) or a Linear layer: "
                         f"its base tensor is square {tuple(shape)} and there is no config.json with a model_type "
                         "beside the base (PEFT saves only the last module's fan_in_fan_out); pass the model folder")
    return flag, "adapter config"


def inexact_reason(module: str, t: dict, kind: str, *, allow_inexact: bool = False) -> str | None:
    """None when the merge of ``module`` (factors ``t``) into a ``kind`` tensor has PEFT's bits;
    else why not. Raises MergeError where bit-equality would be expected but the product order is
    not reproduced, unless ``allow_inexact``."""
    if "m" in t:
        return "DoRA: the weight norm is summed in another order than torch's (equal to rounding)"
    if kind == "F64":
        return "float64: NumPy's product, not torch's summation order (equal to rounding)"
    A, B = t["A"], t["B"]
    r = int(A.shape[0])
    problem = order_problem(int(B.shape[0]), r, int(A.shape[1]))
    if problem is None:
        return None
    if not allow_inexact:
        raise MergeError(f"module {module!r} (r={r}): {problem}, so its merge could differ from PEFT's in the last "
                         "bits; pass --allow-inexact (allow_inexact=True) to merge it anyway")
    return problem


def make_plan(adapter: PeftAdapter, sources: dict[str, str], entries: dict, where: str, config: dict | None, *,
              unmerge: bool = False, collect: bool = False, allow_inexact: bool = False) -> Plan:
    """Check every adapter module and saved tensor against the base's ``entries`` and decide what
    happens to each base tensor. ``collect``: record refusals in ``plan.refused`` instead of raising.
    ``allow_inexact``: merge modules whose bit-equality with PEFT is not guaranteed (module doc)."""
    plan = Plan()
    prefixes = _prefixes(entries)
    conv1d = _layer_types(config)
    tied = bool(config and config.get("tie_word_embeddings"))
    replaced: dict[str, str] = {}  # base tensor -> adapter extra name

    def refuse(module: str, exc: MiniLoraValueError) -> None:
        if not collect:
            raise exc
        plan.refused.append({"module": module, "reason": str(exc)})

    def tie_check(module: str) -> None:
        if tied and (module in _OUTPUT_EMBEDDINGS or module.endswith(".lm_head")):
            raise MergeError(f"module {module!r}: the base ties it to the input embeddings (tie_word_embeddings=true "
                             "in config.json), so PEFT's merge would change both; minilora refuses this case")

    for name, value in adapter.extra.items():
        try:
            tie_check(name.rsplit(".", 1)[0])
            base = resolve(name, entries, prefixes, where)
            if base is None:
                raise MergeError(f"adapter tensor {name!r} ({sources[name]}) matches no tensor in {where}"
                                 + _shard_hint(where))
            if tuple(entries[base][1]) != value.shape:
                raise ShapeError(f"adapter tensor {name!r} ({sources[name]}) has shape {value.shape} but {where} has "
                                 f"{base!r} of shape {tuple(entries[base][1])}")
            if entries[base][0] not in FLOAT:
                raise MergeError(f"adapter tensor {name!r}: base tensor {base!r} has dtype {entries[base][0]}, which "
                                 "minilora merge cannot handle")
            if unmerge:
                raise MergeError(f"adapter replaces {base!r} ({sources[name]}); that cannot be undone, so --unmerge "
                                 "is refused")
            replaced[base] = name
            plan.jobs[base] = Job("", "replace", replace=name, why=sources[name])
        except MiniLoraValueError as exc:
            refuse(name, exc)
    for module in sorted(adapter.modules):
        t = adapter.modules[module]
        try:
            tie_check(module)
            wname = resolve(f"{module}.weight", entries, prefixes, where)
            if wname is None:
                near = [n for n in entries if n.endswith(module.rsplit(".", 1)[-1] + ".weight")][:3]
                hint = " (tied to the input embeddings, so not saved?)" if module.rsplit(".", 1)[-1] == "lm_head" else ""
                raise MergeError(f"adapter module {module!r} matches no tensor in {where}: {module + '.weight'!r} is "
                                 f"missing{hint}" + (f" (similar: {near})" if near else "") + _shard_hint(where))
            kind, shape = entries[wname][0], entries[wname][1]
            if kind not in FLOAT:
                raise MergeError(f"module {module!r}: base tensor {wname!r} has dtype {kind}, which minilora merge "
                                 f"cannot handle (supported: {', '.join(FLOAT)})")
            if adapter.kinds.get(module) == "embedding":
                if tuple(shape) != (t["A"].shape[1], t["B"].shape[0]):
                    raise ShapeError(f"module {module!r}: base tensor {wname!r} has shape {tuple(shape)} but the "
                                     f"embedding adapter (A {t['A'].shape}, B {t['B'].shape}) needs "
                                     f"{(t['A'].shape[1], t['B'].shape[0])}")
                fifo, why = True, "embedding"
            else:
                fifo, why = _orientation(module, wname, shape, t["A"], t["B"], adapter.fan_in_fan_out, conv1d)
            if "m" in t and unmerge:
                raise MergeError(f"module {module!r}: a DoRA merge cannot be undone from the merged weight alone "
                                 "(PEFT keeps the weight norm in memory); --unmerge is not supported for DoRA")
            inexact = inexact_reason(module, t, kind, allow_inexact=allow_inexact)
            jobs = {wname: Job(module, "weight", fifo, replaced.get(wname), why)}
            if "lora_bias" in t:
                bname = wname[: -len("weight")] + "bias"
                if bname not in entries:
                    raise MergeError(f"module {module!r} has lora_bias but {where} has no {bname!r} to merge it into")
                jobs[bname] = Job(module, "bias", fifo, replaced.get(bname))
            plan.jobs.update(jobs)
            plan.rows.append({"module": module, "tensor": wname, "kind": adapter.kinds.get(module, "linear"),
                              "rank": adapter.rank(module), "alpha": adapter.alpha(module),
                              "scale": adapter.scale(module), "dtype": kind, "dora": "m" in t,
                              "fan_in_fan_out": fifo, "orientation_from": why,
                              "base_replaced": wname in replaced, "bit_equal": inexact is None,
                              "not_bit_equal_why": inexact})
        except MiniLoraValueError as exc:
            refuse(module, exc)
    return plan
