"""``minilora merge BASE ADAPTER_DIR OUT``: the streaming PEFT merge of ``minilora.peft.merge``."""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
from collections.abc import Iterator
from typing import Any

from minilora.cli.common import Progress, Stopped, path_argument
from minilora.peft.merge import DTYPE_NAMES, merge_checkpoint

__all__ = ["register", "signals_exit"]

_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP", "SIGQUIT") if hasattr(signal, n))


# ---------------------------------------------------------------- command line


def register(sub: Any) -> None:
    p = sub.add_parser(
        "merge",
        help="merge a PEFT LoRA adapter into a checkpoint of base weights (NumPy only)",
        description="Write OUT = BASE with the PEFT LoRA adapter in ADAPTER_DIR merged into the weights it "
        "targets, as PEFT's merge_and_unload does (saved embedding layers and modules_to_save copied in, "
        "fan_in_fan_out decided per module); each tensor keeps its dtype unless --dtype. "
        "Tensors are processed one at a time and OUT is written atomically.",
    )
    p.add_argument("base", metavar="BASE", type=path_argument(), help="base weights: a .safetensors file, a sharded index "
                   "(model.safetensors.index.json) or a model folder")
    p.add_argument("adapter", metavar="ADAPTER_DIR", type=path_argument(), help="folder with adapter_config.json and adapter_model.safetensors")
    p.add_argument("out", metavar="OUT", type=path_argument(), help="a .safetensors file, or a folder (trailing slash, existing folder or "
                   "a name without .safetensors) that becomes a loadable model: shards as BASE's, index, config.json, "
                   "generation and tokenizer files copied from BASE's folder")
    p.add_argument("--unmerge", action="store_true", help="subtract the adapter instead (BASE is a merged file)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every module's alpha/r by this (default 1)")
    p.add_argument("--dtype", choices=sorted(DTYPE_NAMES), help="cast every float tensor of OUT to this dtype")
    p.add_argument("--allow-inexact", action="store_true",
                   help="merge modules whose bit-equality with PEFT is not guaranteed (a product shape whose torch "
                   "summation order minilora does not reproduce; refused without this flag) and list them in the "
                   "summary (--json: not_bit_equal)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


@contextlib.contextmanager
def signals_exit() -> Iterator[None]:
    """SIGTERM, SIGHUP and SIGQUIT end the command as Ctrl-C does (exit 128 + signal number),
    unwinding the stack, so temp files are removed and the old OUT is left intact."""
    def handler(signum: int, frame: Any) -> None:
        raise Stopped(signum)

    old = {}
    for sig in _SIGNALS:
        with contextlib.suppress(ValueError, OSError):  # not the main thread
            old[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def run(args: argparse.Namespace) -> int:
    bar = Progress()
    state = {"shown": -1}

    def progress(name: str, done: int, total: int) -> None:
        pct = int(100 * done / total) if total else 100
        if pct != state["shown"]:
            state["shown"] = pct
            bar.show(f"  merging {pct:3d}%  {done / 1e6:,.0f}/{total / 1e6:,.0f} MB  {name[:50]}")

    with signals_exit():
        try:
            summary = merge_checkpoint(args.base, args.adapter, args.out, unmerge=args.unmerge, scale=args.scale,
                                       dtype=args.dtype, allow_inexact=args.allow_inexact,
                                       progress=progress if bar.enabled else None)
        finally:
            bar.close()
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    verb = "unmerged" if args.unmerge else "merged"
    print(f"{verb} {len(summary['modules'])} module(s) into {args.out}")
    for row in summary["modules"]:
        extra = (" dora" if row["dora"] else "") + (" fan_in_fan_out" if row["fan_in_fan_out"] and
                                                    row["kind"] == "linear" else "")
        print(f"  {row['module']:<40} {row['kind']:<9} r={row['rank']:<4} alpha={row['alpha']:<8g} "
              f"scale={row['scale']:<10.6g} {row['dtype']}{extra}")
    for row in summary["replaced"]:
        print(f"  {row['tensor']:<40} copied from the adapter ({row['from']})")
    reasons: dict[str, list[str]] = {}
    for row in summary["not_bit_equal"]:
        reasons.setdefault(row["why"], []).append(row["tensor"])
    for why, names in reasons.items():
        what = names[0] if len(names) == 1 else f"{len(names)} tensors ({names[0]}, ...)"
        print(f"  {what:<40} not guaranteed bit-equal to PEFT: {why}")
    sys.stdout.flush()
    return 0
