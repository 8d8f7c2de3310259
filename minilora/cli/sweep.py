"""``minilora sweep``: train at several ranks and seeds in parallel, report a table (see ``minilora.sweep``)."""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

from minilora.cli.common import Progress, fail, int_at_least, output_file_problem, path_argument, writing
from minilora.formats.fileio import atomic_open
from minilora.study.plots import pyplot, save_png


def register(sub: Any) -> None:
    from minilora.study.sweep import TASKS

    p = sub.add_parser(
        "sweep",
        help="train LoRA at several ranks (seed experiment and a synthetic task), compare them",
        description="Run the seed experiment and a synthetic task whose target update has a chosen "
        "intrinsic rank, for every rank and seed, through a process pool (or a Dask scheduler); "
        "report final loss, merged-weight error, trainable parameters and time per rank.",
    )
    p.add_argument("--ranks", type=int_at_least(1), nargs="+", default=[1, 2, 4, 8], metavar="R",
                   help="LoRA ranks (default: 1 2 4 8)")
    p.add_argument("--seeds", type=int_at_least(0), nargs="+", default=[0], metavar="S",
                   help="random seeds; the table shows means over them (default: 0)")
    p.add_argument("--tasks", choices=TASKS, nargs="+", default=list(TASKS), help="default: both")
    p.add_argument("--steps", type=int_at_least(1), default=300, help="Adam steps per case (default 300)")
    p.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate (default 1e-2)")
    p.add_argument("--intrinsic-rank", type=int_at_least(1), default=4,
                   help="rank of the synthetic task's target update (default 4)")
    p.add_argument("--compare", type=int_at_least(1), nargs=2, metavar=("R1", "R2"),
                   help="the two ranks for the subspace-similarity heat map (default: smallest, largest)")
    p.add_argument("--workers", type=int_at_least(1), help="processes in the local pool (default: all cores)")
    p.add_argument("--scheduler", metavar="ADDRESS", type=path_argument("an address"),
                   help="run the cases on a Dask distributed scheduler, e.g. tcp://host:8786 (needs dask[distributed])")
    p.add_argument("--connect-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="how long to try reaching --scheduler (default 10)")
    p.add_argument("--json", metavar="PATH", type=path_argument(), help="write the results as JSON to PATH ('-': stdout, no table)")
    p.add_argument("--plot", metavar="PATH", type=path_argument(), help="write loss curves and the similarity heat map as a PNG (needs matplotlib)")
    p.set_defaults(func=run)


def case_line(done: int, total: int, record: dict) -> str:
    """``  case 3/8  synthetic r=4 seed 0``: the progress line of one finished case."""
    return f"  case {done}/{total}  {record['task']} r={record['rank']} seed {record['seed']}"


def run(args: argparse.Namespace) -> int:
    from minilora.study.sweep import sweep

    if args.plot:
        try:
            import matplotlib  # noqa: F401  (fail before training, not after)
        except ImportError as exc:
            return fail(f"--plot needs matplotlib ({exc}): pip install 'minilora[plot]'")
    for option, path in (("--plot", args.plot), ("--json", args.json)):
        if path and path != "-" and (problem := output_file_problem(option, path)):
            return fail(problem)
    if args.plot and args.json and os.path.abspath(args.plot) == os.path.abspath(args.json):
        return fail(f"--plot and --json name the same file {args.plot}")
    if not args.connect_timeout > 0:
        return fail(f"--connect-timeout must be > 0 seconds; got {args.connect_timeout}")
    if len(set(args.ranks)) != len(args.ranks):
        return fail(f"--ranks must not repeat a value; got {' '.join(map(str, args.ranks))}")
    if args.compare and any(r not in args.ranks for r in args.compare):
        return fail(f"--compare ranks must be among --ranks {' '.join(map(str, args.ranks))}; "
                    f"got {' '.join(map(str, args.compare))}")

    client = None
    executor = None
    if args.scheduler:
        try:
            from distributed import Client
        except ImportError as exc:
            return fail(f"--scheduler needs dask.distributed ({exc}): pip install 'minilora[sweep]'")
        try:
            client = Client(args.scheduler, timeout=f"{args.connect_timeout}s")
        except (OSError, TimeoutError, ValueError) as exc:
            return fail(f"--scheduler: cannot connect to {args.scheduler!r} ({type(exc).__name__}: {exc})")
        executor = client.get_executor(pure=False)
    progress = Progress()
    start = time.perf_counter()
    try:
        out = sweep(
            args.ranks, args.seeds, tasks=args.tasks, steps=args.steps, lr=args.lr,
            intrinsic_rank=args.intrinsic_rank, compare=tuple(args.compare) if args.compare else None,
            executor=executor, max_workers=args.workers, on_result=lambda done, total, record: progress.show(case_line(done, total, record)),
        )
    finally:
        progress.close()
        if client is not None:
            client.close()
    out["where"] = f"dask scheduler {args.scheduler}" if args.scheduler else \
        f"process pool, {args.workers or os.cpu_count()} workers"
    if args.plot:
        with writing("--plot", args.plot):
            plot_sweep(out, args.plot)
    if args.json:
        text = json.dumps(out)
        if args.json == "-":
            print(text)
        else:
            with writing("--json", args.json), atomic_open(args.json, "w", encoding="utf-8") as fh:
                fh.write(text + "\n")
    if args.json != "-":
        print(sweep_table(out, wall=time.perf_counter() - start))
        for option, path in (("json", args.json), ("plot", args.plot)):
            if path:
                print(f"  {option:<8}{path}")
    return 0


def sweep_table(out: dict, *, wall: float | None = None) -> str:
    from minilora.study.sweep import summarize

    s = out["settings"]
    seeds = " ".join(map(str, s["seeds"]))
    lines = [
        (f"minilora sweep: ranks {' '.join(map(str, s['ranks']))}, seeds {seeds}, {s['steps']} Adam steps "
         f"(lr {s['lr']:g}); {out.get('where', '')}"),
        f"  {'task':<10} {'rank':>4} {'params':>7} {'final loss':>12} {'W error':>9} {'best':>7} {'time/case':>10}",
    ]
    for row in summarize(out["results"]):
        best = "" if row["best_error"] is None else f"{row['best_error']:.4f}"
        lines.append(
            f"  {row['task']:<10} {row['rank']:>4} {row['lora_params']:>7} {row['final_loss']:>12.6g} "
            f"{row['rel_error']:>9.4f} {best:>7} {row['seconds']:>9.3f}s"
        )
    lines.append("  W error: seed: ||W_merged - W_finetuned||_F / ||W_finetuned||_F; synthetic: "
                 f"||s B A - dW*||_F / ||dW*||_F (target rank {s['intrinsic_rank']}); best: the rank-r floor")
    for task, sim in out["similarity"].items():
        r1, r2 = sim["ranks"]
        grid = sim["grid"]
        lines.append(f"  subspace similarity phi(A_r={r1}, A_r={r2}, i, j), {task}, seed {sim['seed']}:")
        for i, row in enumerate(grid[:8], start=1):
            cells = " ".join(f"{v:.2f}" for v in row[:16])
            lines.append(f"    i={i:<3} j=1..{min(len(row), 16)}: {cells}")
        if len(grid) > 8:
            lines.append(f"    ... ({len(grid)} rows in --json)")
    if wall is not None:
        lines.append(f"  total time {wall:.1f} s")
    return "\n".join(lines)


def plot_sweep(out: dict, path: str) -> None:
    """Write ``sweep_figure(out)`` as a PNG, atomically."""
    save_png(sweep_figure(out), path)


def sweep_figure(out: dict) -> Any:
    """Loss curves per rank (mean over seeds) and the subspace-similarity heat map, one row per
    task (a matplotlib Figure)."""
    import numpy as np

    plt = pyplot()

    tasks = out["settings"]["tasks"]
    fig, axes = plt.subplots(len(tasks), 2, figsize=(11, 4 * len(tasks)), squeeze=False,
                             gridspec_kw={"width_ratios": [3, 2]})
    for row, task in enumerate(tasks):
        ax = axes[row][0]
        for rank in out["settings"]["ranks"]:
            curves = [r["losses"] for r in out["results"] if r["task"] == task and r["rank"] == rank]
            mean = np.mean(np.asarray(curves), axis=0)
            ax.semilogy(np.arange(1, mean.size + 1), mean, label=f"r={rank}: final {mean[-1]:.3g}")
        ax.set_xlabel("step")
        ax.set_ylabel("mean L1 loss" if task == "seed" else "mean squared error")
        n_seeds = len(out["settings"]["seeds"])
        ax.set_title(f"{task} task: loss per rank" + (f" (mean over {n_seeds} seeds)" if n_seeds > 1 else ""))
        ax.legend(fontsize=8)
        sim = out["similarity"][task]
        grid = np.asarray(sim["grid"])
        r1, r2 = sim["ranks"]
        ax = axes[row][1]
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="upper",
                       extent=(0.5, grid.shape[1] + 0.5, grid.shape[0] + 0.5, 0.5))
        ax.set_xlabel(f"j (top directions of A, r={r2})")
        ax.set_ylabel(f"i (top directions of A, r={r1})")
        ax.set_title(f"{task}: phi(A_r={r1}, A_r={r2}, i, j)")
        if grid.size <= 64:  # small grids: print the values the table prints
            for (i, j), v in np.ndenumerate(grid):
                ax.text(j + 1, i + 1, f"{v:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if v < 0.5 else "black")
        if grid.shape[1] <= 16:
            ax.set_xticks(range(1, grid.shape[1] + 1))
        if grid.shape[0] <= 16:
            ax.set_yticks(range(1, grid.shape[0] + 1))
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return fig
