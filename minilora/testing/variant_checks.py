"""The variant properties of ``minilora check``: DoRA, LoRA on an embedding, the trainable set.

    dora_forward, dora_grad_x, dora_grad_A, dora_grad_B, dora_grad_m
                    the DoRA layer (``minilora.dora_dense``, PEFT ``use_dora=True``) and the
                    gradients of sum(y * g), the magnitude's included
    dora_merge, dora_merged_forward, dora_unmerge
                    W' = c (W + s B A) row by row (``minilora.dora_merge``), the merged layer
                    against the unmerged oracle (a bias scaled by c in the forward pass but not
                    in the merge fails here), and merge then unmerge gives W back
    embedding_forward, embedding_grad_A, embedding_grad_B, embedding_merge, embedding_merged_forward
                    y = W[ids] + s A^T[ids] B^T (``minilora.lora_embedding``), the gradients of
                    A and B, W' = W + s (B A)^T and the merged table at ids
    trainable       the parameters a layer trains under PEFT's bias = "none" | "all" |
                    "lora_only" (and with use_dora): ``minilora.peft.models.split_trainable``,
                    plus the magnitude m of every DoRA layer (PEFT's lora_magnitude_vector)

Values come from minilora's own variants in float64, bounds from ``variant_bounds`` under the
adapter's declared precision (``accumulate``, and ``adapter``: the dtype its factors, DoRA's
magnitude and row norm are kept in, PEFT's float32 under a float16/bfloat16 base). The DoRA
and embedding rows run in the adapter's ``variant_dtypes`` (default float64 and float32; the
built-in torch and peft adapters add float16 and bfloat16); the trainable row is exact (a set),
its dtype column reads "any".
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np

from minilora.errors import MiniLoraValueError, one_line
from minilora.testing.adapters import (
    adapter_dora_bias,
    adapter_dora_features,
    adapter_features,
    adapter_variant_dtypes,
    declared_precision,
    has_method,
)
from minilora.testing.compare import Comparison, compare
from minilora.testing.report import PropertyResult
from minilora.testing.variant_bounds import dora_bounds, embedding_bounds
from minilora.testing.variant_problems import (
    DoraProblem,
    EmbeddingProblem,
    TrainableProblem,
    dora_cases,
    embedding_cases,
    trainable_cases,
)

__all__ = ["DORA_PROPERTIES", "EMBEDDING_PROPERTIES", "VARIANT_PROPERTIES", "VARIANT_METHOD_OF", "ANY_DTYPE",
           "variant_pairs", "variant_work", "dora_oracle", "embedding_oracle", "trainable_oracle"]

DORA_PROPERTIES = ("dora_forward", "dora_grad_x", "dora_grad_A", "dora_grad_B", "dora_grad_m", "dora_merge",
                   "dora_merged_forward", "dora_unmerge")
EMBEDDING_PROPERTIES = ("embedding_forward", "embedding_grad_A", "embedding_grad_B", "embedding_merge",
                        "embedding_merged_forward")
VARIANT_PROPERTIES = (*DORA_PROPERTIES, *EMBEDDING_PROPERTIES, "trainable")
ANY_DTYPE = "any"
# property -> (the adapter method, the key of its answer: None for the answer itself)
CALLS: dict[str, tuple[str, str | None]] = {
    "dora_forward": ("dora_forward", None), "dora_grad_x": ("dora_grads", "x"), "dora_grad_A": ("dora_grads", "A"),
    "dora_grad_B": ("dora_grads", "B"), "dora_grad_m": ("dora_grads", "m"), "dora_merge": ("dora_merge", "W"),
    "dora_merged_forward": ("dora_merge", "y"), "dora_unmerge": ("dora_unmerge", None),
    "embedding_forward": ("embedding_forward", None), "embedding_grad_A": ("embedding_grads", "A"),
    "embedding_grad_B": ("embedding_grads", "B"), "embedding_merge": ("embedding_merge", "W"),
    "embedding_merged_forward": ("embedding_merge", "y"), "trainable": ("trainable", None),
}
VARIANT_METHOD_OF = {prop: method for prop, (method, _) in CALLS.items()}


def variant_pairs(adapter: Any, dtypes: Any = None, properties: Any = None) -> list[tuple[str, str]]:
    """The (property, dtype) rows of the variant properties ``check`` plans for this adapter."""
    chosen = [d for d in adapter_variant_dtypes(adapter) if dtypes is None or d in dtypes]
    pairs = []
    for prop in VARIANT_PROPERTIES:
        if properties is not None and prop not in properties:
            continue
        if prop == "trainable":
            pairs.append((prop, ANY_DTYPE))
        else:
            pairs.extend((prop, d) for d in chosen)
    return pairs


# ---------------------------------------------------------------- the oracle


def dora_oracle(p: DoraProblem, bias: str = "peft") -> dict[str, Any]:
    """minilora in float64 on a DoRA problem: {output: value} for y, x, A, B, m, W, y_merged, W_back.
    ``bias="scaled"`` (an adapter's ``dora_bias``): the forward is c (x W^T + b + ...), so y gains
    (c - 1) b and dm gains sum_n g b / n; the merge is unchanged."""
    import autograd.numpy as anp

    import minilora as ml
    from minilora.variants import dora_dense, dora_merge

    kw: dict[str, Any] = dict(scale=p.scale, fan_in_fan_out=p.fan_in_fan_out)
    with ml.use_backend("numpy"):
        y = dora_dense(p.params, p.lora, p.magnitude, p.x, dropout_mask=p.mask, **kw)

        def loss(x: Any, lora: dict, m: Any) -> Any:
            return anp.sum(dora_dense(p.params, lora, m, x, dropout_mask=p.mask, **kw) * p.cotangent)

        gx, glora, gm = ml.grad(loss, argnum=(0, 1, 2))(p.x, p.lora, p.magnitude)
        merged, _ = dora_merge(p.params, p.lora, p.magnitude, **kw)
        y_plain = dora_dense(p.params, p.lora, p.magnitude, p.x, **kw)
    if bias == "scaled" and p.b is not None:
        W_oi = p.W.T if p.fan_in_fan_out else p.W
        n = np.sqrt(np.sum((W_oi + p.scale * (p.B @ p.A)) ** 2, axis=1))
        y = y + (p.magnitude / n - 1.0) * p.b
        g = np.asarray(p.cotangent).reshape(-1, p.b.shape[0])
        gm = gm + np.sum(g, axis=0) * p.b / n
    return {"y": y, "x": gx, "A": glora["A"], "B": glora["B"], "m": gm, "W": merged["W"], "y_merged": y_plain,
            "W_back": p.W}


def embedding_oracle(p: EmbeddingProblem) -> dict[str, Any]:
    """minilora in float64 on an embedding problem: y, A, B, W, y_merged."""
    import autograd.numpy as anp

    import minilora as ml
    from minilora.variants import embedding_merge, lora_embedding

    params, lora = {"W": p.W}, {"A": p.A, "B": p.B}
    with ml.use_backend("numpy"):
        y = lora_embedding(params, lora, p.ids, scale=p.scale)

        def loss(lo: dict) -> Any:
            return anp.sum(lora_embedding(params, lo, p.ids, scale=p.scale) * p.cotangent)

        g = ml.grad(loss)(lora)
        merged = embedding_merge(params, lora, scale=p.scale)["W"]
    return {"y": y, "A": g["A"], "B": g["B"], "W": merged, "y_merged": merged[p.ids]}


def trainable_oracle(p: TrainableProblem) -> set[str]:
    """The "<layer>.<kind>" names that train (``split_trainable`` on the same model, plus the
    DoRA magnitudes, which PEFT trains with the factors)."""
    from minilora.peft.models import split_trainable

    model: dict = {}
    for name, d_in, d_out, bias in p.layers:
        layer: dict = {"W": np.zeros((d_out, d_in))}
        if bias:
            layer["b"] = np.zeros(d_out)
        if name in p.targets:
            layer["lora"] = {"default": {"A": np.zeros((p.rank, d_in)), "B": np.zeros((d_out, p.rank))}}
        model[name] = layer
    trainable, _ = split_trainable(model, bias=p.bias)
    out = set()
    for name, part in trainable.items():
        for key in part:
            if key == "lora":
                out |= {f"{name}.A", f"{name}.B"} | ({f"{name}.m"} if p.dora else set())
            else:
                out.add(f"{name}.{key}")
    return out


# ---------------------------------------------------------------- running the cases


def _threshold(expected: Any, bound: Any) -> float:
    from minilora.testing.conformance import detection_threshold

    return detection_threshold(expected, bound)


def _run_arrays(adapter: Any, p: Any, wanted: list[str], rows: dict, oracle: Callable, bounds: Callable,
                narrow: Callable | None = None, wide: str = "") -> None:
    """One DoRA or embedding case: each wanted property's method called once per case, its
    answer compared with the oracle's under the bound; a raise or a missing entry fails the case.
    ``narrow``: the bounds of the storage dtype throughout, where the adapter declares something
    wider (``wide``, in words): a failure within them earns the precision hint."""
    case = p.describe()
    looser: list[dict] = []
    expected = oracle(p)
    try:
        bound = bounds(p)
    except MiniLoraValueError as exc:  # no bound in this dtype: nothing is judged, nothing passes
        for prop in wanted:
            rows[prop].skip(case, [f"an error bound ({one_line(exc)})"])
        return
    answers: dict[str, Any] = {}
    for prop in wanted:
        method, key = CALLS[prop]
        if method not in answers:
            try:
                answers[method] = (True, getattr(adapter, method)(p))
            except Exception as exc:  # the adapter's failure is this case's result
                answers[method] = (False, f"{method}() raised {one_line(exc)}")
        ok, got = answers[method]
        if not ok:
            rows[prop].fail(case, got, raised=True)
            continue
        out_key = _OUTPUT[prop]
        if key is not None:
            if not isinstance(got, dict) or key not in got:
                rows[prop].fail(case, f"{method}() returned no {key!r} entry")
                continue
            got = got[key]
        name = f"d{out_key}" if "grad" in prop else out_key
        c = compare(got, expected[out_key], bound[out_key], name=name)
        rows[prop].add(c, case, _threshold(expected[out_key], bound[out_key]))
        if not c.passed and narrow is not None:
            rows[prop].precision_evidence(_hint(p, narrow, looser, got, expected[out_key], out_key, name, wide))


def _hint(p: Any, narrow: Callable, looser: list, got: Any, value: Any, key: str, name: str,
          wide: str) -> str | bool | None:
    """As conformance's precision hint: the hint text when the failed answer fits the storage
    dtype's own bounds, False when it does not, None when that dtype has no bound here."""
    if not looser:
        try:
            looser.append(narrow(p))
        except MiniLoraValueError:
            looser.append({})
    if not looser[0]:
        return None
    if not compare(got, value, looser[0][key], name=name).passed:
        return False
    return (f"the error fits {p.dtype} arithmetic throughout: if the implementation stores or sums in "
            f"{p.dtype} where it declares {wide}, the declaration is what is wrong")


# property -> the oracle's / bounds' output key
_OUTPUT = {
    "dora_forward": "y", "dora_grad_x": "x", "dora_grad_A": "A", "dora_grad_B": "B", "dora_grad_m": "m",
    "dora_merge": "W", "dora_merged_forward": "y_merged", "dora_unmerge": "W_back",
    "embedding_forward": "y", "embedding_grad_A": "A", "embedding_grad_B": "B", "embedding_merge": "W",
    "embedding_merged_forward": "y_merged",
}


def _run_trainable(adapter: Any, p: TrainableProblem, row: PropertyResult) -> None:
    case = p.describe()
    try:
        got = adapter.trainable(p)
    except Exception as exc:
        row.fail(case, f"trainable() raised {one_line(exc)}", raised=True)
        return
    if isinstance(got, str) or not all(isinstance(n, str) for n in got):
        row.fail(case, f"trainable() must return a collection of names like 'fc1.A'; got {got!r}")
        return
    got_set, want = set(got), trainable_oracle(p)
    if got_set == want:
        row.add(Comparison("trainable", True, ()), case)
        return
    extra, missing = sorted(got_set - want), sorted(want - got_set)
    text = "; ".join(part for part in (f"trains {extra}, which PEFT freezes" if extra else "",
                                       f"freezes {missing}, which PEFT trains" if missing else "") if part)
    row.add(Comparison("trainable", False, (), problem=text), case)


def variant_work(adapter: Any, rows: dict, max_examples: int, seed: int) -> list[tuple[str, Callable[[], None]]]:
    """The jobs (label, function) of the variant rows in ``rows`` ({(property, dtype): row})
    whose method the adapter has."""
    work: list[tuple[str, Callable[[], None]]] = []
    live = {pair for pair, row in rows.items() if row.na is None and pair[0] in VARIANT_PROPERTIES}
    dtypes = sorted({d for _, d in live if d != ANY_DTYPE})
    for dt in dtypes:
        declared = declared_precision(adapter, dt)
        kw = dict(accumulate=declared["accumulate"], adapter=declared["adapter"])
        wide = ", ".join(f"{k}={declared[k]}" for k in ("adapter", "accumulate") if declared[k] != dt)
        narrow = dict(accumulate=dt, adapter=dt) if wide else None
        bias = adapter_dora_bias(adapter)
        groups: list[tuple[tuple[str, ...], list, Callable, Callable, str]] = [
            (DORA_PROPERTIES, dora_cases(dt, adapter_dora_features(adapter), max_examples, seed),
             functools.partial(dora_oracle, bias=bias), functools.partial(dora_bounds, bias=bias), "dora"),
            (EMBEDDING_PROPERTIES, embedding_cases(dt, adapter_features(adapter), max_examples, seed),
             embedding_oracle, embedding_bounds, "embedding"),
        ]
        for props, cases, oracle, bound_fn, label in groups:
            bounds = functools.partial(bound_fn, **kw)
            narrow_bounds = None if narrow is None else functools.partial(bound_fn, **narrow)
            wanted = [x for x in props if (x, dt) in live]
            if not wanted:
                continue
            view = {x: rows[(x, dt)] for x in wanted}
            for prob in cases:
                work.append((f"{label} {dt}", functools.partial(_run_arrays, adapter, prob, wanted, view, oracle,
                                                                bounds, narrow_bounds, wide)))
    if ("trainable", ANY_DTYPE) in live:
        row = rows[("trainable", ANY_DTYPE)]
        for tp in trainable_cases(dora=has_method(adapter, "dora_forward")):
            work.append(("trainable", functools.partial(_run_trainable, adapter, tp, row)))
    return work
