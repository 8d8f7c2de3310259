"""``minilora inspect ADAPTER_DIR``: list a PEFT LoRA adapter's modules, ranks, alpha, scaling
and parameter counts (NumPy only)."""

from __future__ import annotations

import argparse
import json
from typing import Any

__all__ = ["register"]


def register(sub: Any) -> None:
    p = sub.add_parser("inspect", help="list a PEFT LoRA adapter's modules, ranks, alpha and scaling",
                       description="Read ADAPTER_DIR (adapter_config.json + adapter_model.safetensors) and list "
                       "each adapted module with its shape, rank r, alpha, scale and parameter count.")
    p.add_argument("adapter", metavar="ADAPTER_DIR")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from minilora.peft.files import load_peft_adapter
    from minilora.peft.inspect import describe

    info = describe(load_peft_adapter(args.adapter))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
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
        print(f"  base tensors stored too (bias={c['bias']}): {', '.join(info['extra_tensors'])}")
    print(f"{len(info['modules'])} module(s), {info['total_params']} parameters")
    return 0
