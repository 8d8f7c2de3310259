"""Atomic file writes (a crash leaves the old file or the new one, never half of one) and JSON
reads with one clear error."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import tempfile
import threading
from collections.abc import Iterator
from typing import IO, Any

__all__ = ["atomic_open", "atomic_files", "AtomicFiles", "read_json", "unwritable_reason"]


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", **kwargs: Any) -> Iterator[IO[Any]]:
    """Open a temp file in ``path``'s folder for writing; rename it over ``path`` on success.

    On any exception the temp file is removed and ``path`` is left as it was. The new file gets
    the old file's permissions, or those a plain ``open`` would give (0o666 less the umask):
    ``mkstemp``'s private 0o600 would otherwise leak through the rename.
    """
    with atomic_files() as files:
        yield files.open(path, mode, **kwargs)


class AtomicFiles:
    """The files of one ``atomic_files`` block: ``open(path, mode)`` gives a temp file beside
    ``path``, renamed over it when the block ends without an exception."""

    def __init__(self) -> None:
        self.entries: list[tuple[IO[Any] | None, str, str]] = []  # (file, temp path, path)

    def open(self, path: str | os.PathLike, mode: str = "wb", **kwargs: Any) -> IO[Any]:
        path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(path))
        with _signals_held():  # a handler raising between mkstemp's create and the append would leak it
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
            self.entries.append((None, tmp, path))
        fh = os.fdopen(fd, mode, **kwargs)
        self.entries[-1] = (fh, tmp, path)
        return fh


@contextlib.contextmanager
def atomic_files() -> Iterator[AtomicFiles]:
    """Write several files as one: all or none. Every file is flushed to disk first, then all are
    renamed (signals held back meanwhile); on any exception every temp file is removed and every
    ``path`` is left as it was. An OSError while finishing a file names that file's path."""
    files = AtomicFiles()
    try:
        yield files
        for fh, tmp, path in files.entries:
            try:
                assert fh is not None
                fh.flush()
                os.fsync(fh.fileno())
                fh.close()
                os.chmod(tmp, _mode_for(path))
            except OSError as exc:
                raise OSError(exc.errno, exc.strerror, path) from None
        with _signals_held():
            for _, tmp, path in files.entries:
                os.replace(tmp, path)
    except BaseException:
        for fh, tmp, _ in files.entries:
            with contextlib.suppress(OSError):
                if fh is not None:
                    fh.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        raise


# The signals a command turns into an exception (Ctrl-C; SIGTERM/SIGHUP/SIGQUIT in ``minilora
# merge``): held back while a temp file is created, so one cannot land between its creation and
# the ``try`` that removes it. Not with a signal mask: a process-directed signal goes to any thread
# that does not block it (NumPy's BLAS threads), and Python runs the handler in the main thread all
# the same. Instead the handlers are swapped for one that notes the signal, and the old handlers
# get the noted signals once the temp file's name is held.
_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT") if hasattr(signal, n))


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():  # handlers run in the main thread only
        yield
        return
    noted: list[tuple[int, Any]] = []
    old: dict[int, Any] = {}
    for sig in _SIGNALS:
        handler = signal.getsignal(sig)
        if handler is None:  # a handler not set from Python: it cannot be put back, so leave it
            continue
        old[sig] = handler
        signal.signal(sig, lambda signum, frame: noted.append((signum, frame)))
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        for signum, frame in noted:  # as if they came now: a raising handler raises here
            handler = old[signum]
            if callable(handler):
                handler(signum, frame)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(signum)


def unwritable_reason(folder: str) -> str | None:
    """Why no file can be created in ``folder`` (None when one can): a file is created and removed
    there, since ``os.access`` says yes to root on a read-only mount or in /proc."""
    try:
        with _signals_held():  # a signal meanwhile would leave the probe file behind
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=".minilora-probe-", suffix=".tmp")
            os.close(fd)
            os.unlink(tmp)
    except OSError as exc:
        return exc.strerror or " ".join(str(exc).split())
    return None


def _mode_for(path: str) -> int:
    try:
        return os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"the key {key!r} appears twice (which one is meant?)")
        out[key] = value
    return out


def read_json(path: str, error: type[Exception], *, missing: str, invalid: str, unique_keys: bool = False) -> Any:
    """The JSON value in ``path``; ``error(f"{path}: {missing}")`` when the file is absent and
    ``error(f"{path}: {invalid} (the parser's reason)")`` when it cannot be read as UTF-8 JSON.
    ``unique_keys``: an object with a key twice is invalid too (``json`` would keep the last)."""
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh, object_pairs_hook=_unique_keys if unique_keys else None)
    except FileNotFoundError:
        raise error(f"{path}: {missing}") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise error(f"{path}: {invalid} ({' '.join(str(exc).split())})") from None
    except RecursionError:  # json's parser recurses once per nesting level
        raise error(f"{path}: {invalid} (nested too deeply)") from None
