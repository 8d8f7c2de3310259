"""``minilora params``: trainable parameters and training memory of LoRA vs full fine-tuning
(see ``minilora.param_calc``)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from minilora.cli.common import fail, int_at_least


def register(sub: Any) -> None:
    from minilora.study.param_calc import DTYPE_BYTES, FROZEN_FORMATS, MODELS, PROJECTIONS

    p = sub.add_parser(
        "params",
        help="count LoRA's trainable parameters and the memory of LoRA vs full fine-tuning",
        description="For a transformer given by --model or by --d-model and --layers: trainable "
        "parameters r (d_in + d_out) per adapted projection and layer, and the bytes of weights, "
        "gradients and Adam moments for full fine-tuning and for LoRA (activations not counted).",
    )
    p.add_argument("--model", choices=sorted(MODELS), help="a model from the paper's tables")
    p.add_argument("--d-model", type=int_at_least(1), help="model width d (overrides --model)")
    p.add_argument("--layers", type=int_at_least(1), help="number of transformer layers (overrides --model)")
    p.add_argument("--d-ff", type=int_at_least(1), help="feed-forward width (default 4 d)")
    p.add_argument("--vocab", type=int_at_least(0), help="vocabulary size, for the total (default 0)")
    p.add_argument("--positions", type=int_at_least(0), help="learned positions, for the total (default 0)")
    p.add_argument("--targets", nargs="+", default=["q", "v"], metavar="P[=R]",
                   help=f"projections to adapt, from {' '.join(PROJECTIONS)}; 'q=16' sets that one's rank "
                   "(default: q v, as in the paper)")
    p.add_argument("--rank", type=int_at_least(1), default=8, help="LoRA rank r (default 8)")
    p.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="float32",
                   help="weights and gradients (default float32)")
    p.add_argument("--optimizer-dtype", choices=sorted(DTYPE_BYTES), default="float32",
                   help="Adam moments (default float32)")
    p.add_argument("--frozen", choices=FROZEN_FORMATS, default="same",
                   help="storage of LoRA's frozen weights: same as --dtype, nf4 (QLoRA) or nf4-dq "
                   "(with double quantization)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.set_defaults(func=run)


def _parse_targets(items: list[str], rank: int) -> dict[str, int] | str:
    from minilora.study.param_calc import PROJECTIONS

    out: dict[str, int] = {}
    for item in items:
        name, _, value = item.partition("=")
        if name not in PROJECTIONS:
            return f"--targets: unknown projection {name!r}; choose from {' '.join(PROJECTIONS)}"
        if name in out:
            return f"--targets: {name!r} is given twice"
        if value:
            try:
                r = int(value)
            except ValueError:
                return f"--targets: the rank in {item!r} must be a positive integer"
            if r <= 0:
                return f"--targets: the rank in {item!r} must be a positive integer"
        else:
            r = rank
        out[name] = r
    return out


def run(args: argparse.Namespace) -> int:
    from minilora.study.param_calc import (
        MODELS,
        lora_param_count,
        memory_estimate,
        projection_shapes,
        transformer_param_count,
    )

    spec = dict(MODELS[args.model]) if args.model else {"vocab": 0, "positions": 0}
    for key, value in (("d_model", args.d_model), ("n_layers", args.layers), ("d_ff", args.d_ff),
                       ("vocab", args.vocab), ("positions", args.positions)):
        if value is not None:
            spec[key] = value
    if "d_model" not in spec or "n_layers" not in spec:
        return fail("give --model, or --d-model and --layers")
    spec.setdefault("d_ff", 4 * spec["d_model"])
    targets = _parse_targets(args.targets, args.rank)
    if isinstance(targets, str):
        return fail(targets)
    d, n, f = spec["d_model"], spec["n_layers"], spec["d_ff"]
    trainable = lora_param_count(d, n, targets, d_ff=f)
    total = transformer_param_count(d, n, d_ff=f, vocab=spec["vocab"], positions=spec["positions"])
    memory = memory_estimate(total, trainable, dtype=args.dtype, optimizer_dtype=args.optimizer_dtype,
                             frozen=args.frozen)
    shapes = projection_shapes(d, f)
    per_layer = {name: r * sum(shapes[name]) for name, r in targets.items()}
    report = {
        "model": args.model, "d_model": d, "n_layers": n, "d_ff": f, "vocab": spec["vocab"],
        "positions": spec["positions"], "targets": targets, "lora_params": trainable,
        "lora_params_per_layer": per_layer, "total_params": total, "dtype": args.dtype,
        "optimizer_dtype": args.optimizer_dtype, "frozen": args.frozen, "memory_bytes": memory,
    }
    print(json.dumps(report) if args.json else params_table(report))
    return 0


def _size(n: float) -> str:
    for unit, div in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:.0f} B"


def _short(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return str(n)


def params_table(r: dict) -> str:
    name = r["model"] or "transformer"
    targets = " ".join(f"{t}(r={k})" for t, k in r["targets"].items())
    share = 100.0 * r["lora_params"] / r["total_params"]
    per_layer = "  ".join(f"{t} {v:,}" for t, v in r["lora_params_per_layer"].items())
    m = r["memory_bytes"]
    frozen = {"same": r["dtype"], "nf4": "NF4", "nf4-dq": "NF4 + double quant"}[r["frozen"]]
    lines = [
        f"minilora params: {name} (d_model {r['d_model']}, {r['n_layers']} layers, d_ff {r['d_ff']}), LoRA on {targets}",
        f"  LoRA parameters     {r['lora_params']:,} ({_short(r['lora_params'])}), {share:.4g}% of {r['total_params']:,} ({_short(r['total_params'])})",
        f"  per layer           {per_layer}",
        (f"  memory, {r['dtype']} weights and gradients, {r['optimizer_dtype']} Adam moments, frozen weights "
         f"{frozen} (activations not counted):"),
        f"    {'':<12}{'full fine-tuning':>18}{'LoRA':>14}",
    ]
    for part in ("weights", "gradients", "adam", "total"):
        label = "Adam m, v" if part == "adam" else part
        lines.append(f"    {label:<12}{_size(m['full'][part]):>18}{_size(m['lora'][part]):>14}")
    return "\n".join(lines)
