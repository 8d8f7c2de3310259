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
