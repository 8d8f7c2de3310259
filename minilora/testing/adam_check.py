"""The adam property of ``minilora check``: an adapter's Adam/AdamW steps against minilora's
``adam_step`` in float64, within ``adam_bounds`` under the adapter's declared precision and
eps placement (``adam_eps``)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from minilora.errors import one_line
from minilora.testing.adam_tolerance import adam_bounds
from minilora.testing.adapters import adapter_adam_eps, adapter_optimizer_features
from minilora.testing.cases import needed_optimizer_features
from minilora.testing.compare import compare, detection_threshold
from minilora.testing.problems import AdamProblem
from minilora.testing.report import PropertyResult, severity
from minilora.testing.tolerance import unit_roundoff

__all__ = ["run_adam"]


def run_adam(adapter: Any, p: AdamProblem, row: PropertyResult, precision: dict) -> None:
    import minilora as ml

    case = p.describe()
    missing = [f for f in needed_optimizer_features(p) if f not in adapter_optimizer_features(adapter)]
    if missing:
        row.skip(case, missing)
        return
    params = p.params
    options = {k: v for k, v in p.options.items() if k != "eps"}
    eps = [float(p.options.get("eps", 1e-8))] * len(p.grads)
    if adapter_adam_eps(adapter) == "hat":  # Keras: torch's eps / sqrt(1 - beta2^t) at step t
        b2 = tuple(p.options.get("betas", (0.9, 0.999)))[1]
        eps = [e / math.sqrt(1.0 - b2**t) for t, e in enumerate(eps, start=1)]
    with ml.use_backend("numpy"):
        state = ml.adam_init(params, amsgrad=p.options.get("amsgrad", False))
        for g, e in zip(p.grads, eps, strict=True):
            params, state = ml.adam_step(params, g, state, eps=e, **options)
    dtype = precision["adapter"]
    rounded = dtype if unit_roundoff(dtype) > unit_roundoff(p.dtype) else None  # A, B, g rounded on the way in
    bounds = adam_bounds(p.params, list(p.grads), dtype=dtype, bias_correction=precision["bias_correction"],
                         eps=eps, inputs=rounded, **options)
    try:
        got = adapter.adam(p)
    except Exception as exc:
        row.fail(case, f"adam() raised {one_line(exc)}", raised=True)
        return
    if not isinstance(got, dict) or not {"A", "B"} <= set(got):
        row.fail(case, "adam() must return {'A': ..., 'B': ...}")
        return
    # the update itself is compared (p0 is exact, so this is the parameter's comparison seen from
    # the step): its threshold says how small a wrong step this case could have told apart
    checks, thresholds = [], []
    for k in ("A", "B"):
        c = compare(got[k], params[k], bounds[k], name=k)
        if c.problem is None:
            update = np.asarray(got[k], dtype=np.float64) - p.params[k]
            c = compare(update, params[k] - p.params[k], bounds[k], name=f"update of {k}")
        checks.append(c)
        thresholds.append(detection_threshold(params[k] - p.params[k], bounds[k]))
    row.add(max(checks, key=severity), case, min(thresholds))
