"""The streaming merge: a PEFT LoRA adapter merged into a checkpoint of base weights with NumPy
alone (PEFT ``merge_and_unload``), one tensor at a time (``minilora merge`` is its command).

For a module ``<m>`` of the adapter, the base tensor ``<m>.weight`` becomes (PEFT
``tuners/lora/layer.py`` ``Linear.merge``/``get_delta_weight``, ``variants.py`` DoRA):

    LoRA        W' = W + s B A                    (transposed for a Conv1D, fan_in_fan_out)
    embedding   W' = W + s (B A)^T                (W (num_embeddings, dim))
    DoRA        W' = m / ||W + s B A||_row * (W + s B A)      (norm over d_in, per output)
    lora_bias   b' = b + s b_B
    --unmerge   W  = W' - s B A,  b = b' - s b_B  (DoRA cannot be unmerged without its cached norm)

s = alpha / r (or alpha / sqrt(r)) times ``--scale``. Tensors the adapter saved whole (saved
base layers, ``modules_to_save``, biases) are loaded over the base's first, cast to the base
dtype, as ``PeftModel.from_pretrained`` does; which base tensor each module is and its
orientation come from ``minilora.peft.merge_plan``. Precision follows PEFT on CPU with its
default ``autocast_adapter_dtype=True``: the adapter is held in float32 when the base is
float16/bfloat16/float32 (float64 for a float64 base), the delta and the sum are computed in
that type and the result is rounded once to the base tensor's dtype (bfloat16: round to nearest
even on the float32 bits, ``minilora.formats.rounding``). Exception, as in PEFT: for an
embedding, and for every unmerge, PEFT first rounds the delta to the base dtype and then adds
in that dtype, so float16/bfloat16 results are rounded twice there; minilora does the same.
``dtype`` casts every float tensor of the output afterwards (PEFT's merged model ``.to(dtype)``).
Every float32 product B A (Linear, embedding, unmerge) is summed in torch's order
(``minilora.peft.product``); a module whose product shape torch sums in an order minilora does not
reproduce is refused before anything is read, unless ``allow_inexact`` (the summary then lists it
under ``not_bit_equal``).

Inputs and outputs (``minilora.formats.checkpoint``): BASE is a file, an index or a model folder;
OUT is a file (every tensor in one) or a folder that becomes a loadable model (the same shards
and index when BASE was sharded, config.json, generation_config.json and tokenizer files copied
from the base folder). Every output path is checked before any tensor is read.

Memory: at most one tensor (plus its adapter factors) is held; every output file is written to a
temp file beside it, all are flushed to disk and then all renamed at the end
(``formats.fileio.atomic_files``), so a failure leaves the old OUT as it was, every file of it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import struct
from typing import Any

import numpy as np

from minilora.errors import MiniLoraValueError, NonFiniteError
from minilora.formats import safetensors as st
from minilora.formats.checkpoint import INDEX_NAME, MODEL_FILES, Checkpoint, open_checkpoint, read_tensor
from minilora.formats.fileio import AtomicFiles, atomic_files, unwritable_reason
from minilora.formats.rounding import f32_to_bf16_bits
from minilora.layers import merge_weight
from minilora.peft.merge_plan import FLOAT, Job, MergeError, load_for_merge, make_plan
from minilora.peft.product import torch_order_matmul
from minilora.peft.rounded_merge import rounded_linear_merge

__all__ = ["merge_adapter_file", "merge_checkpoint", "check_outputs", "delta_weight", "MergeError", "DTYPE_NAMES"]

DTYPE_NAMES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}
_TORCH_NAME = {v: k for k, v in DTYPE_NAMES.items()}


def _to_compute(raw: np.ndarray, kind: str) -> np.ndarray:
    if kind == "BF16":
        return st.bf16_bits_to_float32(raw)
    return raw.astype(np.float64 if kind == "F64" else np.float32)


def _from_compute(value: np.ndarray, kind: str) -> np.ndarray:
    if kind == "BF16":
        return f32_to_bf16_bits(value.astype(np.float32, copy=False))
    return value.astype(st.DTYPES[kind], copy=False)


# ---------------------------------------------------------------- outputs


def _is_folder(out: str) -> bool:
    return out.endswith(("/", os.sep)) or os.path.isdir(out) or not out.endswith(".safetensors")


def _writable_folder(folder: str, what: str) -> None:
    if not os.path.isdir(folder):
        raise MergeError(f"{what}: folder {folder} does not exist")
    if (reason := unwritable_reason(folder)) is not None:  # a real probe: os.access says yes to root
        raise MergeError(f"{what}: cannot write in folder {folder}: {reason}")


def check_outputs(out: str, ckpt: Checkpoint, adapter_dir: str) -> list[str]:
    """The files OUT will be (a file, or a folder's shards + index + model files), after refusing
    an OUT that cannot be written or that is one of the inputs. Nothing is written."""
    folder_mode = _is_folder(out)
    if folder_mode:
        folder = out.rstrip("/" + os.sep) or out
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise MergeError(f"OUT {out}: exists and is not a folder")
        _writable_folder(folder if os.path.isdir(folder) else os.path.dirname(os.path.abspath(folder)), f"OUT {out}")
        names = [os.path.basename(s.path) for s in ckpt.shards] if ckpt.sharded else ["model.safetensors"]
        names += [INDEX_NAME] if ckpt.sharded else []
        if ckpt.folder:
            names += [n for n in ("config.json", *MODEL_FILES) if os.path.isfile(os.path.join(ckpt.folder, n))]
        paths = [os.path.join(folder, n) for n in names]
        if ckpt.folder and os.path.exists(folder) and os.path.samefile(folder, ckpt.folder):
            raise MergeError(f"OUT {out} is the BASE folder: the merge reads BASE while writing OUT")
    else:
        _writable_folder(os.path.dirname(os.path.abspath(out)), f"OUT {out}")
        paths = [out]
    ad_real = os.path.realpath(adapter_dir)
    inputs = ckpt.files() + ([os.path.join(adapter_dir, f) for f in os.listdir(adapter_dir)]
                             if os.path.isdir(adapter_dir) else [])
    for p in paths:
        real = os.path.realpath(p)
        if real == ad_real or real.startswith(ad_real + os.sep):
            raise MergeError(f"OUT {out}: {p} is inside the adapter folder {adapter_dir}; write the merged model "
                             "elsewhere")
        if os.path.exists(p):
            if os.path.isdir(p):
                raise MergeError(f"OUT {out}: {p} is a folder")
            for f in inputs:
                if os.path.exists(f) and os.path.samefile(p, f):
                    raise MergeError(f"OUT {out}: {p} is an input ({f}); the merge reads it while writing OUT")
    return paths


# ---------------------------------------------------------------- the merge


def merge_adapter_file(base: str | os.PathLike, adapter_dir: str | os.PathLike, out: str | os.PathLike, *,
                       unmerge: bool = False, scale: float = 1.0, dtype: str | None = None,
                       allow_inexact: bool = False, _on_tensor: Any = None) -> list[dict]:
    """Write ``out`` (a .safetensors file or a model folder): the checkpoint ``base`` with the
    PEFT adapter in ``adapter_dir`` merged in (or taken out, ``unmerge=True``); ``scale``
    multiplies every module's alpha/r. Returns one summary dict per merged module: {"module",
    "tensor", "kind", "rank", "alpha", "scale", "dtype", "dora", "fan_in_fan_out", "bit_equal",
    "not_bit_equal_why", ...}. A module whose bit-equality with PEFT cannot be guaranteed (torch's
    summation order of its product not reproduced, ``minilora.peft.product``) is refused with
    MergeError unless ``allow_inexact``."""
    return merge_checkpoint(base, adapter_dir, out, unmerge=unmerge, scale=scale, dtype=dtype,
                            allow_inexact=allow_inexact,
                            progress=_on_tensor and (lambda name, done, total: _on_tensor(name)))["modules"]


def merge_checkpoint(base: str | os.PathLike, adapter_dir: str | os.PathLike, out: str | os.PathLike, *,
                     unmerge: bool = False, scale: float = 1.0, dtype: str | None = None,
                     allow_inexact: bool = False, progress: Any = None) -> dict:
    """``merge_adapter_file`` returning the whole summary: {"out", "files", "modules",
    "replaced": [{"tensor", "from"}], "not_bit_equal": [{"tensor", "module", "why"}] (the tensors
    not guaranteed to equal PEFT's bits), "tensors", "bytes"}. ``progress(name, bytes done, bytes total)``
    is called after each tensor is read."""
    base, out, adapter_dir = os.fspath(base), os.fspath(out), os.fspath(adapter_dir)
    for what, path in (("BASE", base), ("ADAPTER_DIR", adapter_dir), ("OUT", out)):
        if not path:
            raise MergeError(f"{what}: an empty path")
    if not math.isfinite(scale):
        raise MiniLoraValueError(f"--scale must be finite; got {scale}")
    target = None
    if dtype is not None:
        if dtype not in DTYPE_NAMES:
            raise MiniLoraValueError(f"--dtype must be one of {', '.join(DTYPE_NAMES)}; got {dtype!r}")
        target = DTYPE_NAMES[dtype]
    adapter, sources = load_for_merge(adapter_dir)
    if not _is_folder(out) and os.path.abspath(base) == os.path.abspath(out):
        raise MergeError(f"OUT must differ from BASE ({base}): the merge streams from BASE while writing OUT")
    ckpt = open_checkpoint(base)
    paths = check_outputs(out, ckpt, adapter_dir)
    plan = make_plan(adapter, sources, ckpt.entries, base, ckpt.config, unmerge=unmerge, allow_inexact=allow_inexact)
    created = _is_folder(out) and not os.path.isdir(out)
    if _is_folder(out):
        os.makedirs(out, exist_ok=True)
        groups = [(os.path.join(out, os.path.basename(s.path)) if ckpt.sharded else paths[0], [s]) for s in ckpt.shards]
    else:
        groups = [(out, ckpt.shards)]
    total = sum(e[3] - e[2] for e in ckpt.entries.values())
    state = {"done": 0, "path": out}
    weight_map: dict[str, str] = {}
    sizes = 0
    try:
        with atomic_files() as files:  # every file renamed at the end, none if anything fails
            for path, shards in groups:
                state["path"] = path
                dst = files.open(path, "wb")
                sizes += _write_file(dst, shards, plan, adapter, scale, unmerge, target, progress, state, total)
                weight_map.update({n: os.path.basename(path) for s in shards for n in s.entries})
            if _is_folder(out):
                _write_model_files(files, out, ckpt, weight_map, sizes, target, state)
    except BaseException as exc:
        if created:  # a folder this merge made and could not fill goes too
            with contextlib.suppress(OSError):
                os.rmdir(out)
        if isinstance(exc, OSError):
            raise _os_error(exc, str(state["path"]), ckpt.files()) from None
        raise
    rows = [{**r, "scale": r["scale"] * scale} for r in plan.rows]
    replaced = [{"tensor": b, "from": j.why} for b, j in plan.jobs.items() if j.replace is not None]
    inexact = [{"tensor": r["tensor"], "module": r["module"], "why": r["not_bit_equal_why"]} for r in rows
               if not r["bit_equal"]]
    return {"out": out, "files": paths, "unmerge": unmerge, "dtype": dtype, "modules": rows, "replaced": replaced,
            "not_bit_equal": inexact, "tensors": len(ckpt.entries), "bytes": total}


def _os_error(exc: OSError, path: str, inputs: list[str]) -> MergeError:
    """An OSError during the merge as one line naming the file: the output being written (not its
    hidden temp file), or an input that could not be read."""
    name = exc.filename if isinstance(exc.filename, str) else None
    base = os.path.basename(path)
    if name is None or (os.path.basename(name).startswith(f".{base}.") and name.endswith(".tmp")):
        name = path
    verb = "read" if name in inputs else "write"
    return MergeError(f"{name}: cannot {verb}: {exc.strerror or ' '.join(str(exc).split())}")


def _write_file(dst: Any, shards: list, plan: Any, adapter: Any, scale: float, unmerge: bool, target: str | None,
                progress: Any, state: dict, total: int) -> int:
    header: dict[str, Any] = {}
    metadata = shards[0].metadata
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for shard in shards:
        for name in shard.order():
            kind, shape, begin, end = shard.entries[name]
            new_kind = target if target and kind in FLOAT else kind
            size = (end - begin) // st.DTYPES[kind].itemsize * st.DTYPES[new_kind].itemsize
            header[name] = {"dtype": new_kind, "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    dst.write(struct.pack("<Q", len(text)) + text)
    for shard in shards:
        with open(shard.path, "rb") as fh:
            for name in shard.order():
                kind = shard.entries[name][0]
                raw = read_tensor(shard, fh, name)
                state["done"] += raw.nbytes
                if progress is not None:
                    progress(name, state["done"], total)
                if name in plan.jobs:
                    raw = _apply(adapter, plan.jobs[name], name, raw, kind, scale, unmerge)
                if target and kind in FLOAT and target != kind:
                    raw = _from_compute(_to_compute(raw, kind), target)
                dst.write(np.ascontiguousarray(raw).data)
    return offset


def _write_model_files(files: AtomicFiles, out: str, ckpt: Checkpoint, weight_map: dict, size: int, target: str | None,
                       state: dict) -> None:
    if ckpt.sharded:
        state["path"] = os.path.join(out, INDEX_NAME)
        index = {"metadata": {**ckpt.index_metadata, "total_size": size}, "weight_map": dict(sorted(weight_map.items()))}
        fh = files.open(state["path"], "w", encoding="utf-8")
        json.dump(index, fh, indent=2)
        fh.write("\n")
    if not ckpt.folder:
        return
    for name in ("config.json", *MODEL_FILES):
        src = os.path.join(ckpt.folder, name)
        if not os.path.isfile(src):
            continue
        state["path"] = os.path.join(out, name)
        if name == "config.json" and target is not None and ckpt.config is not None:
            config = dict(ckpt.config)
            for key in ("dtype", "torch_dtype"):
                if key in config:
                    config[key] = _TORCH_NAME[target]
            fh = files.open(state["path"], "w", encoding="utf-8")
            json.dump(config, fh, indent=2, sort_keys=True)
            fh.write("\n")
            continue
        dst = files.open(state["path"], "wb")
        with open(src, "rb") as s:
            shutil.copyfileobj(s, dst)


def _apply(adapter: Any, job: Job, name: str, raw: np.ndarray, kind: str, scale: float, unmerge: bool) -> np.ndarray:
    if job.replace is not None:  # PEFT loads the saved tensor over the base's (cast to the base dtype)
        raw = _from_compute(adapter.extra[job.replace].astype(np.float64), kind)
        if job.role == "replace":
            return raw
    module = job.module
    t = adapter.modules[module]
    s = adapter.scale(module) * scale
    value = _to_compute(raw, kind)
    cd = value.dtype
    with np.errstate(over="ignore", invalid="ignore"):
        if job.role == "bias":
            lb = t["lora_bias"].astype(cd) * cd.type(s)
            new = value - lb if unmerge else value + lb
        else:
            embedding = adapter.kinds.get(module) == "embedding"
            if not (embedding or unmerge or "m" in t):  # the common case: (B A) s + W, one rounding
                return _linear(module, name, value, t["B"], t["A"], cd.type(s), job.fan_in_fan_out, kind)
            elif "m" not in t:
                # PEFT rounds the delta to the base dtype before adding it for embeddings and for
                # unmerge (``delta.to(orig_dtype)``), not for a Linear merge (``weight.data += delta``);
                # the product B A in torch's order (float32), transposed for fan_in_fan_out
                delta = delta_weight(t["B"].astype(cd), t["A"].astype(cd), cd.type(s), job.fan_in_fan_out, kind)
                new = value - delta if unmerge else value + delta
            else:
                new = merge_weight(value, t["A"].astype(cd), t["B"].astype(cd), scale=cd.type(s),
                                   fan_in_fan_out=job.fan_in_fan_out, magnitude=t["m"].astype(cd))
    return _checked(module, name, new, _from_compute(new, kind), kind)


def delta_weight(B: np.ndarray, A: np.ndarray, s: Any, fan_in_fan_out: bool, kind: str) -> np.ndarray:
    """PEFT's ``get_delta_weight`` ``transpose(B @ A, fan_in_fan_out) * s`` in the compute dtype
    (the product in torch's order for float32), rounded to ``kind`` and back for float16/bfloat16
    (``delta.to(orig_dtype)``), with torch's bits. B (d_out, r), A (r, d_in) -> (d_out, d_in)
    ((d_in, d_out) for fan_in_fan_out). (The rounded Linear merge's recomputation near rounding
    boundaries does not pay here: without W the delta's sums are small against their error bound,
    and at 2048 x 16 x 2048 it recomputed 19% of a float16 delta (3.5% of a bfloat16 one), several times the whole product's
    cost.)"""
    P = torch_order_matmul(B, A) if B.dtype == np.float32 else np.matmul(B, A)
    delta = np.multiply(P.T if fan_in_fan_out else P, s, order="C")
    return _to_compute(_from_compute(delta, kind), kind) if kind in ("F16", "BF16") else delta


def _linear(module: str, name: str, value: np.ndarray, B: np.ndarray, A: np.ndarray, s: Any, fifo: bool,
            kind: str) -> np.ndarray:
    """W' = W + (B A) s (transposed for fan_in_fan_out) in the compute dtype, rounded to ``kind``,
    with torch's bits (``minilora.peft.product``): a float32 base gets the product summed in
    torch's order; a float16/bfloat16 base gets NumPy's fast product, and every element whose
    rounding the other summation order could change is computed again in torch's order
    (``minilora.peft.rounded_merge``). float64: NumPy's product as it is."""
    cd = value.dtype
    A, B = A.astype(cd, copy=False), B.astype(cd, copy=False)
    if kind in ("F16", "BF16"):
        out, new = rounded_linear_merge(value, B, A, s, fifo, kind)
        return _checked(module, name, new, out, kind)
    P = torch_order_matmul(B, A) if kind == "F32" else np.matmul(B, A)
    new = np.multiply(P.T if fifo else P, s, order="C")
    new += value
    return _checked(module, name, new, _from_compute(new, kind), kind)


def _checked(module: str, name: str, new: np.ndarray, out: np.ndarray, kind: str) -> np.ndarray:
    # one check on the rounded result: rounding keeps NaN and infinities, so a finite result means
    # a finite sum (bfloat16: exponent bits all ones is an infinity or a NaN)
    bad_out = ((out & np.uint16(0x7F80)) == np.uint16(0x7F80)).any() if kind == "BF16" else not np.isfinite(out).all()
    if bad_out:
        if not np.isfinite(new).all():
            bad = int(new.size - np.count_nonzero(np.isfinite(new)))
            raise NonFiniteError(f"module {module!r}: merging gives {bad} non-finite values in {name!r}; "
                                 "the adapter seems broken (OUT was not written)")
        raise NonFiniteError(f"module {module!r}: the merged {name!r} overflows {kind} (OUT was not written)")
    return out
