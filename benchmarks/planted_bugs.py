"""The self-test of ``minilora check``, measured: every planted bug of tests/testing/planted.py at
each of --seeds seeds (default 10, --max-examples 20, the CLI default), and the honest adapters
at each seed with --honest-examples cases (default 200). Prints one line per run and a summary;
--json PATH writes the lines as JSON.

    PYTHONPATH=. python benchmarks/planted_bugs.py --seeds 10 --json planted.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "testing"))

import planted  # noqa: E402

from minilora.testing.conformance import check  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--max-examples", type=int, default=20)
    ap.add_argument("--honest-examples", type=int, default=200)
    ap.add_argument("--skip-bugs", action="store_true")
    ap.add_argument("--skip-honest", action="store_true")
    ap.add_argument("--only", help="comma-separated adapter names (default: every bug and honest adapter)")
    ap.add_argument("--json")
    args = ap.parse_args()
    only_names = set(args.only.split(",")) if args.only else None

    def chosen(cls: type) -> bool:
        return only_names is None or cls.__name__ in only_names

    lines = []
    missed = false_alarms = runs = 0
    if not args.skip_bugs:
        for seed in range(args.seeds):
            for bug, props in planted.BUGS.items():
                if not chosen(bug):
                    continue
                start = time.perf_counter()
                report = check(bug, max_examples=args.max_examples, seed=seed, properties=sorted(props))
                only = planted.ONLY_IN.get(bug)
                rows = [r for r in report.results if not only or r.dtype in only]
                miss = [f"{r.property}/{r.dtype}" for r in rows if not r.failed]
                missed += bool(miss)
                runs += 1
                lines.append({"kind": "bug", "adapter": bug.__name__, "seed": seed, "rows": len(rows),
                              "missed": miss, "seconds": round(time.perf_counter() - start, 2)})
                print(json.dumps(lines[-1]), flush=True)
    honest_runs = 0
    if not args.skip_honest:
        for seed in range(args.seeds):
            for adapter in planted.HONEST:
                if not chosen(adapter):
                    continue
                start = time.perf_counter()
                report = check(adapter, max_examples=args.honest_examples, seed=seed)
                bad = [r.message() for r in report.results if r.failed]
                false_alarms += bool(bad)
                honest_runs += 1
                lines.append({"kind": "honest", "adapter": adapter.__name__, "seed": seed,
                              "cases": sum(r.cases for r in report.results), "false_alarms": bad,
                              "worst_ratio": max(r.worst.ratio for r in report.results if r.worst is not None),
                              "seconds": round(time.perf_counter() - start, 2)})
                print(json.dumps(lines[-1]), flush=True)
    print(f"planted bugs: {runs - missed} of {runs} runs caught every bug in every row; "
          f"honest adapters: {honest_runs - false_alarms} of {honest_runs} runs without a false alarm")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(lines, fh, indent=1)
    return 1 if missed or false_alarms else 0


if __name__ == "__main__":
    sys.exit(main())
