"""The library's error family: catch ``MiniLoraError`` to catch them all.

Bad values and shapes raise ``MiniLoraValueError`` (a ``ValueError``), bad dtypes raise
``MiniLoraTypeError`` (a ``TypeError``). Messages name the argument and show what was expected
next to what was given.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "one_line",
    "MiniLoraError",
    "MiniLoraValueError",
    "MiniLoraTypeError",
    "ShapeError",
    "NonFiniteError",
    "BackendUnavailableError",
]


class MiniLoraError(Exception):
    """Base class of every error minilora raises on purpose."""


class MiniLoraValueError(MiniLoraError, ValueError):
    """A bad value: unknown option name, out-of-range number, wrong structure."""


class MiniLoraTypeError(MiniLoraError, TypeError):
    """A bad type or dtype: integer/object arrays, mixed float widths, non-arrays."""


class ShapeError(MiniLoraValueError):
    """An array whose shape does not fit the others."""


class NonFiniteError(MiniLoraValueError):
    """A result that became NaN or infinite (a merge, a training loss).

    ``partial`` holds whatever was valid before the failure (for ``fit``: the params, optimizer
    state and loss history of the last finite step), so nothing is lost.
    """

    def __init__(self, message: str, partial: Any = None) -> None:
        super().__init__(message)
        self.partial = partial


class BackendUnavailableError(MiniLoraError, ImportError):
    """An array backend that was asked for but is not installed."""


def one_line(exc: BaseException, *, with_type: bool = True) -> str:
    """``exc`` as one line for an error message: its text with whitespace collapsed, after its
    type name (``"ValueError: bad shape"``; ``with_type=False``: the text alone)."""
    text = " ".join(str(exc).split())
    if not with_type:
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
