"""What a PEFT LoRA adapter holds: its modules, shapes, ranks, alpha, scaling and parameter counts
(``minilora inspect`` prints it), and what a merge into a given base would do."""

from __future__ import annotations

import os
from typing import Any

__all__ = ["check_against_base", "describe"]


def describe(adapter: Any) -> dict:
    """{"config": the main config fields, "modules": [{"module", "kind", "shape", "rank", "alpha",
    "scale", "params", "dora", "lora_bias", "dtype"}], "total_params": int} for a PeftAdapter."""
    rows = []
    for module in sorted(adapter.modules):
        t = adapter.modules[module]
        A, B = t["A"], t["B"]
        kind = adapter.kinds.get(module, "linear")
        rows.append({
            "module": module, "kind": kind,
            "shape": [int(A.shape[1]), int(B.shape[0])] if kind == "embedding" else [int(B.shape[0]), int(A.shape[1])],
            "rank": adapter.rank(module), "alpha": adapter.alpha(module), "scale": adapter.scale(module),
            "params": int(sum(v.size for v in t.values())), "dora": "m" in t, "lora_bias": "lora_bias" in t,
            "dtype": str(A.dtype),
        })
    keys = ("r", "lora_alpha", "use_rslora", "use_dora", "fan_in_fan_out", "bias", "lora_bias", "target_modules",
            "rank_pattern", "alpha_pattern", "modules_to_save", "base_model_name_or_path")
    extra = int(sum(v.size for v in adapter.extra.values()))
    return {"config": {k: adapter.config.get(k) for k in keys}, "modules": rows,
            "extra_tensors": sorted(adapter.extra), "total_params": sum(r["params"] for r in rows) + extra}


def check_against_base(adapter: Any, sources: dict, base: str | os.PathLike, *, allow_inexact: bool = False) -> dict:
    """{"merged": [row per module that would merge], "replaced": [{"tensor", "from"}],
    "refused": [{"module", "reason"}]}: the merge's plan against ``base`` (file, index or model
    folder), every refusal collected instead of stopping at the first (``allow_inexact`` as for
    the merge). Reads headers only."""
    from minilora.formats.checkpoint import open_checkpoint
    from minilora.peft.merge_plan import make_plan

    ckpt = open_checkpoint(base)
    plan = make_plan(adapter, sources, ckpt.entries, os.fspath(base), ckpt.config, collect=True,
                     allow_inexact=allow_inexact)
    replaced = [{"tensor": b, "from": j.why} for b, j in plan.jobs.items() if j.replace is not None]
    return {"merged": plan.rows, "replaced": replaced, "refused": plan.refused}
