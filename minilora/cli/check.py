"""``minilora check TARGET``: run the conformance suite against torch, peft, loralib or a
``module:Class`` adapter and print a table (see ``minilora.testing.conformance``)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from minilora.cli.common import Progress, fail, int_at_least, output_file_problem, writing
from minilora.formats.fileio import atomic_open

DTYPE_CHOICES = ("float64", "float32", "float16", "bfloat16")


def register(sub: Any) -> None:
    from minilora.testing.conformance import PROPERTIES

    check = sub.add_parser(
        "check",
        help="check a LoRA implementation against minilora (torch, peft, loralib or module:Class)",
        description="Run the conformance properties (forward, gradients, merge/unmerge, Adam steps, init) "
        "against TARGET in each dtype it supports, over fixed edge cases and seeded hypothesis cases, "
        "with the tolerance of minilora.testing (docs/tolerance.md). Exits 1 if any property fails.",
    )
    check.add_argument("target", metavar="TARGET", help="torch, peft, loralib, or module:Class for your own adapter")
    check.add_argument("--max-examples", type=int_at_least(0), default=20,
                       help="hypothesis cases per dtype, besides the fixed edge cases (default 20)")
    check.add_argument("--seed", type=int_at_least(0), default=0, help="seed of the hypothesis cases (default 0)")
    check.add_argument("--json", metavar="PATH", help="also write the report as JSON to PATH")
    check.add_argument("--dtype", action="append", choices=DTYPE_CHOICES,
                       help="only this dtype (repeatable; default: every dtype the target supports)")
    check.add_argument("--property", action="append", choices=PROPERTIES, dest="properties",
                       help="only this property (repeatable; default: all)")
    check.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        import hypothesis  # noqa: F401  (the cases are drawn with it)
    except ImportError as exc:
        return fail(f"minilora check needs hypothesis ({exc}): pip install 'minilora[check]'")
    from minilora.testing.adapters import adapter_dtypes, load_adapter
    from minilora.testing.conformance import check, planned

    if args.json and (problem := output_file_problem("--json", args.json)):
        return fail(problem)
    adapter = load_adapter(args.target)  # a bad target raises a MiniLoraError: one line from cli.main
    pairs = planned(adapter, args.dtype, args.properties)
    if not pairs:
        return fail(f"nothing to check: {args.target} runs none of the properties {args.properties or 'all'} in "
                    f"dtypes {args.dtype} (it supports {', '.join(adapter_dtypes(adapter))}; adam skips float16, "
                    "init runs in float32)")
    progress = Progress()
    try:
        report = check(adapter, dtypes=args.dtype, properties=args.properties, max_examples=args.max_examples,
                       seed=args.seed, progress=lambda label, done, total: progress.show(f"  checking {label:<16} {done:>5}/{total}"))
    finally:
        progress.close()
    report.target = args.target
    versions = ", ".join(f"{k} {v}" for k, v in report.versions.items() if k != "python")
    print(f"minilora check {args.target}: {versions}; seed {args.seed}, "
          f"{args.max_examples} hypothesis cases per dtype plus fixed edge cases")
    print(report.table())
    failures = report.failures()
    for message in failures:
        print(message)
    failed = len(failures)
    total = len(report.results)
    if failed:
        print(f"{failed} of {total} checks FAILED ({report.seconds:.1f} s)")
    else:
        print(f"all {total} checks passed ({report.seconds:.1f} s)")
    if args.json:
        with writing("--json", args.json), atomic_open(args.json, "w", encoding="utf-8") as fh:
            json.dump(report.to_dict(), fh, indent=1)
            fh.write("\n")
    sys.stdout.flush()
    return 1 if failed else 0
