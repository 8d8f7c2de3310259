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
    """One progress line on a terminal, redrawn in place; silent when the stream is not a terminal.

    ``show(line)`` draws any line (the check and sweep commands describe their cases with it);
    called as ``fit``'s callback ``(step, loss, params, state)`` it shows the training step and loss
    about every 1% of ``total`` steps. ``close()`` clears the line.
    """

    def __init__(self, total: int = 0, stream: Any = None) -> None:
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty()
        self.every = max(1, total // 100)
        self.width = 0

    def show(self, line: str) -> None:
        if self.enabled:
            self.width = max(self.width, len(line))
            self.stream.write("\r" + line.ljust(self.width))
            self.stream.flush()

    def __call__(self, step: int, loss: float, params: Any, state: Any) -> None:
        if step % self.every == 0 or step == self.total:
            self.show(f"  step {step:>6}/{self.total}  loss {loss:12.6f}")

    def close(self) -> None:
        if self.enabled and self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()
