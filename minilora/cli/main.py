"""The ``minilora`` command. A user mistake prints one line on stderr and exits non-zero."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import sys
import warnings
from collections.abc import Sequence
from typing import Any, NoReturn

from minilora.cli.common import EXIT_USAGE, Stopped
from minilora.errors import MiniLoraError

__all__ = ["build_parser", "main"]


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (no usage dump) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


# Each command lives in its own module with a ``register(subparsers)`` function; a module is
# imported only to build the parser, and imports its heavy dependencies inside its functions.
COMMAND_MODULES = ("demo", "sweep", "params", "check", "vectors", "merge", "inspect")


def build_parser() -> argparse.ArgumentParser:
    from minilora import __version__

    parser = _OneLineParser(prog="minilora", description="A reference implementation of LoRA in NumPy.")
    parser.add_argument("--version", action="version", version=f"minilora {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_OneLineParser)
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(f"minilora.cli.{name}").register(sub)
    return parser


def _one_line_warning(message: Any, category: type[Warning], filename: str, lineno: int,
                      line: str | None = None) -> str:
    """A warning as one line, without the source line Python prints under it by default."""
    return f"minilora: warning: {category.__name__}: {' '.join(str(message).split())}\n"


def _raw_file_names(stream: Any) -> str | None:
    """Let ``stream`` print file names that are not UTF-8 (on POSIX they arrive as surrogate
    escapes, '\\udcff'): a strict stdout (a UTF-8 locale other than C.UTF-8) raised
    UnicodeEncodeError after the work was done. Returns the old ``errors`` to put back."""
    old = getattr(stream, "errors", None)
    if old != "strict" or not hasattr(stream, "reconfigure"):
        return None
    try:
        stream.reconfigure(errors="surrogateescape")  # the name's own bytes, as ls prints them
    except (ValueError, OSError):
        return None
    return old


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    saved, warnings.formatwarning = warnings.formatwarning, _one_line_warning
    stdout, errors = sys.stdout, _raw_file_names(sys.stdout)
    try:
        return int(args.func(args) or 0)
    except MiniLoraError as exc:
        print(f"minilora: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("minilora: interrupted", file=sys.stderr)
        return 130
    except Stopped as exc:
        print(f"minilora: stopped by {signal.Signals(exc.signum).name}", file=sys.stderr)
        return 128 + exc.signum
    except BrokenPipeError:  # the reader went away (``minilora params | head``): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 141
    except OSError as exc:  # a file the command could not read or write: one line, never a traceback
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"minilora: error: {where}{exc.strerror or ' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    finally:
        warnings.formatwarning = saved
        if errors is not None:
            with contextlib.suppress(ValueError, OSError):
                stdout.reconfigure(errors=errors)  # type: ignore[union-attr]
