"""Shared pieces for the command modules (``minilora/cli/*.py``): integer argument types, the
progress line, ``fail`` for a one-line error exit, and the checks of output paths (before the
work starts) and of their writes (an OSError as one line naming the path)."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any

from minilora.errors import MiniLoraValueError
from minilora.formats.fileio import unwritable_reason

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


def path_argument(what: str = "a path") -> Any:
    """An argparse type: a non-empty string (``--plot ''`` would otherwise be read as no
    ``--plot`` at all, and an empty OUT as the current folder)."""

    def parse(text: str) -> str:
        if not text:
            raise argparse.ArgumentTypeError(f"expected {what}, got an empty string")
        return text

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


# ---------------------------------------------------------------- output paths


class Stopped(BaseException):
    """A signal (SIGTERM, SIGHUP, SIGQUIT) ending a command the way Ctrl-C does: raised by the
    handler, so the stack unwinds and temp files go; ``cli.main`` prints one line and exits
    128 + the signal number."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class OutputError(MiniLoraValueError):
    """An output path that cannot be written (reported by ``cli.main`` as one line)."""


def _label(option: str, path: str) -> str:
    return f"{option} {path}" if option else path


def _probe(label: str, folder: str) -> str | None:
    """Create and remove a file in ``folder``: a read-only or otherwise unwritable location is
    found before the work, not after it (os.access would say yes to root on a read-only mount)."""
    reason = unwritable_reason(folder)
    return None if reason is None else f"{label}: cannot write in {folder}: {reason}"


def output_file_problem(option: str, path: str) -> str | None:
    """Why ``path`` cannot be written as a file (None when it can): a folder, a name ending in a
    slash, a missing or unwritable folder, or an existing entry that is not a regular file."""
    label = _label(option, path)
    if not path:
        return f"{option}: an empty path"
    if path.endswith(("/", os.sep)) or os.path.isdir(path):
        return f"{label}: is a folder; give a file name"
    if os.path.lexists(path) and not os.path.isfile(path):
        return f"{label}: exists and is not a regular file"
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        return f"{option + ': ' if option else ''}folder {folder} does not exist (for {path})"
    return _probe(label, folder)


def output_folder_problem(option: str, path: str) -> str | None:
    """Why ``path`` cannot be written as an output folder (created if missing; its parent must
    exist). None when it can."""
    label = _label(option, path)
    if not path:
        return f"{option}: an empty path"
    bare = path.rstrip("/" + os.sep) or path  # 'file/' names the file: lexists('file/') is False
    if os.path.lexists(bare) and not os.path.isdir(bare):
        return f"{label}: exists and is not a folder"
    if os.path.isdir(path):
        return _probe(label, path)
    parent = os.path.dirname(os.path.abspath(path.rstrip("/" + os.sep) or path))
    if not os.path.isdir(parent):
        return f"{label}: the folder above it ({parent}) does not exist"
    return _probe(label, parent)


@contextlib.contextmanager
def writing(option: str, path: str) -> Iterator[None]:
    """Turn an OSError raised while writing ``path`` (a full disk, a folder gone read-only) into
    one line naming the path and the reason."""
    try:
        yield
    except OSError as exc:
        raise OutputError(f"{_label(option, path)}: cannot write: {exc.strerror or ' '.join(str(exc).split())}") from None
