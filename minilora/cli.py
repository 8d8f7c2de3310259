"""The ``minilora`` command. A user mistake prints one line on stderr and exits non-zero.

Shared pieces for the command modules (``cli_*.py``): the one-line parser, integer argument
types, the progress line, and ``fail`` for a one-line error exit.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from .errors import MiniLoraError

EXIT_USAGE = 2


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (no usage dump) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def int_at_least(minimum: int) -> Any:
    """An argparse type: an integer >= ``minimum``, with a one-line error otherwise."""
    what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    return parse


# Each command lives in its own module with a ``register(subparsers)`` function; a module is
# imported only to build the parser, and imports its heavy dependencies inside its functions.
COMMAND_MODULES = ("cli_demo", "cli_sweep", "cli_params", "cli_check", "cli_vectors", "cli_merge", "cli_inspect")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _OneLineParser(prog="minilora", description="A reference implementation of LoRA in NumPy.")
    parser.add_argument("--version", action="version", version=f"minilora {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_OneLineParser)
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(f"minilora.{name}").register(sub)
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
    except BrokenPipeError:  # the reader went away (``minilora params | head``): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 141


def fail(message: str, code: int = 1) -> int:
    """Print ``minilora: error: message`` on stderr (one line) and return the exit code."""
    print(f"minilora: error: {message}", file=sys.stderr)
    return code


class Progress:
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
