"""How should r be chosen? Sweep ranks on a task whose answer is known.

    python examples/rank_sweep.py [--intrinsic-rank 4] [--ranks 1 2 3 4 6 8] [--plot sweep.png]

The target update dW* has rank k (singular values k, k-1, ..., 1). Below rank k, LoRA can only
reach the best rank-r approximation of dW* (Eckart-Young); from rank k on the error vanishes,
and extra rank buys nothing. The cases run on a thread pool here: any
``concurrent.futures.Executor`` will do (``minilora sweep`` uses processes, or Dask).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import sys

import numpy as np

from minilora.study.plots import pyplot, save_png  # matplotlib on Agg; atomic PNG writes
from minilora.study.sweep import sweep


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 3, 4, 6, 8])
    parser.add_argument("--intrinsic-rank", type=int, default=4)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--plot", metavar="PATH", help="error against rank as a PNG (needs matplotlib)")
    args = parser.parse_args(argv)

    with cf.ThreadPoolExecutor(max_workers=2) as pool:
        out = sweep(args.ranks, tasks=["synthetic"], steps=args.steps,
                    intrinsic_rank=args.intrinsic_rank, executor=pool)
    k = args.intrinsic_rank
    print(f"target update of rank {k}; {args.steps} Adam steps per rank")
    print(f"  {'rank':>4} {'params':>7} {'error':>8} {'floor':>8}   error = ||s B A - dW*||_F / ||dW*||_F")
    for r in out["results"]:
        note = "  <- r = k" if r["rank"] == k else ""
        print(f"  {r['rank']:>4} {r['lora_params']:>7} {r['rel_error']:>8.4f} {r['best_error']:>8.4f}{note}")
    sim = out["similarity"]["synthetic"]
    r1, r2 = sim["ranks"]
    print(f"top direction of A at r={r1} inside the top j directions at r={r2}: phi(1, j) = "
          + " ".join(f"{v:.2f}" for v in sim["grid"][0]))

    if args.plot:
        try:
            plt = pyplot()
        except ImportError:
            print("--plot needs matplotlib: pip install 'minilora[plot]'", file=sys.stderr)
            return 1
        ranks = np.array([r["rank"] for r in out["results"]])
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(ranks, [r["rel_error"] for r in out["results"]], "o-", label="LoRA after training")
        ax.plot(ranks, [r["best_error"] for r in out["results"]], "k--", label="best rank-r (Eckart-Young)")
        ax.axvline(k, color="grey", lw=0.8)
        ax.set_xlabel("LoRA rank r")
        ax.set_ylabel("relative error of the learned update")
        ax.set_title(f"target update of rank {k}")
        ax.legend()
        fig.tight_layout()
        save_png(fig, args.plot)
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
