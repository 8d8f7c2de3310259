"""``minilora merge BASE ADAPTER_DIR OUT``: the streaming PEFT merge of ``minilora.peft.merge``."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from minilora.cli.common import fail
from minilora.peft.merge import merge_adapter_file

__all__ = ["register"]


# ---------------------------------------------------------------- command line


def register(sub: Any) -> None:
    p = sub.add_parser(
        "merge",
        help="merge a PEFT LoRA adapter into a safetensors file of base weights (NumPy only)",
        description="Write OUT = BASE with the PEFT LoRA adapter in ADAPTER_DIR merged into the weights it "
        "targets (HF module names), as PEFT's merge_and_unload does; each tensor keeps its dtype. "
        "Tensors are processed one at a time and OUT is written atomically.",
    )
    p.add_argument("base", metavar="BASE", help="base weights, a .safetensors file")
    p.add_argument("adapter", metavar="ADAPTER_DIR", help="folder with adapter_config.json and adapter_model.safetensors")
    p.add_argument("out", metavar="OUT", help="output .safetensors file")
    p.add_argument("--unmerge", action="store_true", help="subtract the adapter instead (BASE is a merged file)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every module's alpha/r by this (default 1)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not os.path.isfile(args.base):
        return fail(f"BASE {args.base}: file not found")
    folder = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(folder):
        return fail(f"OUT {args.out}: folder {folder} does not exist")
    summary = merge_adapter_file(args.base, args.adapter, args.out, unmerge=args.unmerge, scale=args.scale)
    if args.json:
        print(json.dumps({"out": args.out, "unmerge": args.unmerge, "modules": summary}, indent=2))
        return 0
    verb = "unmerged" if args.unmerge else "merged"
    print(f"{verb} {len(summary)} module(s) into {args.out}")
    for row in summary:
        extra = " dora" if row["dora"] else ""
        print(f"  {row['module']:<40} {row['kind']:<9} r={row['rank']:<4} alpha={row['alpha']:<8g} "
              f"scale={row['scale']:<10.6g} {row['dtype']}{extra}")
    return 0
