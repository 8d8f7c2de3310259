"""The ``minilora`` command. A user mistake prints one line on stderr and exits non-zero."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from typing import Any, NoReturn

from .errors import MiniLoraError

EXIT_USAGE = 2


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (no usage dump) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _nonneg_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .demo import ORIENTATIONS

    parser = _OneLineParser(prog="minilora", description="A reference implementation of LoRA in NumPy.")
    parser.add_argument("--version", action="version", version=f"minilora {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_OneLineParser)
    sub.required = True
    demo = sub.add_parser(
        "demo",
        help="reproduce the seed blog experiment (100x100, rank-4 LoRA, 1000 Adam steps)",
        description="Fine-tune W = I(100) towards a rank-1 target with rank-4 LoRA "
        "(mean L1 loss, Adam lr 1e-2), merge, and report the error.",
    )
    demo.add_argument("--steps", type=_positive_int, default=1000, help="Adam steps (default 1000)")
    demo.add_argument("--rank", type=_positive_int, default=4, help="LoRA rank r (default 4)")
    demo.add_argument("--seed", type=_nonneg_int, default=0, help="random seed (default 0)")
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
    demo.add_argument("--plot", metavar="PATH", help="write the loss curve as a PNG (needs matplotlib)")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except MiniLoraError as exc:
        print(f"minilora: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("minilora: interrupted", file=sys.stderr)
        return 130


# ---------------------------------------------------------------- demo


class _Progress:
    """A one-line progress indicator on a terminal; silent otherwise."""

    def __init__(self, total: int, stream: Any = None) -> None:
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty()
        self.every = max(1, total // 100)

    def __call__(self, step: int, loss: float, params: Any, state: Any) -> None:
        if self.enabled and (step % self.every == 0 or step == self.total):
            self.stream.write(f"\r  step {step:>6}/{self.total}  loss {loss:12.6f}")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\r" + " " * 44 + "\r")
            self.stream.flush()


def _cmd_demo(args: argparse.Namespace) -> int:
    from .backend import use_backend
    from .demo import seed_experiment

    if args.plot:
        try:
            import matplotlib  # noqa: F401  (fail before training, not after)
        except ImportError as exc:
            print(f"minilora: error: --plot needs matplotlib ({exc}): pip install 'minilora[plot]'",
                  file=sys.stderr)
            return 1
        folder = os.path.dirname(os.path.abspath(args.plot))
        if not os.path.isdir(folder):
            print(f"minilora: error: --plot: folder {folder} does not exist", file=sys.stderr)
            return 1
    device = None
    if args.backend == "array_api_strict":
        try:
            import array_api_strict

            device = array_api_strict.Device("device1")
        except ImportError:
            pass  # use_backend reports the missing package in one line
    progress = _Progress(args.steps)
    with use_backend(args.backend, device=device):
        try:
            result = seed_experiment(
                steps=args.steps, rank=args.rank, seed=args.seed, dtype=args.dtype, lr=args.lr,
                orientation=args.orientation, callback=progress,
            )
        finally:
            progress.close()
    if args.plot:
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
    """Write a log-scale loss curve to ``path`` atomically (temp file, then rename)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.semilogy(range(1, len(losses) + 1), losses)
    ax.set_xlabel("step")
    ax.set_ylabel("mean L1 loss")
    ax.set_title(title)
    fig.tight_layout()
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".minilora-", suffix=".png")
    try:
        with os.fdopen(fd, "wb") as fh:
            fig.savefig(fh, format="png")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    finally:
        plt.close(fig)
