"""Figures: matplotlib on the non-interactive Agg backend, written atomically as PNG.

matplotlib is imported inside ``pyplot()`` only (``pip install -e '.[plot]'``).
"""

from __future__ import annotations

import os
from typing import Any

from minilora.formats.fileio import atomic_open

__all__ = ["pyplot", "save_png"]


def pyplot() -> Any:
    """matplotlib.pyplot on the non-interactive Agg backend (ImportError when not installed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig: Any, path: str | os.PathLike, **savefig: Any) -> None:
    """Write a matplotlib figure to ``path`` as PNG, atomically, and close it."""
    try:
        with atomic_open(path, "wb") as fh:
            fig.savefig(fh, format="png", **savefig)
    finally:
        pyplot().close(fig)
