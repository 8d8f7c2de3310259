"""``minilora demo``: the seed blog experiment (see ``minilora.demo``)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from minilora.cli.common import Progress, fail, int_at_least, output_file_problem, path_argument, writing
from minilora.study.plots import pyplot, save_png


def register(sub: Any) -> None:
    from minilora.study.seed import ORIENTATIONS

    demo = sub.add_parser(
        "demo",
        help="reproduce the seed blog experiment (100x100, rank-4 LoRA, 1000 Adam steps)",
        description="Fine-tune W = I(100) towards a rank-1 target with rank-4 LoRA "
        "(mean L1 loss, Adam lr 1e-2), merge, and report the error.",
    )
    demo.add_argument("--steps", type=int_at_least(1), default=1000, help="Adam steps (default 1000)")
    demo.add_argument("--rank", type=int_at_least(1), default=4, help="LoRA rank r (default 4)")
    demo.add_argument("--seed", type=int_at_least(0), default=0, help="random seed (default 0)")
    demo.add_argument("--dtype", choices=("float32", "float64"), default="float64")
    demo.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate (default 1e-2)")
    demo.add_argument(
        "--orientation", choices=ORIENTATIONS, default="seed",
        help="seed: the blog's factors (zero factor applied to x first); "
        "peft: A ~ N(0,1), B = 0 as in the paper and PEFT",
    )
    demo.add_argument(
        "--backend", choices=("numpy", "array_api_strict", "cupy"), default="numpy",
        help="array backend (array_api_strict runs on its non-default 'device1', like a GPU)",
    )
    demo.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    demo.add_argument("--plot", metavar="PATH", type=path_argument(), help="write the loss curve as a PNG (needs matplotlib)")
    demo.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from minilora.backend import use_backend
    from minilora.study.seed import seed_experiment

    if args.plot:
        try:
            import matplotlib  # noqa: F401  (fail before training, not after)
        except ImportError as exc:
            return fail(f"--plot needs matplotlib ({exc}): pip install 'minilora[plot]'")
        if problem := output_file_problem("--plot", args.plot):
            return fail(problem)
    device = None
    if args.backend == "array_api_strict":
        try:
            import array_api_strict

            device = array_api_strict.Device("device1")
        except ImportError:
            pass  # use_backend reports the missing package in one line
    progress = Progress(args.steps)
    with use_backend(args.backend, device=device):
        try:
            result = seed_experiment(
                steps=args.steps, rank=args.rank, seed=args.seed, dtype=args.dtype, lr=args.lr,
                orientation=args.orientation, callback=progress,
            )
        finally:
            progress.close()
    if args.plot:
        with writing("--plot", args.plot):
            _plot_losses(result["losses"], args.plot, title=f"seed experiment, rank {args.rank}")
    if args.json:
        report = {k: v for k, v in result.items() if k != "losses"}
        report["losses_tail"] = result["losses"][-3:]
        print(json.dumps(report))
    else:
        print(_demo_table(result))
        if args.plot:
            print(f"  loss curve            {args.plot}")
    return 0


def _demo_table(r: dict) -> str:
    share = 100.0 * r["lora_params"] / r["original_params"]
    tail = " ".join(f"{v:.6f}" for v in r["losses"][-3:])
    return "\n".join([
        f"minilora demo: the seed experiment (W = I(100), rank {r['rank']}, Adam lr {r['lr']:g}, "
        f"{r['steps']} steps of mean L1, {r['orientation']} orientation)",
        f"  original parameters   {r['original_params']}",
        f"  LoRA parameters       {r['lora_params']}  ({share:.1f}% of the original)",
        f"  first loss            {r['losses_first']:.6f}",
        f"  last losses           {tail}",
        f"  merged W vs target    relative Frobenius error {r['rel_error']:.6f}, "
        f"max abs error {r['max_abs_error']:.4f}",
        f"  time                  {r['seconds']:.3f} s ({r['backend']}, {r['dtype']})",
    ])


def _plot_losses(losses: list[float], path: str, *, title: str) -> None:
    """Write a log-scale loss curve to ``path`` as a PNG, atomically."""
    fig, ax = pyplot().subplots(figsize=(6, 4))
    ax.semilogy(range(1, len(losses) + 1), losses)
    ax.set_xlabel("step")
    ax.set_ylabel("mean L1 loss")
    ax.set_title(title)
    fig.tight_layout()
    save_png(fig, path)
