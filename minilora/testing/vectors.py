"""Golden vectors: minilora's answers on fixed LoRA problems, for implementations in any language.

``export(folder)`` writes ``manifest.json`` and one safetensors file per group; ``verify(folder)``
recomputes every case with the oracle and checks it against the files, their SHA-256 and the
schema. docs/vectors.md documents the format. Every valid input is a multiple of 1/32 below 4 in
magnitude, so it is exact in float16, bfloat16, float32 and float64 alike (with a power-of-two
scale even the expected outputs are exact). Export is deterministic: the same minilora writes the
same bytes, so two vector sets can be compared with ``diff -r`` or ``sha256sum``.

Groups: ``forward`` (lora_dense), ``gradients`` (of sum(y * g) with respect to x, A, B),
``merge`` (merge and unmerge), ``adam`` (Adam/AdamW fed fixed gradients), ``invalid``
(inputs an implementation must refuse: shapes that do not fit, a merge that overflows or
meets a NaN), ``dora``, ``embedding`` and ``trainable`` (``minilora.testing.vector_variants``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from minilora.errors import MiniLoraError, NonFiniteError, ShapeError
from minilora.formats.fileio import atomic_files, read_json
from minilora.formats.safetensors import SafetensorsError, load_bytes, save_bytes
from minilora.testing.vector_cases import (
    ADAM_CASES,
    LAYER_CASES,
    VectorsError,
    _adam_case,
    _adam_kw,
    _bound,
    _eight_bits,
    _invalid_cases,
    _layer_case,
    _layer_tolerance,
    _run_adam,
    _run_layer,
)
from minilora.testing.vector_schema import check_manifest
from minilora.testing.vector_variants import VARIANT_GROUPS, VARIANT_OPERATIONS, run_variant, variant_groups

__all__ = ["SCHEMA_VERSION", "VectorsError", "VerifyReport", "export", "verify"]

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
BOUND_DTYPES = ("float64", "float32")
ERROR_KINDS: dict[str, type[Exception]] = {"shape": ShapeError, "non_finite": NonFiniteError}
# a vector set must exercise each of these groups: verify fails a set that drops one (a reader that
# passes "all cases" of a set without its invalid inputs has checked nothing about refusals)
REQUIRED_GROUPS = ("forward", "gradients", "merge", "adam", *VARIANT_GROUPS, "invalid")

CONVENTIONS = (
    "Shapes follow PyTorch/PEFT: W (d_out, d_in) [fan_in_fan_out: (d_in, d_out)], b (d_out,), A (r, d_in), "
    "B (d_out, r), x (..., d_in). lora_dense: y = x W^T + b + scale ((x * mask) A^T) B^T with scale = alpha/r "
    "(alpha/sqrt(r) with rslora; given as options.scale); a missing b or mask means none. lora_dense_vjp: the "
    "gradients of sum(y * g) with respect to x, A and B. merge: W + scale B A; unmerge: W - scale B A "
    "(B A transposed for fan_in_fan_out). adam_steps: torch.optim.Adam (AdamW when decoupled) on {A, B}, "
    "fed the gradients grads/<t>/A and grads/<t>/B at steps t = 1..steps. dora_dense: y = x W^T + b + (c - 1) "
    "((x * mask) W^T) + c scale ((x * mask) A^T) B^T with c = m / ||W + scale B A|| per output row (the norm "
    "held constant in dora_dense_vjp, which gives dx, dA, dB, dm); dora_merge: c (W + scale B A) row by row. "
    "embedding: y = W[ids] + scale A^T[ids] B^T with W (num, dim), A (r, num), B (dim, r), ids integers stored "
    "as F64; embedding_vjp: dA, dB; embedding_merge: W + scale (B A)^T. trainable_set: 1 for each name in "
    "options.parameters that PEFT trains under options.bias (and use_dora), 0 for the others."
)
TOLERANCE_RULE = (
    "Pass when |actual - expected| <= bound elementwise. bound.<dtype> = 2 (gamma_k(u) M + k eta) for that "
    "dtype plus the same for float64 (the reference's own rounding), with gamma_k = k u / (1 - k u), "
    "k = reduction_length, M = the tensor named by magnitude, u = 2^-53, 2^-24, 2^-11, 2^-8 for float64, "
    "float32, float16, bfloat16 and eta = 2^-1074, 2^-149, 2^-24, 2^-133 (docs/tolerance.md). adam bounds "
    "come from minilora.testing.adam_bounds and have no single k."
)




# ---------------------------------------------------------------- export


def _layer_group(name: str, op: str, comment: str, seed0: int) -> tuple[dict, dict]:
    tensors: dict[str, np.ndarray] = {}
    cases = []
    for i, spec in enumerate(LAYER_CASES):
        a, o = _layer_case(spec, seed0 + i)
        if op == "unmerge":  # start from the merged weight, cut to 8 bits to stay exact in every dtype
            a = {**a, "W": _eight_bits(_run_layer("merge", a, o)["W"])}
        used = {"lora_dense": ("x", "W", "b", "A", "B", "mask"),
                "lora_dense_vjp": ("x", "W", "b", "A", "B", "mask", "g"),
                "merge": ("W", "A", "B"), "unmerge": ("W", "A", "B")}[op]
        a = {k: v for k, v in a.items() if k in used}
        cid = f"{name}/{spec['id']}" if op != "unmerge" else f"{name}/unmerge_{spec['id']}"
        case: dict[str, Any] = {"id": cid, "comment": spec["comment"], "operation": op, "expect": "ok",
                "options": o if op in ("lora_dense", "lora_dense_vjp") else
                {k: o[k] for k in ("alpha", "rank", "rslora", "scale", "fan_in_fan_out")},
                "shapes": {k: list(v.shape) for k, v in a.items()},
                "inputs": {}, "outputs": {}}
        for k, v in a.items():
            tensors[f"{cid}/{k}"] = v
            case["inputs"][k] = f"{cid}/{k}"
        outputs = _run_layer(op, a, o)
        for out_name, (k, M) in _layer_tolerance(op, a, o).items():
            base = f"{cid}/out/{out_name}"
            tensors[base] = np.asarray(outputs[out_name], dtype=np.float64)
            tensors[f"{base}.magnitude"] = M
            entry: dict[str, Any] = {"tensor": base, "reduction_length": k, "magnitude": f"{base}.magnitude", "bound": {}}
            for dt in BOUND_DTYPES:
                tensors[f"{base}.bound.{dt}"] = _bound(k, M, dt)
                entry["bound"][dt] = f"{base}.bound.{dt}"
            case["outputs"][out_name] = entry
        cases.append(case)
    return {"name": name, "comment": comment, "cases": cases}, tensors


def _groups() -> list[tuple[dict, dict]]:
    from minilora.testing.adam_tolerance import adam_bounds

    groups = [
        _layer_group("forward", "lora_dense", "y = x W^T + b + scale ((x * mask) A^T) B^T", 1000),
        _layer_group("gradients", "lora_dense_vjp", "gradients of sum(y * g) with respect to x, A and B", 2000),
    ]
    merge_group, merge_tensors = _layer_group("merge", "merge", "W + scale B A, and back", 3000)
    unmerge_group, unmerge_tensors = _layer_group("merge", "unmerge", "", 3000)
    merge_group["cases"] += unmerge_group["cases"]
    groups.append((merge_group, {**merge_tensors, **unmerge_tensors}))

    tensors: dict[str, np.ndarray] = {}
    cases = []
    for i, spec in enumerate(ADAM_CASES):
        a, o = _adam_case(spec, 4000 + i)
        cid = f"adam/{spec['id']}"
        result = _run_adam(a, o)
        grads = [{k: a[f"grads/{t}/{k}"] for k in ("A", "B")} for t in range(1, o["steps"] + 1)]
        case: dict[str, Any] = {"id": cid, "comment": spec["comment"], "operation": "adam_steps", "expect": "ok", "options": o,
                "shapes": {k: list(v.shape) for k, v in a.items()},
                "inputs": {k: f"{cid}/{k}" for k in a}, "outputs": {}}
        for k, v in a.items():
            tensors[f"{cid}/{k}"] = v
        for k in ("A", "B"):
            base = f"{cid}/out/{k}"
            tensors[base] = result[k]
            entry: dict[str, Any] = {"tensor": base, "reduction_length": None, "magnitude": None, "bound": {}}
            for dt in BOUND_DTYPES:
                tensors[f"{base}.bound.{dt}"] = adam_bounds({"A": a["A"], "B": a["B"]}, grads, dtype=dt,
                                                            **_adam_kw(o))[k]
                entry["bound"][dt] = f"{base}.bound.{dt}"
            case["outputs"][k] = entry
        cases.append(case)
    groups.append(({"name": "adam", "comment": "Adam/AdamW steps on {A, B} fed fixed gradients", "cases": cases},
                   tensors))

    groups += variant_groups()  # dora, embedding
    tensors = {}
    cases = []
    for cid, comment, op, kind, a, o in _invalid_cases():
        cid = f"invalid/{cid}"
        for k, v in a.items():
            tensors[f"{cid}/{k}"] = v
        cases.append({"id": cid, "comment": comment, "operation": op, "expect": "error", "error": kind,
                      "options": o, "shapes": {k: list(v.shape) for k, v in a.items()},
                      "inputs": {k: f"{cid}/{k}" for k in a}, "outputs": {}})
    groups.append(({"name": "invalid", "comment": "inputs an implementation must refuse (error: 'shape' for "
                    "sizes that do not fit, 'non_finite' for a merge that would give inf or NaN)",
                    "cases": cases}, tensors))
    return groups


def export(folder: str | os.PathLike) -> list[str]:
    """Write the golden vectors into ``folder`` (created if missing; its parent must exist).
    Returns the paths written. Each file is written atomically, the manifest last."""
    from minilora import __version__

    folder = os.fspath(folder)
    parent = os.path.dirname(os.path.abspath(folder))
    if not os.path.isdir(parent):
        raise VectorsError(f"{folder}: the folder above it ({parent}) does not exist")
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise VectorsError(f"{folder}: exists and is not a folder")
    created = not os.path.isdir(folder)
    os.makedirs(folder, exist_ok=True)
    try:
        return _export(folder, __version__)
    except BaseException:
        if created:  # a folder this export made and could not fill goes too (its files were temp files)
            with contextlib.suppress(OSError):
                os.rmdir(folder)
        raise


def _export(folder: str, __version__: str) -> list[str]:
    manifest: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION, "format": "minilora golden vectors", "minilora_version": __version__,
        "conventions": CONVENTIONS, "tolerance_rule": TOLERANCE_RULE, "bound_dtypes": list(BOUND_DTYPES),
        "files": {}, "groups": [],
    }
    written = []
    # every file goes to a temp file, and all are renamed at the end: a failure (a full disk, a
    # signal) leaves the folder as it was, never new group files under an old manifest
    with atomic_files() as files:
        for group, tensors in _groups():
            filename = f"{group['name']}.safetensors"
            path = os.path.join(folder, filename)
            data = save_bytes(tensors, {"minilora_version": __version__, "group": group["name"]})
            files.open(path, "wb").write(data)
            manifest["files"][filename] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
            manifest["groups"].append({**group, "file": filename})
            written.append(path)
        path = os.path.join(folder, MANIFEST)
        fh = files.open(path, "w", encoding="utf-8")
        json.dump(manifest, fh, indent=1, allow_nan=False)
        fh.write("\n")
        written.append(path)
    return written


# ---------------------------------------------------------------- verify


@dataclass
class VerifyReport:
    folder: str
    minilora_version: str
    groups: int = 0
    cases: int = 0
    outputs: int = 0  # expected outputs compared (ok cases) plus refusals checked (error cases)
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures


def _manifest(folder: str) -> dict:
    path = os.path.join(folder, MANIFEST)
    if not os.path.isdir(folder):
        raise VectorsError(f"{folder}: no such folder")
    manifest = read_json(path, VectorsError, invalid="not valid JSON", unique_keys=True,
                         missing=f"missing (is {folder} a vector folder from `minilora vectors export`?)")
    if not isinstance(manifest, dict):
        raise VectorsError(f"{path}: expected a JSON object; got {type(manifest).__name__}")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise VectorsError(
            f"{path}: schema version {version!r} is not supported: this minilora reads version {SCHEMA_VERSION} "
            "(export the vectors again with this minilora, or use the minilora that wrote them)"
        )
    for key, kind in (("files", dict), ("groups", list)):
        if not isinstance(manifest.get(key), kind):
            raise VectorsError(f"{path}: malformed: {key!r} must be a JSON {kind.__name__}")
    check_manifest(manifest, path, tuple(ERROR_KINDS))
    return manifest


def _load_file(folder: str, filename: str, info: Any) -> dict[str, np.ndarray]:
    path = os.path.join(folder, filename)
    if not isinstance(info, dict) or not isinstance(info.get("sha256"), str):
        raise VectorsError(f"{os.path.join(folder, MANIFEST)}: malformed entry for {filename!r} (needs sha256)")
    if os.path.basename(filename) != filename:
        raise VectorsError(f"{os.path.join(folder, MANIFEST)}: file name {filename!r} must not contain a folder")
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise VectorsError(f"{path}: missing (listed in {MANIFEST})") from None
    except OSError as exc:
        raise VectorsError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        tensors = load_bytes(data, name=path)
    except SafetensorsError as exc:
        raise VectorsError(str(exc)) from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != info["sha256"]:
        raise VectorsError(
            f"{path}: SHA-256 mismatch: {MANIFEST} says {info['sha256']}, the file hashes to {digest} "
            "(the file was changed after export)"
        )
    return tensors


def verify(folder: str | os.PathLike) -> VerifyReport:
    """Check a vector folder: manifest schema, every file's presence, format and SHA-256, and
    every case against the oracle within the float64 bound (invalid cases: refused with the
    stated error). Unreadable input raises ``VectorsError``; case mismatches are collected in
    the report's ``failures``."""
    from minilora import __version__

    folder = os.fspath(folder)
    manifest = _manifest(folder)
    files = {name: _load_file(folder, name, info) for name, info in manifest["files"].items()}
    report = VerifyReport(folder, __version__)
    for group in manifest["groups"]:
        if not isinstance(group, dict) or group.get("file") not in files:
            raise VectorsError(f"{os.path.join(folder, MANIFEST)}: a group names a file not listed in 'files'")
        report.groups += 1
        path = os.path.join(folder, group["file"])
        tensors = files[group["file"]]
        cases = group.get("cases", [])
        if not cases:
            report.failures.append(f"group {group.get('name')!r} in {path} has no cases: nothing to check")
        for case in cases:
            report.cases += 1
            message = _verify_case(case, tensors, path)
            if message:
                report.failures.append(message)
            elif isinstance(case, dict) and case.get("expect") != "error" and not case.get("outputs"):
                report.failures.append(f"{case.get('id', '?')}: has no outputs to check in {path}")
            else:
                report.outputs += max(1, len(case.get("outputs") or ())) if isinstance(case, dict) else 0
    report.failures.extend(_coverage_failures(manifest, report, folder))
    return report


def _coverage_failures(manifest: dict, report: VerifyReport, folder: str) -> list[str]:
    """A set with nothing to check fails: no groups, a required group missing, nothing compared."""
    where = os.path.join(folder, MANIFEST)
    names = [g.get("name") for g in manifest["groups"] if isinstance(g, dict)]
    out = [f"{where}: the required group {name!r} is missing (a vector set has {', '.join(REQUIRED_GROUPS)})"
           for name in REQUIRED_GROUPS if name not in names]
    if report.outputs == 0:
        out.append(f"{where}: nothing to check: {report.groups} groups, {report.cases} cases and no expected "
                   "output or refusal among them")
    return out


def _tensor(tensors: dict, name: Any, path: str, cid: str) -> np.ndarray:
    if not isinstance(name, str) or name not in tensors:
        raise VectorsError(f"{path}: tensor {name!r} of case {cid!r} is missing")
    return tensors[name]


def _verify_case(case: dict, tensors: dict, path: str) -> str:
    from minilora.testing.compare import compare

    cid = case.get("id", "?")
    try:
        a = {k: _tensor(tensors, v, path, cid) for k, v in case["inputs"].items()}
        o = case["options"]
        op = case["operation"]
    except (KeyError, TypeError, AttributeError) as exc:
        raise VectorsError(f"{path}: case {cid!r} is malformed in {MANIFEST} ({exc!r})") from None
    for k, shape in case.get("shapes", {}).items():
        if k in a and list(a[k].shape) != list(shape):
            return f"{cid}: input {k} has shape {list(a[k].shape)} in {path}; the manifest says {shape}"
    if case.get("expect") == "error":
        kind = ERROR_KINDS.get(str(case.get("error")))
        if kind is None:
            raise VectorsError(f"{path}: case {cid!r} has unknown error kind {case.get('error')!r}")
        try:
            with np.errstate(all="ignore"):  # the overflow is the point of the case
                _run_layer(op, a, o)
        except kind:
            return ""
        except MiniLoraError as exc:
            return f"{cid}: minilora refused it with {type(exc).__name__} ({exc}); expected a {case['error']} error"
        return f"{cid}: minilora accepted it; expected a {case['error']} error ({case.get('comment', '')})"
    try:
        if op == "adam_steps":
            got = _run_adam(a, o)
        else:
            got = run_variant(op, a, o) if op in VARIANT_OPERATIONS else _run_layer(op, a, o)
    except MiniLoraError as exc:
        return f"{cid}: minilora refused the inputs in {path}: {exc}"
    for name, entry in case["outputs"].items():
        expected = _tensor(tensors, entry["tensor"], path, cid)
        bound = _tensor(tensors, entry["bound"]["float64"], path, cid)
        c = compare(got[name], expected, bound, name=name)
        if not c.passed:
            return f"{cid}: {c.describe('float64')}"
    return ""
