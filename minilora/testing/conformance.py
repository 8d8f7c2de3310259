"""The conformance properties: an adapter's answers against minilora's, within the bounds of
``minilora.testing.tolerance``. ``minilora check`` and the pytest suite both run ``check``.

Properties (each in every dtype the adapter lists; adam skips float16, init runs in float32):

    forward         y = x W^T + b + s ((x m) A^T) B^T, with the problem's dropout mask m
    grad_x, grad_A, grad_B   gradients of sum(y * g) for a random cotangent g
    merge           the merged base weight W + s B A (transposed for fan_in_fan_out)
    merged_forward  the merged layer's output, against the unmerged oracle (no dropout)
    unmerge         merging then unmerging gives W back
    adam            N Adam/AdamW steps on A and B fed a fixed gradient sequence
    init            a fresh adapter: B = 0 exactly; A drawn as minilora.lora_init draws it
    dora_*, embedding_*, trainable   DoRA, LoRA on an embedding, the trainable set under PEFT's
                    bias modes (``minilora.testing.variant_checks``; float64 and float32)

Cases (``minilora.testing.cases``): fixed edge cases that find structural bugs at any seed, and
``max_examples`` hypothesis cases per dtype drawn with ``seed`` (each dtype its own shapes), so a
run is reproducible. The reference for every case is minilora in float64 on the same
(dtype-rounded) inputs; the bounds follow the adapter's declared precision
(``minilora.testing.adapters.declared_precision``). Rows and verdicts: ``minilora.testing.report``.

Why adam skips float16: Adam's second moment starts at (1 - beta2) g^2 = 0.001 g^2, which is
below float16's smallest normal number (6.1e-5) for every |g| < 0.25, and its eps = 1e-8
rounds to 0 there; PyTorch's own advice is float32 optimizer state for float16 models.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from minilora.errors import MiniLoraValueError, one_line
from minilora.testing.adam_check import run_adam
from minilora.testing.adapters import (
    VARIANT_METHODS,
    adapter_adam_eps,
    adapter_dora_bias,
    adapter_dora_features,
    adapter_dtypes,
    adapter_features,
    adapter_optimizer_features,
    adapter_variant_dtypes,
    declared_precision,
    has_method,
    load_adapter,
)
from minilora.testing.cases import (
    ADAM_EDGE_CASES,
    EDGE_CASES,
    adam_cases,
    dtype_seed,
    edge_problems,
    layer_problems,
    needed_optimizer_features,
)
from minilora.testing.compare import Comparison, compare, detection_threshold
from minilora.testing.init_check import INIT_DTYPE, INIT_SHAPES, run_init
from minilora.testing.problems import LoraProblem
from minilora.testing.report import CheckReport, PropertyResult, severity
from minilora.testing.tolerance import lora_bounds
from minilora.testing.variant_checks import VARIANT_METHOD_OF, VARIANT_PROPERTIES, variant_pairs, variant_work

__all__ = [
    "PROPERTIES",
    "CORE_PROPERTIES",
    "ADAM_DTYPES",
    "PropertyResult",
    "CheckReport",
    "EDGE_CASES",
    "ADAM_EDGE_CASES",
    "edge_problems",
    "dtype_seed",
    "detection_threshold",
    "needed_optimizer_features",
    "planned",
    "check",
]

CORE_PROPERTIES = ("forward", "grad_x", "grad_A", "grad_B", "merge", "merged_forward", "unmerge", "adam", "init")
PROPERTIES = CORE_PROPERTIES + VARIANT_PROPERTIES
LAYER_PROPERTIES = PROPERTIES[:7]
ADAM_DTYPES = ("float64", "float32", "bfloat16")
METHOD_OF = {"forward": "forward", "grad_x": "grads", "grad_A": "grads", "grad_B": "grads", "merge": "merge",
             "merged_forward": "merge", "unmerge": "unmerge", "adam": "adam", "init": "init", **VARIANT_METHOD_OF}


def planned(adapter: Any, dtypes: Any = None, properties: Any = None) -> list[tuple[str, str]]:
    """The (property, dtype) pairs ``check`` runs for this adapter (rows of methods it lacks
    are planned too, and reported "n/a")."""
    have = adapter_dtypes(adapter)
    chosen = [d for d in have if dtypes is None or d in dtypes]
    props = [p for p in CORE_PROPERTIES if properties is None or p in properties]
    pairs = []
    for p in props:
        if p == "init":
            if callable(getattr(adapter, "init", None)) and bool(getattr(adapter, "inits", None)):
                dt = INIT_DTYPE if INIT_DTYPE in have else have[0]
                if dtypes is None or dt in dtypes:
                    pairs.append((p, dt))
            continue
        for d in chosen:
            if p == "adam" and d not in ADAM_DTYPES:
                continue
            pairs.append((p, d))
    return pairs + variant_pairs(adapter, dtypes, properties)


# ---------------------------------------------------------------- the oracle


def _oracle(p: LoraProblem, precision: dict, model: str = "worst") -> dict:
    """minilora in float64 on the problem's inputs: every expected output, and its bounds
    under the adapter's declared precision (``model``: the bound's, see ``dot_bound``)."""
    import autograd.numpy as anp

    import minilora as ml

    with ml.use_backend("numpy"):
        kw: dict[str, Any] = dict(scale=p.scale, fan_in_fan_out=p.fan_in_fan_out)
        y = ml.lora_dense(p.params, p.lora, p.x, dropout_mask=p.mask, **kw)

        def loss(x: Any, lora: dict) -> Any:
            return anp.sum(ml.lora_dense(p.params, lora, x, dropout_mask=p.mask, **kw) * p.cotangent)

        gx, glora = ml.grad(loss, argnum=(0, 1))(p.x, p.lora)
        merged = ml.merge(p.params, p.lora, **kw)["W"]
        y_plain = ml.lora_dense(p.params, p.lora, p.x, **kw)
    acc = precision["accumulate"]
    bkw: dict[str, Any] = dict(accumulate=acc, adapter=precision["adapter"], model=model, **kw)
    bounds = lora_bounds(p.params, p.lora, p.x, dtype=p.dtype, dropout_mask=p.mask, cotangent=p.cotangent, **bkw)
    plain = lora_bounds(p.params, p.lora, p.x, dtype=p.dtype, **bkw)["y"]
    return {
        "forward": (("y", y, bounds["y"]),),
        "grad_x": (("dx", gx, bounds["x"]),),
        "grad_A": (("dA", glora["A"], bounds["A"]),),
        "grad_B": (("dB", glora["B"], bounds["B"]),),
        "merge": (("W", merged, bounds["W"]),),
        "merged_forward": (("y", y_plain, plain),),
        "unmerge": (("W", p.W, bounds["W_back"]),),
    }


def _worst(comparisons: list[Comparison]) -> Comparison:
    return max(comparisons, key=severity)


def _gradient_entry(g: Any, key: str) -> Any:
    return g[key] if isinstance(g, dict) and key in g else None


def _run_layer(adapter: Any, p: LoraProblem, wanted: set, rows: dict, precision: dict) -> None:
    case = p.describe()
    try:
        expected = _oracle(p, precision)
    except MiniLoraValueError:
        # no worst-case bound at this width in this dtype (k u >= 1): the probabilistic one,
        # marked as such in the case's label and the row (PropertyResult.probable)
        expected = _oracle(p, precision, model="probable")
        case += " [probabilistic bound: no worst-case bound at this width]"
        for prop in wanted:
            rows[prop].probable += 1

    narrower = {**precision, "adapter": p.dtype, "accumulate": p.dtype}
    looser: list[dict] = []  # the oracle's bounds for the storage dtype throughout, when needed

    def record(prop: str, actual: dict) -> None:
        checks, thresholds = [], []
        for name, value, bound in expected[prop]:
            checks.append(compare(actual[name], value, bound, name=name))
            thresholds.append(detection_threshold(value, bound))
        worst = _worst(checks)
        rows[prop].add(worst, case, min(thresholds))
        if not worst.passed and narrower != precision:
            rows[prop].precision_evidence(_precision_hint(p, prop, actual, narrower, looser, precision))

    def call(props: tuple[str, ...], method: str) -> Any:
        try:
            return getattr(adapter, method)(p)
        except Exception as exc:  # the adapter's failure is this case's result, not a crash of the check
            for prop in props:
                rows[prop].fail(case, f"{method}() raised {one_line(exc)}", raised=True)
            return None

    if "forward" in wanted:
        y = call(("forward",), "forward")
        if y is not None:
            record("forward", {"y": y})
    grad_props = tuple(x for x in ("grad_x", "grad_A", "grad_B") if x in wanted)
    if grad_props:
        g = call(grad_props, "grads")
        if g is not None:
            for prop, key in (("grad_x", "x"), ("grad_A", "A"), ("grad_B", "B")):
                if prop in wanted:
                    if _gradient_entry(g, key) is None:
                        rows[prop].fail(case, f"grads() returned no {key!r} entry (expected {{'x', 'A', 'B'}})")
                    else:
                        record(prop, {f"d{key}": g[key]})
    merge_props = tuple(x for x in ("merge", "merged_forward") if x in wanted)
    if merge_props:
        m = call(merge_props, "merge")
        if m is not None:
            for prop, key in (("merge", "W"), ("merged_forward", "y")):
                if prop in wanted:
                    if not isinstance(m, dict) or key not in m:
                        rows[prop].fail(case, f"merge() returned no {key!r} entry (expected {{'W', 'y'}})")
                    else:
                        record(prop, {key: m[key]})
    if "unmerge" in wanted:
        w = call(("unmerge",), "unmerge")
        if w is not None:
            record("unmerge", {"W": w})


def _precision_hint(p: LoraProblem, prop: str, actual: dict, narrower: dict, looser: list,
                    declared: dict) -> str | bool | None:
    """For a failed case: the hint (a str) when its error is within the worst-case bounds of the
    storage dtype used throughout (no wider factors, no wider sums), so that a declaration wider
    than what the implementation really does would explain it; False when it is not (a wrong
    formula, whatever the precision); None when the storage dtype has no worst-case bound here (no
    evidence either way)."""
    if not looser:
        try:
            looser.append(_oracle(p, narrower))
        except MiniLoraValueError:
            looser.append({})
    if not looser[0]:
        return None
    for name, value, bound in looser[0][prop]:
        if not compare(actual[name], value, bound, name=name).passed:
            return False
    wide = ", ".join(f"{k}={declared[k]}" for k in ("adapter", "accumulate") if declared[k] != p.dtype)
    return (f"the error fits {p.dtype} arithmetic throughout: if the implementation stores or sums in "
            f"{p.dtype} where it declares {wide}, the declaration is what is wrong")




def _versions(adapter: Any) -> dict:
    import minilora

    out = {"python": platform.python_version(), "numpy": np.__version__, "minilora": minilora.__version__}
    try:
        out.update({str(k): str(v) for k, v in (adapter.versions() if hasattr(adapter, "versions") else {}).items()})
    except Exception as exc:
        out["adapter_versions_error"] = one_line(exc)
    return out


def check(
    target: Any,
    *,
    dtypes: Any = None,
    properties: Any = None,
    max_examples: int = 20,
    seed: int = 0,
    progress: Callable[[str, int, int], None] | None = None,
) -> CheckReport:
    """Run the conformance properties against ``target`` (a name for ``load_adapter``, a
    class or an adapter). ``progress(label, done, total)`` is called as cases finish."""
    start = time.perf_counter()
    adapter = load_adapter(target)
    name = target if isinstance(target, str) else getattr(adapter, "name", type(adapter).__name__)
    pairs = planned(adapter, dtypes, properties)
    rows = {pair: PropertyResult(*pair) for pair in pairs}
    features = adapter_features(adapter)
    for (prop, _dt), row in rows.items():
        if not has_method(adapter, METHOD_OF[prop]):
            row.na = f"the adapter has no {METHOD_OF[prop]}() method"
    by_dtype: dict[str, list[str]] = {}
    for prop, dt in pairs:
        if rows[(prop, dt)].na is None and prop in CORE_PROPERTIES:
            by_dtype.setdefault(dt, []).append(prop)

    work: list[tuple[str, Callable[..., None]]] = []
    for dt, props in by_dtype.items():
        precision = declared_precision(adapter, dt)
        layer = [x for x in props if x in LAYER_PROPERTIES]
        if layer:
            problems = edge_problems(dt, features) + layer_problems(dt, features, max_examples, seed)
            view = {x: rows[(x, dt)] for x in layer}
            for prob in problems:
                work.append((f"layer {dt}", lambda prob=prob, view=view, layer=layer, precision=precision:
                             _run_layer(adapter, prob, set(layer), view, precision)))
        if "adam" in props:
            for aprob in adam_cases(dt, max_examples, seed):
                work.append((f"adam {dt}", lambda aprob=aprob, dt=dt, precision=precision:
                             run_adam(adapter, aprob, rows[("adam", dt)], precision)))
        if "init" in props:
            for i, init in enumerate(getattr(adapter, "inits", ())):
                for j, shape in enumerate(INIT_SHAPES):
                    work.append((f"init {init}", lambda i=i, j=j, init=init, dt=dt, shape=shape:
                                 run_init(adapter, init, seed * 101 + 2 * i + j, shape, rows[("init", dt)])))
    work += variant_work(adapter, rows, max_examples, seed)
    for done, (label, job) in enumerate(work, start=1):
        job()
        if progress is not None:
            progress(label, done, len(work))
    report = CheckReport(name, _versions(adapter), seed, max_examples, list(rows.values()))
    report.declared = _declared(adapter)
    report.seconds = time.perf_counter() - start
    return report


def _declared(adapter: Any) -> dict:
    """What the adapter declared, for the report."""
    return {
        "dtypes": list(adapter_dtypes(adapter)),
        "features": sorted(adapter_features(adapter)),
        "optimizer_features": sorted(adapter_optimizer_features(adapter)),
        "adam_eps": adapter_adam_eps(adapter),
        "dora_bias": adapter_dora_bias(adapter),
        "inits": list(getattr(adapter, "inits", ())),
        "dora_features": sorted(adapter_dora_features(adapter)),
        "variant_dtypes": list(adapter_variant_dtypes(adapter)),
        "methods": [m for m in ("forward", "grads", "merge", "unmerge", "adam", "init", *VARIANT_METHODS)
                    if has_method(adapter, m)],
        "precision": {dt: declared_precision(adapter, dt) for dt in adapter_dtypes(adapter)},
        "known_differences": list(getattr(adapter, "known_differences", ())),
    }
