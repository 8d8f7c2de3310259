"""``minilora merge BASE ADAPTER_DIR OUT``: merge a PEFT LoRA adapter into a safetensors file
of base weights with NumPy alone (PEFT ``merge_and_unload``), one tensor at a time.

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
file and renamed at the end (``_io.atomic_open``), so a failure never leaves half of it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import struct
from typing import Any

import numpy as np

from . import safetensors_io as st
from ._io import atomic_open
from .cli import fail
from .errors import MiniLoraValueError, NonFiniteError, ShapeError

__all__ = ["merge_adapter_file", "MergeError", "register"]

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


def merged_tensor(W: np.ndarray, t: dict, *, scale: float, embedding: bool, fan_in_fan_out: bool,
                  unmerge: bool = False, round_delta: Any = None) -> np.ndarray:
    """One weight merged (or unmerged) in its compute dtype (float32 or float64), see the module
    docstring. W (d_out, d_in) [fan_in_fan_out: (d_in, d_out); embedding: (num, dim)]."""
    cd = W.dtype
    A, B = t["A"].astype(cd), t["B"].astype(cd)
    delta = (B @ A) * cd.type(scale)  # (d_out, d_in)
    if embedding or fan_in_fan_out:
        delta = delta.T
    if round_delta is not None:
        delta = round_delta(delta)
    if unmerge:
        return W - delta
    if "m" in t:  # DoRA: the row norm of W + delta, in (d_out, d_in) orientation
        total = W + delta
        rows = total.T if (embedding or fan_in_fan_out) else total
        factor = t["m"].astype(cd) / np.sqrt(np.sum(rows * rows, axis=1))
        return total * (factor[None, :] if (embedding or fan_in_fan_out) else factor[:, None])
    return W + delta


def merge_adapter_file(base: str | os.PathLike, adapter_dir: str | os.PathLike, out: str | os.PathLike, *,
                       unmerge: bool = False, scale: float = 1.0, _on_tensor: Any = None) -> list[dict]:
    """Write ``out``: the safetensors file ``base`` with the PEFT adapter in ``adapter_dir`` merged
    in (or taken out, ``unmerge=True``); ``scale`` multiplies every module's alpha/r. Returns one
    summary dict per merged module: {"module", "kind", "rank", "alpha", "scale", "dtype", "dora"}.
    """
    from .peft_files import load_peft_adapter

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
            new = merged_tensor(value, t, scale=s, embedding=embedding, fan_in_fan_out=adapter.fan_in_fan_out,
                                unmerge=unmerge,
                                round_delta=(lambda d: _to_compute(_from_compute(d, kind), kind)) if rounds else None)
    if not np.all(np.isfinite(new)):
        bad = int(new.size - np.count_nonzero(np.isfinite(new)))
        raise NonFiniteError(f"module {module!r}: merging gives {bad} non-finite values in {name!r}; "
                             "the adapter seems broken (OUT was not written)")
    out = _from_compute(new, kind)
    if kind != "F64" and not np.all(np.isfinite(_to_compute(out, kind))):
        raise NonFiniteError(f"module {module!r}: the merged {name!r} overflows {kind} (OUT was not written)")
    return out


# ---------------------------------------------------------------- command line


def register(sub: Any) -> None:
    p = sub.add_parser(
        "merge",
        help="merge a PEFT LoRA adapter into a safetensors file of base weights (NumPy only)",
        description="Write OUT = BASE with the PEFT LoRA adapter in ADAPTER_DIR merged into the weights it "
        "targets (HF module names), as PEFT's merge_and_unload does; each tensor keeps its dtype. "
        "Tensors are processed one at a time and OUT is written atomically.",
    )
    p.add_argument("base", metavar="BASE", help="base weights, a .safetensors file")
    p.add_argument("adapter", metavar="ADAPTER_DIR", help="folder with adapter_config.json and adapter_model.safetensors")
    p.add_argument("out", metavar="OUT", help="output .safetensors file")
    p.add_argument("--unmerge", action="store_true", help="subtract the adapter instead (BASE is a merged file)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every module's alpha/r by this (default 1)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not os.path.isfile(args.base):
        return fail(f"BASE {args.base}: file not found")
    folder = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(folder):
        return fail(f"OUT {args.out}: folder {folder} does not exist")
    summary = merge_adapter_file(args.base, args.adapter, args.out, unmerge=args.unmerge, scale=args.scale)
    if args.json:
        print(json.dumps({"out": args.out, "unmerge": args.unmerge, "modules": summary}, indent=2))
        return 0
    verb = "unmerged" if args.unmerge else "merged"
    print(f"{verb} {len(summary)} module(s) into {args.out}")
    for row in summary:
        extra = " dora" if row["dora"] else ""
        print(f"  {row['module']:<40} {row['kind']:<9} r={row['rank']:<4} alpha={row['alpha']:<8g} "
              f"scale={row['scale']:<10.6g} {row['dtype']}{extra}")
    return 0
