"""The cost of ``import minilora`` over ``import numpy``, each in a fresh interpreter.

Each run starts a new Python process that imports numpy, then minilora, timing both with
``time.perf_counter``; the report is the median over --runs processes (the first run, which
warms the disk cache, is discarded). Target: minilora adds at most 60 ms to numpy's import.

    python benchmarks/bench_import.py [--runs 15] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
PROBE = (
    "import time, sys; t0 = time.perf_counter(); import numpy; t1 = time.perf_counter(); "
    "import minilora; t2 = time.perf_counter(); "
    "heavy = sorted(m for m in ('scipy', 'torch', 'matplotlib', 'array_api_compat', 'cupy') if m in sys.modules); "
    "print(t1 - t0, t2 - t1, ','.join(heavy))"
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=15)
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    numpy_s, extra_s, heavy = [], [], set()
    for i in range(args.runs + 1):
        out = subprocess.run([sys.executable, "-c", PROBE], env=env, check=True, capture_output=True, text=True)
        a, b, *mods = out.stdout.split()
        heavy.update(m for m in (mods[0].split(",") if mods else []) if m)
        if i:  # the first run warms the disk cache
            numpy_s.append(float(a))
            extra_s.append(float(b))
    rec = {
        "runs": args.runs, "numpy_ms": 1e3 * statistics.median(numpy_s),
        "minilora_extra_ms": 1e3 * statistics.median(extra_s), "heavy_modules_imported": sorted(heavy),
        "python": sys.version.split()[0],
    }
    print(f"import numpy: {rec['numpy_ms']:.1f} ms; import minilora on top: {rec['minilora_extra_ms']:.1f} ms "
          f"(median of {args.runs} fresh interpreters; target <= 60 ms); "
          f"heavy modules imported: {', '.join(rec['heavy_modules_imported']) or 'none'}")
    if args.json:
        sys.path.insert(0, ROOT)
        from minilora.formats.fileio import atomic_open

        with atomic_open(args.json, "w") as fh:
            json.dump(rec, fh, indent=1)
        print(f"wrote {args.json}")
    return 0 if rec["minilora_extra_ms"] <= 60 and not heavy else 1


if __name__ == "__main__":
    raise SystemExit(main())
