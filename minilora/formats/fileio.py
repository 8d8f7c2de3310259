"""Atomic file writes (a crash leaves the old file or the new one, never half of one) and JSON
reads with one clear error."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from typing import IO, Any

__all__ = ["atomic_open", "read_json"]


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", **kwargs: Any) -> Iterator[IO[Any]]:
    """Open a temp file in ``path``'s folder for writing; rename it over ``path`` on success.

    On any exception the temp file is removed and ``path`` is left as it was. The new file gets
    the old file's permissions, or those a plain ``open`` would give (0o666 less the umask):
    ``mkstemp``'s private 0o600 would otherwise leak through the rename.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **kwargs) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, _mode_for(path))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _mode_for(path: str) -> int:
    try:
        return os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def read_json(path: str, error: type[Exception], *, missing: str, invalid: str) -> Any:
    """The JSON value in ``path``; ``error(f"{path}: {missing}")`` when the file is absent and
    ``error(f"{path}: {invalid} (the parser's reason)")`` when it cannot be read as UTF-8 JSON."""
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise error(f"{path}: {missing}") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise error(f"{path}: {invalid} ({' '.join(str(exc).split())})") from None
    except RecursionError:  # json's parser recurses once per nesting level
        raise error(f"{path}: {invalid} (nested too deeply)") from None
