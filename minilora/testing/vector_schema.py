"""The golden vectors' manifest schema, checked before anything in a manifest is used: every
field's type and range, every case's operation, inputs, options and outputs. A malformed
manifest raises ``VectorsError`` naming the manifest and the field (``groups[2].cases[0].options.scale``),
never a KeyError or TypeError from deep inside ``verify`` (docs/vectors.md describes the format).
"""

from __future__ import annotations

import math
import re
from typing import Any

from minilora.testing.vector_cases import VectorsError

__all__ = ["OPERATIONS", "check_manifest"]

# operation -> (the inputs it needs, the inputs it may have, the outputs it gives)
OPERATIONS: dict[str, tuple[frozenset[str], frozenset[str], frozenset[str]]] = {
    "lora_dense": (frozenset({"x", "W", "A", "B"}), frozenset({"b", "mask", "g"}), frozenset({"y"})),
    "lora_dense_vjp": (frozenset({"x", "W", "A", "B", "g"}), frozenset({"b", "mask"}), frozenset({"dx", "dA", "dB"})),
    "merge": (frozenset({"W", "A", "B"}), frozenset({"x", "b", "mask", "g"}), frozenset({"W"})),
    "unmerge": (frozenset({"W", "A", "B"}), frozenset({"x", "b", "mask", "g"}), frozenset({"W"})),
    "adam_steps": (frozenset({"A", "B"}), frozenset(), frozenset({"A", "B"})),
    "dora_dense": (frozenset({"x", "W", "A", "B", "m"}), frozenset({"b", "mask", "g"}), frozenset({"y"})),
    "dora_dense_vjp": (frozenset({"x", "W", "A", "B", "m", "g"}), frozenset({"b", "mask"}),
                       frozenset({"dx", "dA", "dB", "dm"})),
    "dora_merge": (frozenset({"W", "A", "B", "m"}), frozenset({"x", "b", "mask", "g"}), frozenset({"W"})),
    "embedding": (frozenset({"ids", "W", "A", "B"}), frozenset({"g"}), frozenset({"y"})),
    "embedding_vjp": (frozenset({"ids", "W", "A", "B", "g"}), frozenset(), frozenset({"dA", "dB"})),
    "embedding_merge": (frozenset({"W", "A", "B"}), frozenset({"ids", "g"}), frozenset({"W"})),
}
EXPECT = ("ok", "error")
SHA256 = re.compile(r"[0-9a-f]{64}")
MAX_ADAM_STEPS = 10_000  # each step needs its own gradient tensors: far more than any real manifest


class _Where:
    """Builds the error for one field of one manifest."""

    def __init__(self, path: str) -> None:
        self.path = path

    def error(self, field: str, message: str) -> VectorsError:
        return VectorsError(f"{self.path}: malformed manifest: {field} {message}")

    def kind(self, value: Any, kinds: type | tuple[type, ...], field: str, what: str) -> Any:
        if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
            raise self.error(field, f"must be {what}; got {value!r}")
        if not isinstance(value, kinds):
            raise self.error(field, f"must be {what}; got {type(value).__name__} {_short(value)}")
        return value

    def number(self, value: Any, field: str, *, low: float | None = None, high: float | None = None,
               high_open: bool = False) -> float:
        self.kind(value, (int, float), field, "a number")
        v = float(value) if abs(value) < 1e308 or isinstance(value, float) else math.inf
        if not math.isfinite(v) or (low is not None and v < low) or (high is not None and (
                v > high or (high_open and v == high))):
            bounds = f" in [{low}, {high}{')' if high_open else ']'}" if high is not None else (
                f" >= {low}" if low is not None else "")
            raise self.error(field, f"must be a finite number{bounds}; got {_short(value)}")
        return v

    def integer(self, value: Any, field: str, *, low: int = 0, high: int | None = None) -> int:
        self.kind(value, int, field, "an integer")
        if value < low or (high is not None and value > high):
            raise self.error(field, f"must be an integer in [{low}, {high if high is not None else 'inf'}]; got "
                                    f"{_short(value)}")
        return value

    def strings(self, value: Any, field: str) -> dict[str, str]:
        self.kind(value, dict, field, "an object of strings")
        for k, v in value.items():
            self.kind(v, str, f"{field}.{k}", "a string (a tensor name)")
        return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_manifest(manifest: dict, path: str, error_kinds: Any) -> None:
    """Refuse a manifest (already a dict with schema_version, files and groups of the right JSON
    types) whose fields do not follow the schema; ``error_kinds``: the known ``error`` values."""
    w = _Where(path)
    for name, info in manifest["files"].items():
        field = f"files.{name}"
        w.kind(info, dict, field, "an object with sha256 and bytes")
        sha = w.kind(info.get("sha256"), str, f"{field}.sha256", "a string of 64 hex digits")
        if not SHA256.fullmatch(sha):
            raise w.error(f"{field}.sha256", f"must be 64 lowercase hex digits; got {_short(sha)}")
        if "bytes" in info:
            w.integer(info["bytes"], f"{field}.bytes")
    for g, group in enumerate(manifest["groups"]):
        field = f"groups[{g}]"
        w.kind(group, dict, field, "an object")
        w.kind(group.get("file"), str, f"{field}.file", "a file name listed in 'files'")
        if group["file"] not in manifest["files"]:
            raise w.error(f"{field}.file", f"names {_short(group['file'])}, which is not listed in 'files'")
        cases = w.kind(group.get("cases"), list, f"{field}.cases", "a list of cases")
        for c, case in enumerate(cases):
            _check_case(w, case, f"{field}.cases[{c}]", error_kinds)


def _check_case(w: _Where, case: Any, field: str, error_kinds: Any) -> None:
    w.kind(case, dict, field, "an object (a case)")
    w.kind(case.get("id"), str, f"{field}.id", "a string")
    op = w.kind(case.get("operation"), str, f"{field}.operation", "a string")
    if op not in OPERATIONS:
        raise w.error(f"{field}.operation", f"must be one of {', '.join(OPERATIONS)}; got {_short(op)}")
    expect = case.get("expect", "ok")
    if expect not in EXPECT:
        raise w.error(f"{field}.expect", f"must be 'ok' or 'error'; got {_short(expect)}")
    if expect == "error":
        if op == "adam_steps":
            raise w.error(f"{field}.operation", "adam_steps cases cannot expect an error")
        if not isinstance(case.get("error"), str) or case["error"] not in error_kinds:
            raise w.error(f"{field}.error", f"must be one of {', '.join(error_kinds)}; got {_short(case.get('error'))}")
    needed, optional, outputs = OPERATIONS[op]
    inputs = w.strings(case.get("inputs"), f"{field}.inputs")
    options = w.kind(case.get("options"), dict, f"{field}.options", "an object")
    if op == "adam_steps":
        steps = _check_adam_options(w, options, f"{field}.options")
        needed = needed | {f"grads/{t}/{k}" for t in range(1, steps + 1) for k in ("A", "B")}
        optional = needed
    else:
        w.number(options.get("scale"), f"{field}.options.scale")
        w.kind(options.get("fan_in_fan_out"), bool, f"{field}.options.fan_in_fan_out", "true or false")
    missing, extra = needed - set(inputs), set(inputs) - needed - optional
    if missing:
        raise w.error(f"{field}.inputs", f"lacks {', '.join(sorted(missing))} (needed by {op})")
    if extra:
        raise w.error(f"{field}.inputs", f"has {', '.join(sorted(extra))}, which {op} does not take")
    shapes = w.kind(case.get("shapes", {}), dict, f"{field}.shapes", "an object of shapes")
    for k, shape in shapes.items():
        w.kind(shape, list, f"{field}.shapes.{k}", "a list of sizes")
        if len(shape) > 64:
            raise w.error(f"{field}.shapes.{k}", f"has {len(shape)} dimensions (at most 64)")
        for i, n in enumerate(shape):
            w.integer(n, f"{field}.shapes.{k}[{i}]")
    outs = w.kind(case.get("outputs", {}), dict, f"{field}.outputs", "an object of outputs")
    if expect == "ok" and not outs:
        raise w.error(f"{field}.outputs", "is empty: a case that expects 'ok' must give its outputs")
    for name, entry in outs.items():
        out = f"{field}.outputs.{name}"
        if name not in outputs:
            raise w.error(out, f"is not an output of {op} (its outputs: {', '.join(sorted(outputs))})")
        w.kind(entry, dict, out, "an object with tensor and bound")
        w.kind(entry.get("tensor"), str, f"{out}.tensor", "a string (a tensor name)")
        bound = w.strings(entry.get("bound"), f"{out}.bound")
        if "float64" not in bound:
            raise w.error(f"{out}.bound", "lacks float64 (the bound verify checks against)")


def _check_adam_options(w: _Where, o: dict, field: str) -> int:
    steps = w.integer(o.get("steps"), f"{field}.steps", low=1, high=MAX_ADAM_STEPS)
    for key, low in (("lr", 0.0), ("eps", 0.0), ("weight_decay", 0.0)):
        if key in o:
            w.number(o[key], f"{field}.{key}", low=low)
    if "betas" in o:
        betas = w.kind(o["betas"], list, f"{field}.betas", "a list [beta1, beta2]")
        if len(betas) != 2:
            raise w.error(f"{field}.betas", f"must be [beta1, beta2]; got {_short(betas)}")
        for i, b in enumerate(betas):
            w.number(b, f"{field}.betas[{i}]", low=0.0, high=1.0, high_open=True)
    for key in ("decoupled", "amsgrad", "maximize"):
        if key in o:
            w.kind(o[key], bool, f"{field}.{key}", "true or false")
    return steps
