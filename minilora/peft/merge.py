"""The streaming merge: a PEFT LoRA adapter merged into a safetensors file of base weights with
NumPy alone (PEFT ``merge_and_unload``), one tensor at a time (``minilora merge`` is its command).

For a module ``<m>`` of the adapter, the base tensor ``<m>.weight`` becomes (PEFT
``tuners/lora/layer.py`` ``Linear.merge``/``get_delta_weight``, ``variants.py`` DoRA):

    LoRA        W' = W + s B A                    (transposed when fan_in_fan_out)
    embedding   W' = W + s (B A)^T                (W (num_embeddings, dim))
    DoRA        W' = m / ||W + s B A||_row * (W + s B A)      (norm over d_in, per output)
    lora_bias   b' = b + s b_B
    --unmerge   W  = W' - s B A,  b = b' - s b_B  (DoRA cannot be unmerged without its cached norm)

s = alpha / r (or alpha / sqrt(r)) times ``--scale``. Precision follows PEFT on CPU with its
default ``autocast_adapter_dtype=True``: the adapter is held in float32 when the base is
float16/bfloat16/float32 (float64 for a float64 base), the delta and the sum are computed in
that type and the result is rounded once to the base tensor's dtype (bfloat16: round to nearest
even on the raw bits). Exception, as in PEFT: for an embedding, and for every unmerge, PEFT
first rounds the delta to the base dtype (``delta.to(orig_dtype)``) and then adds in that
dtype, so float16/bfloat16 results are rounded twice there; minilora does the same. Tensors the adapter does not touch are copied byte for byte.

Memory: the header is read first, then each tensor is read, merged and written before the next
is read, so at most one tensor (plus its adapter factors) is held; OUT is written through a temp
file and renamed at the end (``minilora.formats.fileio.atomic_open``), so a failure never leaves half of it.
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Any

import numpy as np

from minilora.errors import MiniLoraValueError, NonFiniteError, ShapeError
from minilora.formats import safetensors as st
from minilora.formats.fileio import atomic_open
from minilora.layers import merge_weight

__all__ = ["merge_adapter_file", "MergeError"]

_FLOAT = ("F64", "F32", "F16", "BF16")


class MergeError(MiniLoraValueError):
    """An adapter that does not fit the base file (names, shapes, dtypes, options)."""


def _to_compute(raw: np.ndarray, kind: str) -> np.ndarray:
    if kind == "BF16":
        return st.bf16_bits_to_float32(raw)
    return raw.astype(np.float64 if kind == "F64" else np.float32)


def _from_compute(value: np.ndarray, kind: str) -> np.ndarray:
    if kind == "BF16":
        return st.float_to_bf16_bits(value.astype(np.float32))
    return value.astype(st.DTYPES[kind])


# ---------------------------------------------------------------- the merge


def _plan(adapter: Any, entries: dict, base_path: str, unmerge: bool) -> dict[str, tuple[str, str]]:
    """{base tensor name: (module, role)} with role "weight" | "bias" | "extra", after checking
    every adapter module against the base file's names, shapes and dtypes."""
    plan: dict[str, tuple[str, str]] = {}
    for module, t in adapter.modules.items():
        wname = f"{module}.weight"
        if wname not in entries:
            near = [n for n in entries if n.endswith(module.rsplit(".", 1)[-1] + ".weight")][:3]
            raise MergeError(f"adapter module {module!r} matches no tensor in {base_path}: {wname!r} is missing"
                             + (f" (similar: {near})" if near else ""))
        kind, shape = entries[wname][0], entries[wname][1]
        A, B = t["A"], t["B"]
        if adapter.kinds.get(module) == "embedding":
            want = (A.shape[1], B.shape[0])
        else:
            want = (A.shape[1], B.shape[0]) if adapter.fan_in_fan_out else (B.shape[0], A.shape[1])
        if tuple(shape) != want:
            raise ShapeError(f"module {module!r}: base tensor {wname!r} has shape {tuple(shape)} but the adapter "
                             f"(A {A.shape}, B {B.shape}) needs {want}")
        if kind not in _FLOAT:
            raise MergeError(f"module {module!r}: base tensor {wname!r} has dtype {kind}, which minilora merge "
                             f"cannot handle (supported: {', '.join(_FLOAT)})")
        if "m" in t and unmerge:
            raise MergeError(f"module {module!r}: a DoRA merge cannot be undone from the merged weight alone "
                             "(PEFT keeps the weight norm in memory); --unmerge is not supported for DoRA")
        plan[wname] = (module, "weight")
        if "lora_bias" in t:
            bname = f"{module}.bias"
            if bname not in entries:
                raise MergeError(f"module {module!r} has lora_bias but {base_path} has no {bname!r} to merge it into")
            plan[bname] = (module, "bias")
    for name, value in adapter.extra.items():
        if name not in entries:
            raise MergeError(f"adapter tensor {name!r} (bias={adapter.config.get('bias')!r}) matches no tensor "
                             f"in {base_path}")
        if tuple(entries[name][1]) != value.shape:
            raise ShapeError(f"adapter tensor {name!r} has shape {value.shape} but {base_path} has "
                             f"{tuple(entries[name][1])}")
        if unmerge:
            raise MergeError(f"adapter replaces {name!r} (bias={adapter.config.get('bias')!r}); that cannot be "
                             "undone, so --unmerge is refused")
        plan[name] = ("", "extra")
    return plan


def merge_adapter_file(base: str | os.PathLike, adapter_dir: str | os.PathLike, out: str | os.PathLike, *,
                       unmerge: bool = False, scale: float = 1.0, _on_tensor: Any = None) -> list[dict]:
    """Write ``out``: the safetensors file ``base`` with the PEFT adapter in ``adapter_dir`` merged
    in (or taken out, ``unmerge=True``); ``scale`` multiplies every module's alpha/r. Returns one
    summary dict per merged module: {"module", "kind", "rank", "alpha", "scale", "dtype", "dora"}.
    """
    from minilora.peft.files import load_peft_adapter

    base, out = os.fspath(base), os.fspath(out)
    if not math.isfinite(scale):
        raise MiniLoraValueError(f"--scale must be finite; got {scale}")
    adapter = load_peft_adapter(adapter_dir)
    if os.path.abspath(base) == os.path.abspath(out):
        raise MergeError(f"OUT must differ from BASE ({base}): the merge streams from BASE while writing OUT")
    try:
        fh = open(base, "rb")
    except OSError as exc:
        raise st.SafetensorsError(f"{base}: cannot read: {exc.strerror or exc}") from None
    with fh:
        entries, metadata, start = st.read_header_streaming(fh, base)
        plan = _plan(adapter, entries, base, unmerge)
        order = sorted(entries, key=lambda n: entries[n][2])
        header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
        for name in order:
            kind, shape, begin, end = entries[name]
            header[name] = {"dtype": kind, "shape": list(shape), "data_offsets": [begin, end]}
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        text += b" " * (-len(text) % 8)
        summary = []
        with atomic_open(out, "wb") as dst:
            dst.write(struct.pack("<Q", len(text)) + text)
            for name in order:
                entry = entries[name]
                raw = st.read_tensor(fh, start, entry, name, base)
                if _on_tensor is not None:
                    _on_tensor(name)
                if name in plan:
                    raw = _apply(adapter, plan[name], name, raw, entry[0], scale, unmerge)
                    if plan[name][1] == "weight":
                        module = plan[name][0]
                        summary.append({"module": module, "kind": adapter.kinds.get(module, "linear"),
                                        "rank": adapter.rank(module), "alpha": adapter.alpha(module),
                                        "scale": adapter.scale(module) * scale, "dtype": entry[0],
                                        "dora": "m" in adapter.modules[module]})
                dst.write(np.ascontiguousarray(raw).tobytes())
    return summary


def _apply(adapter: Any, job: tuple[str, str], name: str, raw: np.ndarray, kind: str, scale: float,
           unmerge: bool) -> np.ndarray:
    module, role = job
    if role == "extra":
        return _from_compute(adapter.extra[name].astype(np.float64), kind) if kind in _FLOAT else \
            adapter.extra[name].astype(raw.dtype)
    if kind not in _FLOAT:
        raise MergeError(f"module {module!r}: base tensor {name!r} has dtype {kind}, which minilora merge cannot handle")
    t = adapter.modules[module]
    s = adapter.scale(module) * scale
    value = _to_compute(raw, kind)
    with np.errstate(over="ignore", invalid="ignore"):
        if role == "bias":
            lb = t["lora_bias"].astype(value.dtype) * value.dtype.type(s)
            new = value - lb if unmerge else value + lb
        else:
            embedding = adapter.kinds.get(module) == "embedding"
            # PEFT rounds the delta to the base dtype before adding it for embeddings and for
            # unmerge (``delta.to(orig_dtype)``), not for a Linear merge (``weight.data += delta``)
            rounds = kind in ("F16", "BF16") and (embedding or unmerge) and "m" not in t
            cd = value.dtype
            new = merge_weight(value, t["A"].astype(cd), t["B"].astype(cd), scale=cd.type(s),
                               fan_in_fan_out=embedding or adapter.fan_in_fan_out, unmerge=unmerge,
                               magnitude=t["m"].astype(cd) if "m" in t else None,
                               round_delta=(lambda d: _to_compute(_from_compute(d, kind), kind)) if rounds else None)
    if not np.all(np.isfinite(new)):
        bad = int(new.size - np.count_nonzero(np.isfinite(new)))
        raise NonFiniteError(f"module {module!r}: merging gives {bad} non-finite values in {name!r}; "
                             "the adapter seems broken (OUT was not written)")
    out = _from_compute(new, kind)
    if kind != "F64" and not np.all(np.isfinite(_to_compute(out, kind))):
        raise NonFiniteError(f"module {module!r}: the merged {name!r} overflows {kind} (OUT was not written)")
    return out
