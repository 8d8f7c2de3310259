"""What a PEFT LoRA adapter holds: its modules, shapes, ranks, alpha, scaling and parameter counts
(``minilora inspect`` prints it)."""

from __future__ import annotations

from typing import Any

__all__ = ["describe"]


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
            "rank_pattern", "alpha_pattern", "base_model_name_or_path")
    extra = int(sum(v.size for v in adapter.extra.values()))
    return {"config": {k: adapter.config.get(k) for k in keys}, "modules": rows,
            "extra_tensors": sorted(adapter.extra), "total_params": sum(r["params"] for r in rows) + extra}
