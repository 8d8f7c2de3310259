"""``minilora check TARGET``: run the conformance suite against torch, peft, loralib or a
``module:Class`` adapter and print a table (see ``minilora.testing.conformance``)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from minilora.cli.common import Progress, fail, int_at_least, output_file_problem, path_argument, writing
from minilora.formats.fileio import atomic_open

DTYPE_CHOICES = ("float64", "float32", "float16", "bfloat16")


def register(sub: Any) -> None:
    from minilora.testing.conformance import PROPERTIES

    check = sub.add_parser(
        "check",
        help="check a LoRA implementation against minilora (torch, peft, loralib or module:Class)",
        description="Run the conformance properties (forward, gradients, merge/unmerge, Adam steps, init; "
        "DoRA, LoRA embeddings and the trainable set under PEFT's bias modes, where the target has them) "
        "against TARGET in each dtype it supports, over fixed edge cases and seeded hypothesis cases, "
        "with the tolerance of minilora.testing (docs/tolerance.md). Exits 1 if any property fails.",
    )
    check.add_argument("target", metavar="TARGET", type=path_argument("a target"), help="torch, peft, loralib, or module:Class for your own adapter")
    check.add_argument("--max-examples", type=int_at_least(0), default=20,
                       help="hypothesis cases per dtype, besides the fixed edge cases (default 20)")
    check.add_argument("--seed", type=int_at_least(0), default=0, help="seed of the hypothesis cases (default 0)")
    check.add_argument("--json", metavar="PATH", type=path_argument(), help="also write the report as JSON to PATH")
    check.add_argument("--dtype", action="append", choices=DTYPE_CHOICES,
                       help="only this dtype (repeatable; default: every dtype the target supports)")
    check.add_argument("--property", action="append", choices=PROPERTIES, dest="properties",
                       help="only this property (repeatable; default: all)")
    check.add_argument("--verbose", action="store_true", help="also print every case's result")
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
    if args.json and (source := _source_of(args.json, args.target, adapter)):
        return fail(f"--json {args.json}: is the source of the target ({source}); write the report elsewhere")
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
    if args.json:  # written before anything is printed: a closed pipe or a crash while printing keeps it
        with writing("--json", args.json), atomic_open(args.json, "w", encoding="utf-8") as fh:
            json.dump(report.to_dict(), fh, indent=1)
            fh.write("\n")
    versions = ", ".join(f"{k} {v}" for k, v in report.versions.items() if k != "python")
    print(f"minilora check {args.target}: {versions}; seed {args.seed}, "
          f"{args.max_examples} hypothesis cases per dtype plus fixed edge cases")
    declared = _declared_line(report.declared)
    if declared:
        print(f"declared: {declared}")
    print(report.table())
    if args.verbose:
        print(report.verbose())
    failures = report.failures()
    for message in failures:
        print(message)
    for message in report.notes():
        print(message)
    failed = len(failures)
    total = len(report.results)
    others = len(report.notes())
    tail = f", {others} not covered or n/a" if others else ""
    if failed:
        print(f"{failed} of {total} checks FAILED{tail} ({report.seconds:.1f} s)")
    elif not report.passed:
        print(f"nothing passed: {others} of {total} checks not covered or n/a ({report.seconds:.1f} s)")
    else:
        print(f"all {total - others} checks passed{tail} ({report.seconds:.1f} s)")
    sys.stdout.flush()
    return 0 if report.passed else 1


def _source_of(path: str, target: str, adapter: Any) -> str | None:
    """The target's module file (the module named in 'module:Class', or the adapter class's) when
    ``path`` is that file: the report must not be written over the code it checks."""
    if not os.path.exists(path):
        return None
    names = {type(adapter).__module__} | ({target.split(":", 1)[0]} if ":" in target else set())
    for name in names:
        source = getattr(sys.modules.get(name), "__file__", None)
        if source and os.path.exists(source) and os.path.samefile(path, source):
            return source
    return None


def _declared_line(declared: dict) -> str:
    """What the adapter declared that changes the check: precision other than its dtype, and
    known differences."""
    parts = []
    for dt, prec in declared.get("precision", {}).items():
        bits = [f"{k} {v}" for k, v in prec.items() if v != (dt if k != "bias_correction" else "float64")]
        if bits:
            parts.append(f"{dt}: " + ", ".join(bits))
    if declared.get("adam_eps", "torch") != "torch":
        parts.append(f"Adam eps {declared['adam_eps']} (eps added to sqrt(v) before the bias correction)")
    if declared.get("dora_bias", "peft") != "peft":
        parts.append(f"DoRA bias {declared['dora_bias']} (the forward scales b by m/||W + sBA||)")
    line = "; ".join(parts)
    known = declared.get("known_differences") or []
    if known:
        line += ("; " if line else "") + f"{len(known)} known differences (see --json)"
    return line
