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

Cases: fixed edge cases (rank 1, rank = min(d_in, d_out), a batch of one, a 3-D input) and
``max_examples`` hypothesis cases drawn with ``seed``, so a run is reproducible. The reference
for every case is minilora in float64 on the same (dtype-rounded) inputs.

Why adam skips float16: Adam's second moment starts at (1 - beta2) g^2 = 0.001 g^2, which is
below float16's smallest normal number (6.1e-5) for every |g| < 0.25, and its eps = 1e-8
rounds to 0 there; PyTorch's own advice is float32 optimizer state for float16 models.
"""

from __future__ import annotations

import math
import platform
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from minilora.errors import one_line
from minilora.testing.adapters import adapter_dtypes, adapter_features, load_adapter
from minilora.testing.compare import Comparison, compare
from minilora.testing.problems import AdamProblem, LoraProblem, make_adam_problem, make_problem
from minilora.testing.report import CheckReport, PropertyResult, severity
from minilora.testing.tolerance import adam_bounds, lora_bounds

__all__ = [
    "PROPERTIES",
    "ADAM_DTYPES",
    "PropertyResult",
    "CheckReport",
    "edge_problems",
    "planned",
    "check",
]

PROPERTIES = ("forward", "grad_x", "grad_A", "grad_B", "merge", "merged_forward", "unmerge", "adam", "init")
LAYER_PROPERTIES = PROPERTIES[:7]
ADAM_DTYPES = ("float64", "float32", "bfloat16")
INIT_DTYPE = "float32"
# init: 8 x 256 = 2048 draws; the sample std is then within 10% of the true one by ~10
# standard errors (a false alarm is a 1e-20 event), while a wrong distribution is off by far more
INIT_SHAPE = dict(d_in=256, d_out=8, rank=8)
INIT_STD_TOLERANCE = 0.1



# ---------------------------------------------------------------- cases

EDGE_CASES = (
    dict(label="edge: rank 1", lead=(2,), d_in=5, d_out=3, rank=1, alpha=4.0, seed=101),
    dict(label="edge: rank = min(d_in, d_out)", lead=(3,), d_in=4, d_out=6, rank=4, alpha=8.0, rslora=True,
         fan_in_fan_out=True, bias=False, seed=102),
    dict(label="edge: batch of one", lead=(1,), d_in=3, d_out=2, rank=2, alpha=16.0, dropout=0.5, seed=103),
    dict(label="edge: 3-D input", lead=(2, 3), d_in=6, d_out=5, rank=3, alpha=3.0, dropout=0.1,
         fan_in_fan_out=True, seed=104),
)
ADAM_EDGE_CASES: tuple[dict[str, Any], ...] = (
    dict(label="edge: Adam, torch defaults", d_in=4, d_out=3, rank=2, steps=5, lr=1e-3, seed=201),
    dict(label="edge: AdamW, amsgrad", d_in=3, d_out=5, rank=1, steps=6, lr=1e-2, decoupled=True,
         weight_decay=0.1, amsgrad=True, seed=202),
)


def _restrict(spec: dict, features: frozenset) -> dict:
    spec = dict(spec)
    if "fan_in_fan_out" not in features:
        spec["fan_in_fan_out"] = False
    if "rslora" not in features:
        spec["rslora"] = False
    if "dropout" not in features:
        spec["dropout"] = None
    if "no_bias" not in features:
        spec["bias"] = True
    return spec


def edge_problems(dtype: str, features: frozenset = frozenset({"fan_in_fan_out", "rslora", "dropout", "no_bias"})
                  ) -> list[LoraProblem]:
    """The fixed edge cases in ``dtype``, with unsupported options switched off."""
    return [make_problem(**_restrict(spec, features), dtype=dtype) for spec in EDGE_CASES]


def _hypothesis_problems(dtype: str, features: frozenset, count: int, seed: int) -> list[LoraProblem]:
    from minilora.testing.strategies import lora_problems, relabel, sample

    def fixed(name: str) -> bool | None:
        return None if name in features else False

    strategy = lora_problems(
        [dtype], fan_in_fan_out=fixed("fan_in_fan_out"), rslora=fixed("rslora"), dropout=fixed("dropout"),
        bias=None if "no_bias" in features else True,
    )
    return [relabel(p, f"hypothesis #{i + 1}") for i, p in enumerate(sample(strategy, count, seed))]


def _adam_problems(dtype: str, count: int, seed: int) -> list[AdamProblem]:
    from minilora.testing.strategies import adam_problems, relabel, sample

    edges = [make_adam_problem(**spec, dtype=dtype) for spec in ADAM_EDGE_CASES]
    drawn = sample(adam_problems([dtype]), count, seed)
    return edges + [relabel(p, f"hypothesis #{i + 1}") for i, p in enumerate(drawn)]


def planned(adapter: Any, dtypes: Any = None, properties: Any = None) -> list[tuple[str, str]]:
    """The (property, dtype) pairs ``check`` runs for this adapter."""
    have = adapter_dtypes(adapter)
    chosen = [d for d in have if dtypes is None or d in dtypes]
    props = [p for p in PROPERTIES if properties is None or p in properties]
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
    return pairs


# ---------------------------------------------------------------- the oracle


def _oracle(p: LoraProblem) -> dict:
    """minilora in float64 on the problem's inputs: every expected output, and its bounds."""
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
    bounds = lora_bounds(p.params, p.lora, p.x, dtype=p.dtype, dropout_mask=p.mask, cotangent=p.cotangent, **kw)
    plain = lora_bounds(p.params, p.lora, p.x, dtype=p.dtype, **kw)["y"]
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



def _run_layer(adapter: Any, p: LoraProblem, wanted: set, rows: dict) -> None:
    expected = _oracle(p)
    case = p.describe()

    def record(prop: str, actual: dict) -> None:
        checks = [compare(actual[name], value, bound, name=name) for name, value, bound in expected[prop]]
        rows[prop].add(_worst(checks), case)

    def call(props: tuple[str, ...], method: str) -> Any:
        try:
            return getattr(adapter, method)(p)
        except Exception as exc:  # the adapter's failure is a result, not a crash of the check
            for prop in props:
                rows[prop].fail(case, f"{method}() raised {one_line(exc)}")
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
                    if not isinstance(g, dict) or key not in g:
                        rows[prop].fail(case, f"grads() returned no {key!r} entry")
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


def _run_adam(adapter: Any, p: AdamProblem, row: PropertyResult) -> None:
    import minilora as ml

    case = p.describe()
    params = p.params
    with ml.use_backend("numpy"):
        state = ml.adam_init(params, amsgrad=p.options.get("amsgrad", False))
        for g in p.grads:
            params, state = ml.adam_step(params, g, state, **p.options)
    bounds = adam_bounds(p.params, list(p.grads), dtype=p.dtype, **p.options)
    try:
        got = adapter.adam(p)
    except Exception as exc:
        row.fail(case, f"adam() raised {one_line(exc)}")
        return
    if not isinstance(got, dict) or not {"A", "B"} <= set(got):
        row.fail(case, "adam() must return {'A': ..., 'B': ...}")
        return
    row.add(_worst([compare(got[k], params[k], bounds[k], name=k) for k in ("A", "B")]), case)


def _init_checks(adapter: Any, init: str, seed: int) -> list[Comparison]:
    """B = 0 exactly; A in range (kaiming) and its sample mean and std near the target's."""
    d_in, d_out, r = INIT_SHAPE["d_in"], INIT_SHAPE["d_out"], INIT_SHAPE["rank"]
    got = adapter.init(d_in, d_out, r, init, seed)
    A, B = np.asarray(got["A"], dtype=np.float64), np.asarray(got["B"], dtype=np.float64)
    out = [compare(B, np.zeros((d_out, r)), 0.0, name="B")]
    if A.shape != (r, d_in):
        return out + [Comparison("A", False, (r, d_in), problem=f"has shape {A.shape}; expected {(r, d_in)}")]
    if init == "kaiming":  # U(-c, c), c = 1/sqrt(d_in): torch's kaiming_uniform_(a=sqrt(5))
        c = 1.0 / math.sqrt(d_in)
        std = c / math.sqrt(3.0)
        top = float(np.max(np.abs(A)))
        out.append(Comparison("max|A|", top <= c * (1 + 2.0**-20), (), (), top, c, max(0.0, top - c),
                              c * 2.0**-20, max(0.0, top - c) / (c * 2.0**-20), int(top > c * (1 + 2.0**-20))))
    else:  # "gaussian": N(0, 1/r^2) as PEFT; "normal": N(0, 1) as the paper
        std = 1.0 / r if init == "gaussian" else 1.0
    n = A.size
    sample_std, mean = float(A.std()), float(A.mean())
    for name, value, target, tol in (
        ("std(A)", sample_std, std, INIT_STD_TOLERANCE * std),
        ("mean(A)", mean, 0.0, 10.0 * std / math.sqrt(n)),
    ):
        err = abs(value - target)
        out.append(Comparison(f"{name} [{init}]", err <= tol, (), (), value, target, err, tol, err / tol,
                              int(err > tol)))
    return out


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
    by_dtype: dict[str, list[str]] = {}
    for prop, dt in pairs:
        by_dtype.setdefault(dt, []).append(prop)

    work: list[tuple[str, Callable[..., None]]] = []
    for dt, props in by_dtype.items():
        layer = [x for x in props if x in LAYER_PROPERTIES]
        if layer:
            problems = edge_problems(dt, features) + _hypothesis_problems(dt, features, max_examples, seed)
            view = {x: rows[(x, dt)] for x in layer}
            for prob in problems:
                work.append((f"layer {dt}", lambda prob=prob, view=view, layer=layer:
                             _run_layer(adapter, prob, set(layer), view)))
        if "adam" in props:
            for aprob in _adam_problems(dt, max_examples, seed):
                work.append((f"adam {dt}", lambda aprob=aprob, dt=dt: _run_adam(adapter, aprob, rows[("adam", dt)])))
        if "init" in props:
            for i, init in enumerate(getattr(adapter, "inits", ())):
                work.append((f"init {init}", lambda i=i, init=init, dt=dt: _run_init(adapter, init, seed + i,
                                                                                      rows[("init", dt)])))
    for done, (label, job) in enumerate(work, start=1):
        job()
        if progress is not None:
            progress(label, done, len(work))
    report = CheckReport(name, _versions(adapter), seed, max_examples, list(rows.values()))
    report.seconds = time.perf_counter() - start
    return report


def _run_init(adapter: Any, init: str, seed: int, row: PropertyResult) -> None:
    case = f"init={init!r}, A {INIT_SHAPE['rank']}x{INIT_SHAPE['d_in']}, seed {seed}"
    try:
        checks = _init_checks(adapter, init, seed)
    except Exception as exc:
        row.fail(case, f"init() raised {one_line(exc)}")
        return
    row.add(_worst(checks), case)
