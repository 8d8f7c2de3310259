"""Shared pieces for the command modules (``minilora/cli/*.py``): integer argument types, the
progress line, and ``fail`` for a one-line error exit."""

from __future__ import annotations

import argparse
import sys
from typing import Any

EXIT_USAGE = 2


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
