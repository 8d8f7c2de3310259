"""``minilora inspect ADAPTER_DIR [--base BASE]``: list a PEFT LoRA adapter's modules, ranks,
alpha, scaling and parameter counts; with ``--base``, what a merge into BASE would do and what it
would refuse, writing nothing (NumPy only)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from minilora.cli.common import path_argument

__all__ = ["register"]


def register(sub: Any) -> None:
    p = sub.add_parser("inspect", help="list a PEFT LoRA adapter's modules, ranks, alpha and scaling",
                       description="Read ADAPTER_DIR (adapter_config.json + adapter_model.safetensors) and list "
                       "each adapted module with its shape, rank r, alpha, scale and parameter count. With --base, "
                       "check it against BASE: what would be merged, copied in, or refused and why (nothing is "
                       "written).")
    p.add_argument("adapter", metavar="ADAPTER_DIR", type=path_argument())
    p.add_argument("--base", metavar="BASE", type=path_argument(), help="a .safetensors file, sharded index or model folder to check against")
    p.add_argument("--allow-inexact", action="store_true", help="with --base: as merge --allow-inexact (modules "
                   "whose bit-equality with PEFT is not guaranteed count as merged, not refused)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from minilora.peft.inspect import check_against_base, describe
    from minilora.peft.merge_plan import load_for_merge

    adapter, sources = load_for_merge(args.adapter)
    info = describe(adapter)
    if args.base is not None:
        info["base"] = check_against_base(adapter, sources, args.base, allow_inexact=args.allow_inexact)
    if args.json:
        print(json.dumps(info, indent=2))
        return 1 if args.base is not None and info["base"]["refused"] else 0
    c = info["config"]
    print(f"{args.adapter}: LoRA r={c['r']} lora_alpha={c['lora_alpha']} rslora={bool(c['use_rslora'])} "
          f"dora={bool(c['use_dora'])} fan_in_fan_out={bool(c['fan_in_fan_out'])} bias={c['bias']}")
    print(f"  {'module':<40} {'kind':<9} {'shape':>12} {'r':>4} {'alpha':>8} {'scale':>10} {'params':>10}")
    for r in info["modules"]:
        shape = "x".join(str(s) for s in r["shape"])
        flags = (" dora" if r["dora"] else "") + (" lora_bias" if r["lora_bias"] else "")
        print(f"  {r['module']:<40} {r['kind']:<9} {shape:>12} {r['rank']:>4} {r['alpha']:>8g} {r['scale']:>10.6g} "
              f"{r['params']:>10}{flags}")
    if info["extra_tensors"]:
        print(f"  tensors stored whole (loaded over the base's): {', '.join(info['extra_tensors'])}")
    print(f"{len(info['modules'])} module(s), {info['total_params']} parameters")
    if args.base is None:
        return 0
    b = info["base"]
    print(f"against {args.base}:")
    for r in b["merged"]:
        how = "Conv1D (fan_in_fan_out)" if r["fan_in_fan_out"] and r["kind"] == "linear" else r["kind"]
        inexact = "" if r["bit_equal"] else f"; not bit-equal to PEFT: {r['not_bit_equal_why']}"
        print(f"  merge    {r['module']:<40} -> {r['tensor']} ({how}, from {r['orientation_from']}{inexact})")
    for r in b["replaced"]:
        print(f"  copy     {r['tensor']:<40} ({r['from']})")
    for r in b["refused"]:
        print(f"  REFUSED  {r['module']}: {r['reason']}")
    print(f"{len(b['merged'])} to merge, {len(b['replaced'])} to copy, {len(b['refused'])} refused")
    return 1 if b["refused"] else 0
