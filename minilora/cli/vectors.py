"""``minilora vectors export|verify DIR``: golden vectors for other implementations (see
``minilora.vectors`` and docs/vectors.md)."""

from __future__ import annotations

import argparse
import os
from typing import Any

from minilora.cli.common import fail, output_folder_problem, path_argument, writing


def register(sub: Any) -> None:
    vectors = sub.add_parser(
        "vectors",
        help="write or check golden vectors (manifest.json + safetensors) for other implementations",
        description="export: write minilora's answers on fixed LoRA problems to DIR (manifest.json and one "
        "safetensors file per group, each with its SHA-256). verify: check DIR against this minilora.",
    )
    vectors.add_argument("action", choices=("export", "verify"), help="export or verify")
    vectors.add_argument("folder", metavar="DIR", type=path_argument(), help="the vector folder")
    vectors.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from minilora.testing.vectors import export, verify

    if args.action == "export":
        if problem := output_folder_problem("", args.folder):
            return fail(problem)
        with writing("", args.folder):
            written = export(args.folder)
        names = ", ".join(os.path.basename(p) for p in written)
        print(f"minilora vectors: wrote {len(written)} files to {args.folder}: {names}")
        return 0
    report = verify(args.folder)
    if report.failures:
        for message in report.failures:
            print(f"FAIL {message}")
        return fail(f"{len(report.failures)} of {report.cases} cases in {args.folder} disagree with minilora "
                    f"{report.minilora_version} or leave something unchecked")
    print(f"minilora vectors: {args.folder}: all {report.cases} cases ({report.outputs} outputs and refusals) in {report.groups} groups agree with "
          f"minilora {report.minilora_version} (files and SHA-256 checked)")
    return 0
