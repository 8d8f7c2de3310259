"""Every output path of demo, sweep, check and vectors is checked before the work starts, and an
OSError while writing is one line naming the path and the reason (exit 1, no traceback).

Read-only locations are real (chmod) when the tests run as a normal user; as root, where chmod
does not stop a write, the same refusal is simulated at the file creation (EROFS), and a full disk
(ENOSPC) is simulated at the write itself. The commands run in-process through ``cli.main.main``
(the one-line reporting lives there); one subprocess test checks the real exit path."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import Any

import pytest
from helpers import assert_one_line_error, require, run_cli

from minilora.cli.main import main

ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def _run(capsys: Any, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def _one_line(code: int, err: str, *fragments: str) -> str:
    assert code != 0
    assert "Traceback" not in err
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


DEMO = ("demo", "--steps", "3")
SWEEP = ("sweep", "--steps", "2", "--ranks", "1", "--tasks", "seed", "--workers", "1")
CHECK = ("check", "torch", "--max-examples", "0")  # refused before the target is even loaded

FILE_OPTIONS = [
    pytest.param(DEMO, "--plot", id="demo-plot"),
    pytest.param(SWEEP, "--plot", id="sweep-plot"),
    pytest.param(SWEEP, "--json", id="sweep-json"),
    pytest.param(CHECK, "--json", id="check-json"),
]


# ---------------------------------------------------------------- refused before the work


def _needs(command: tuple, option: str) -> None:
    if option == "--plot":
        require("matplotlib")  # without it, --plot is refused for that first
    if command[0] == "check":
        require("hypothesis")


@pytest.mark.parametrize(("command", "option"), FILE_OPTIONS)
@pytest.mark.parametrize("shape", ["folder", "trailing-slash", "missing-folder", "not-a-file"])
def test_a_bad_output_file_is_refused_before_the_work(tmp_path: Path, capsys: Any, monkeypatch: Any,
                                                      command: tuple, option: str, shape: str) -> None:
    _needs(command, option)
    started = []
    monkeypatch.setattr("minilora.study.seed.seed_experiment", lambda **kw: started.append(1))
    monkeypatch.setattr("minilora.study.sweep.sweep", lambda *a, **kw: started.append(1))
    (tmp_path / "dir").mkdir()
    os.mkfifo(tmp_path / "fifo")
    path, fragment = {
        "folder": (str(tmp_path / "dir"), "is a folder"),
        "trailing-slash": (str(tmp_path / "new") + "/", "is a folder"),
        "missing-folder": (str(tmp_path / "missing" / "out.png"), "does not exist"),
        "not-a-file": (str(tmp_path / "fifo"), "not a regular file"),
    }[shape]
    code, out, err = _run(capsys, *command, option, path)
    _one_line(code, err, option, path, fragment)
    assert started == [] and out == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "fifo"]


def _make_read_only(folder: Path, monkeypatch: Any) -> None:
    """Make ``folder`` refuse new files: chmod for a normal user, EROFS at creation for root."""
    folder.chmod(0o555)
    if ROOT:
        real = tempfile.mkstemp

        def mkstemp(*args: Any, dir: Any = None, **kwargs: Any) -> Any:  # noqa: A002
            if dir is not None and Path(dir).resolve() == folder.resolve():
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(folder))
            return real(*args, dir=dir, **kwargs)

        monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


@pytest.mark.parametrize(("command", "option"), FILE_OPTIONS)
def test_a_read_only_folder_is_refused_before_the_work(tmp_path: Path, capsys: Any, monkeypatch: Any,
                                                       command: tuple, option: str) -> None:
    _needs(command, option)
    started = []
    monkeypatch.setattr("minilora.study.seed.seed_experiment", lambda **kw: started.append(1))
    monkeypatch.setattr("minilora.study.sweep.sweep", lambda *a, **kw: started.append(1))
    ro = tmp_path / "ro"
    ro.mkdir()
    _make_read_only(ro, monkeypatch)
    try:
        code, out, err = _run(capsys, *command, option, str(ro / "out.file"))
    finally:
        ro.chmod(0o755)
    line = _one_line(code, err, option, str(ro), "cannot write")
    assert ("Read-only" in line) if ROOT else ("Permission denied" in line)
    assert started == [] and list(ro.iterdir()) == []


def test_sweep_refuses_plot_and_json_on_one_file(tmp_path: Path, capsys: Any) -> None:
    require("matplotlib")  # without it, --plot is refused first (for that reason)
    target = str(tmp_path / "out")
    code, _, err = _run(capsys, *SWEEP, "--plot", target, "--json", target)
    _one_line(code, err, "--plot", "--json", "same file")


@pytest.mark.parametrize("shape", ["file", "missing-parent", "read-only"])
def test_vectors_export_checks_its_folder_first(tmp_path: Path, capsys: Any, monkeypatch: Any, shape: str) -> None:
    exported = []
    monkeypatch.setattr("minilora.testing.vectors.export", lambda folder: exported.append(folder) or [])
    if shape == "file":
        target = tmp_path / "f"
        target.write_text("x")
        fragment = "not a folder"
    elif shape == "missing-parent":
        target, fragment = tmp_path / "no" / "vec", "does not exist"
    else:
        target = tmp_path / "ro"
        target.mkdir()
        _make_read_only(target, monkeypatch)
        fragment = "cannot write"
    try:
        code, _, err = _run(capsys, "vectors", "export", str(target))
    finally:
        if shape == "read-only":
            target.chmod(0o755)
    _one_line(code, err, str(target), fragment)
    assert exported == []


# ---------------------------------------------------------------- failing at the write itself


def _full_disk(monkeypatch: Any) -> None:
    """ENOSPC at the flush of every file written (the probe only creates and removes an empty
    file, so it passes, as it does on a real full disk)."""
    def fsync(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.parametrize(("command", "option"), [p for p in FILE_OPTIONS if p.id != "check-json"])
def test_a_full_disk_at_the_write_is_one_line(tmp_path: Path, capsys: Any, monkeypatch: Any,
                                              command: tuple, option: str) -> None:
    if option == "--plot":
        require("matplotlib")
    _full_disk(monkeypatch)
    target = tmp_path / "out.file"
    code, _, err = _run(capsys, *command, option, str(target))
    _one_line(code, err, option, str(target), "cannot write", "No space left")
    assert list(tmp_path.iterdir()) == []  # no output and no temp file left behind


def test_vectors_export_on_a_full_disk_is_one_line(tmp_path: Path, capsys: Any, monkeypatch: Any) -> None:
    target = tmp_path / "vec"
    target.mkdir()
    _full_disk(monkeypatch)
    code, _, err = _run(capsys, "vectors", "export", str(target))
    _one_line(code, err, str(target), "cannot write", "No space left")


def test_an_oserror_escaping_a_command_is_one_line(capsys: Any, monkeypatch: Any) -> None:
    def boom(**kwargs: Any) -> Any:
        raise PermissionError(errno.EACCES, "Permission denied", "/some/where")

    monkeypatch.setattr("minilora.study.seed.seed_experiment", boom)
    code, _, err = _run(capsys, *DEMO)
    _one_line(code, err, "/some/where", "Permission denied")


@pytest.mark.slow
def test_warnings_are_one_line_without_their_source_line() -> None:
    """A subprocess: pytest would capture the warnings of an in-process run."""
    out = run_cli("demo", "--steps", "50", "--lr", "1e300")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    lines = out.stderr.strip("\n").split("\n")
    assert lines[-1].startswith("minilora: error: ") and "non-finite" in lines[-1]
    assert lines[:-1] and all(line.startswith("minilora: warning: ") for line in lines[:-1]), lines


@pytest.mark.slow
def test_the_real_exit_path_for_a_folder_as_output(tmp_path: Path) -> None:
    out = run_cli("demo", "--steps", "3", "--plot", str(tmp_path))
    assert_one_line_error(out, "--plot", str(tmp_path), "is a folder")


# ---------------------------------------------------------------- found by the issue-14 audit


EMPTY = [
    pytest.param(("demo", "--plot", ""), "--plot", id="demo-plot"),
    pytest.param(("sweep", "--plot", ""), "--plot", id="sweep-plot"),
    pytest.param(("sweep", "--json", ""), "--json", id="sweep-json"),
    pytest.param(("sweep", "--scheduler", ""), "--scheduler", id="sweep-scheduler"),
    pytest.param(("check", "torch", "--json", ""), "--json", id="check-json"),
    pytest.param(("check", ""), "TARGET", id="check-target"),
    pytest.param(("vectors", "export", ""), "DIR", id="vectors-export"),
    pytest.param(("vectors", "verify", ""), "DIR", id="vectors-verify"),
    pytest.param(("merge", "b.safetensors", "ad", ""), "OUT", id="merge-out"),
    pytest.param(("merge", "", "ad", "o.safetensors"), "BASE", id="merge-base"),
    pytest.param(("merge", "b.safetensors", "", "o.safetensors"), "ADAPTER_DIR", id="merge-adapter"),
    pytest.param(("inspect", ""), "ADAPTER_DIR", id="inspect-adapter"),
    pytest.param(("inspect", "ad", "--base", ""), "--base", id="inspect-base"),
]


@pytest.mark.parametrize(("argv", "name"), EMPTY)
def test_an_empty_path_is_a_usage_error_not_no_option(capsys: Any, monkeypatch: Any, argv: tuple, name: str) -> None:
    """``--plot ''`` used to mean no --plot (nothing written, exit 0); merge's OUT '' an error
    without a path."""
    started = []
    monkeypatch.setattr("minilora.study.seed.seed_experiment", lambda **kw: started.append(1))
    monkeypatch.setattr("minilora.study.sweep.sweep", lambda *a, **kw: started.append(1))
    with pytest.raises(SystemExit) as info:
        main(list(argv))
    assert info.value.code == 2
    err = capsys.readouterr().err
    _one_line(2, err, f"argument {name}", "empty string")
    assert started == []


def test_check_refuses_a_json_path_that_is_the_targets_own_source(tmp_path: Path, capsys: Any,
                                                                    monkeypatch: Any) -> None:
    """``check --json mod.py mod:Adapter`` wrote the report over the adapter's code."""
    require("hypothesis")
    source = (Path(__file__).parents[1] / "testing" / "numpy_adapter.py").read_text()
    module = tmp_path / "h4_victim_adapter.py"
    module.write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    code, out, err = _run(capsys, "check", "h4_victim_adapter:NumpyAdapter", "--property", "forward",
                          "--dtype", "float64", "--max-examples", "0", "--json", str(module))
    _one_line(code, err, "--json", str(module), "source of the target")
    assert module.read_text() == source and out == ""


def test_vectors_export_to_a_file_with_a_slash_gives_the_right_reason(tmp_path: Path, capsys: Any) -> None:
    (tmp_path / "f").write_text("x")
    code, _, err = _run(capsys, "vectors", "export", str(tmp_path / "f") + "/")
    _one_line(code, err, "exists and is not a folder")  # was 'cannot write: File exists', after the probe


def _fail_at_fsync(monkeypatch: Any, nth: int) -> None:
    """ENOSPC at the ``nth`` file flushed (1-based): the files before it were written whole."""
    real, calls = os.fsync, []

    def fsync(fd: int) -> None:
        calls.append(fd)
        if len(calls) == nth:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def test_vectors_export_that_fails_late_leaves_the_old_vectors_whole(tmp_path: Path, capsys: Any,
                                                                      monkeypatch: Any) -> None:
    """A full disk at the manifest (the last file) used to leave new group files under the old
    manifest; now every file is renamed at the end, so the old set stays as it was."""
    folder = tmp_path / "vec"
    assert main(["vectors", "export", str(folder)]) == 0
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    for p in folder.glob("*.safetensors"):  # an older set: different bytes in every file
        p.write_bytes(b"old " + p.read_bytes())
    old = {p.name: p.read_bytes() for p in folder.iterdir()}
    capsys.readouterr()
    _fail_at_fsync(monkeypatch, len(before))
    code, _, err = _run(capsys, "vectors", "export", str(folder))
    _one_line(code, err, str(folder), "No space left")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == old


def test_vectors_export_that_fails_removes_the_folder_it_made(tmp_path: Path, capsys: Any, monkeypatch: Any) -> None:
    _fail_at_fsync(monkeypatch, 1)
    code, _, err = _run(capsys, "vectors", "export", str(tmp_path / "new"))
    _one_line(code, err, "No space left")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.skipif(os.name != "posix", reason="file names that are not UTF-8 exist on POSIX")
def test_a_file_name_that_is_not_utf8_prints_on_a_strict_stdout(tmp_path: Path) -> None:
    """With a strict stdout (en_US.UTF-8 and most locales but C.UTF-8), printing a name holding
    a byte that is not UTF-8 ('\\udcff' once decoded) raised UnicodeEncodeError after the export."""
    import subprocess
    import sys

    name = os.fsencode(str(tmp_path)) + b"/v\xff"
    env = {**os.environ, "PYTHONIOENCODING": "utf-8:strict",
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    out = subprocess.run([sys.executable, "-m", "minilora", "vectors", "export", name], env=env,
                         capture_output=True, timeout=120)
    assert out.returncode == 0 and b"Traceback" not in out.stderr, out.stderr
    assert b"v\xff: forward.safetensors" in out.stdout
    assert (Path(os.fsdecode(name)) / "manifest.json").is_file()


def test_check_on_a_full_disk_at_the_write_is_one_line(tmp_path: Path, capsys: Any, monkeypatch: Any) -> None:
    """The check-json case of the full-disk test above, with a NumPy adapter (no torch needed)."""
    require("hypothesis")
    module = tmp_path / "h4_full_adapter.py"
    module.write_text((Path(__file__).parents[1] / "testing" / "numpy_adapter.py").read_text())
    monkeypatch.syspath_prepend(str(tmp_path))
    target = tmp_path / "report.json"
    _full_disk(monkeypatch)
    code, out, err = _run(capsys, "check", "h4_full_adapter:NumpyAdapter", "--property", "forward", "--dtype",
                          "float64", "--max-examples", "0", "--json", str(target))
    _one_line(code, err, "--json", str(target), "cannot write", "No space left")
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix != ".pyc" and p.name != "__pycache__") == \
        ["h4_full_adapter.py"] and out == ""  # no report, no temp file; nothing printed before the write
