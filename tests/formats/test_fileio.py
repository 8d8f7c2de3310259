"""atomic_open: all or nothing, with ordinary permissions."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from minilora.formats.fileio import atomic_open


def test_writes_and_renames(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    with atomic_open(target, "wb") as fh:
        fh.write(b"new")
    assert target.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]  # no temp file left


def test_failure_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_open(target, "wb") as fh:
            fh.write(b"half of the new")
            raise RuntimeError("disk full, say")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_new_file_gets_umask_permissions_not_0600(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        target = tmp_path / "new.txt"
        with atomic_open(target, "w") as fh:
            fh.write("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(target.stat().st_mode) == 0o644


def test_existing_file_keeps_its_permissions(tmp_path: Path) -> None:
    target = tmp_path / "keep.txt"
    target.write_text("old")
    target.chmod(0o640)
    with atomic_open(target, "w") as fh:
        fh.write("new")
    assert stat.S_IMODE(target.stat().st_mode) == 0o640 and target.read_text() == "new"


@pytest.mark.parametrize("what", ["atomic_open", "probe"])
def test_a_signal_right_after_the_temp_file_is_made_leaves_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 what: str) -> None:
    """A handler that raises (merge's SIGTERM/SIGHUP/SIGQUIT, Ctrl-C) when the signal lands
    between mkstemp's create and atomic_open's ``try`` (or the output-folder probe's unlink): the
    temp file used to stay behind. The signal goes to the process, as ``kill`` sends it."""
    import signal
    import tempfile

    import minilora.formats.fileio as fileio

    real = tempfile.mkstemp

    def mkstemp(*args: object, **kwargs: object) -> tuple[int, str]:
        made = real(*args, **kwargs)  # type: ignore[call-overload]
        os.kill(os.getpid(), signal.SIGTERM)  # handled at the next bytecode, before the return
        for _ in range(100):  # a few bytecodes for the handler to run in, if it is not held back
            pass
        return made

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, stop)
    monkeypatch.setattr(fileio.tempfile, "mkstemp", mkstemp)
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    try:
        with pytest.raises(KeyboardInterrupt):
            if what == "probe":
                fileio.unwritable_reason(str(tmp_path))
            else:
                with atomic_open(target, "wb") as fh:
                    fh.write(b"new")
    finally:
        signal.signal(signal.SIGTERM, old)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_read_json_can_refuse_a_key_given_twice(tmp_path: Path) -> None:
    from minilora.errors import MiniLoraValueError
    from minilora.formats.fileio import read_json

    path = tmp_path / "c.json"
    path.write_text('{"r": 2, "lora_alpha": 4, "r": 8}')
    assert read_json(str(path), MiniLoraValueError, missing="m", invalid="bad") == {"r": 8, "lora_alpha": 4}
    with pytest.raises(MiniLoraValueError, match=r"c\.json: bad \(the key 'r' appears twice"):
        read_json(str(path), MiniLoraValueError, missing="m", invalid="bad", unique_keys=True)
