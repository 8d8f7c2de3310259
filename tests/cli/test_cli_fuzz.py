"""Fuzzing the command line with user mistakes: every subcommand of ``minilora --help`` with
option values of the wrong type, missing files, folders where files are expected, files where
folders are, trailing slashes, empty strings, unknown options and extra arguments. Whatever the
arguments, no exception escapes ``cli.main.main`` (a traceback for the user): it returns 0 or 1,
or argparse exits 2, and a failure is one line on stderr (after one-line warnings at most).
``vectors verify`` also gets mutated vector folders. Bounded: a few dozen examples per test,
each with a deadline; the work of a valid command is kept tiny (few steps, no hypothesis cases)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minilora.cli.main import build_parser, main
from minilora.formats import safetensors as sft
from minilora.peft.files import save_peft_adapter
from minilora.testing.vectors import export

pytestmark = pytest.mark.slow  # about 15 s in all: some runs do real (tiny) work

ADAPTER_SOURCE = (Path(__file__).parents[1] / "testing" / "numpy_adapter.py").read_text()


def _template(root: Path) -> None:
    """The files the mistakes point at: a base checkpoint, an adapter, a vector folder, a folder,
    a corrupt JSON file, an empty safetensors file and a module holding an adapter class."""
    rng = np.random.default_rng(0)
    sft.save({"fc.weight": rng.standard_normal((3, 4)).astype(np.float32), "fc.bias": np.zeros(3, np.float32)},
             root / "base.safetensors")
    save_peft_adapter(root / "ad", {"fc": {"A": rng.standard_normal((2, 4)), "B": rng.standard_normal((3, 2))}},
                      r=2, lora_alpha=4)
    export(root / "vec")
    (root / "afolder").mkdir()
    (root / "bad.json").write_text("{not json")
    (root / "empty.safetensors").write_bytes(b"")
    (root / "h4_fuzz_adapter.py").write_text(ADAPTER_SOURCE)


@pytest.fixture(scope="module")
def template() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as root:
        _template(Path(root))
        yield Path(root)


@contextlib.contextmanager
def _copy_of(template: Path) -> Iterator[Path]:
    """A fresh copy per example: a run that writes (merge OUT, vectors export) changes nothing
    the next example sees."""
    with tempfile.TemporaryDirectory() as root:
        work = Path(root) / "w"
        shutil.copytree(template, work)
        old = os.getcwd()
        os.chdir(work)
        try:
            yield work
        finally:
            os.chdir(old)


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), np.errstate(all="ignore"):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse: a usage error (2) or --help/--version (0)
            code = exc.code if isinstance(exc.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def _assert_clean(argv: list[str], code: int, err: str) -> None:
    assert code in (0, 1, 2), (argv, code, err)
    assert "Traceback" not in err, (argv, err)
    if code and err.strip():  # (check and inspect --base exit 1 with their report on stdout alone)
        lines = err.strip("\n").split("\n")
        assert lines[-1].startswith("minilora"), (argv, err)
        assert all(line.startswith("minilora: warning: ") for line in lines[:-1]), (argv, err)


PATHS = ["base.safetensors", "base.safetensors/", "ad", "ad/", "ad/adapter_model.safetensors",
         "ad/adapter_config.json", "vec", "vec/", "vec/manifest.json", "afolder", "afolder/", "missing",
         "missing/", "missing/x.safetensors", "bad.json", "empty.safetensors", "new.safetensors", "newdir/",
         "h4_fuzz_adapter.py", "/dev/null", "/proc/x", ".", "..", "", "-", "é\u00ff"]
JUNK = ["x", "-1", "0", "1.5", "1e400", "nan", "inf", "-inf", "", "3", "--bogus", "=", "q=x", "tcp://"]
VALID = ["1", "2", "float32", "float64", "seed", "synthetic", "numpy", "peft", "forward", "q", "gpt2-medium", "nf4"]
VALUES = st.sampled_from(PATHS + JUNK + VALID)  # valid values too, so that runs reach the work

# (option, values) per subcommand; the work-bounding options are appended to every run
OPTIONS: dict[str, list[tuple[str, Any]]] = {
    "demo": [("--rank", VALUES), ("--seed", VALUES), ("--dtype", VALUES), ("--lr", VALUES),
             ("--orientation", VALUES), ("--backend", VALUES), ("--plot", VALUES), ("--json", None)],
    "sweep": [("--ranks", VALUES), ("--seeds", VALUES), ("--tasks", VALUES), ("--lr", VALUES),
              ("--intrinsic-rank", VALUES), ("--compare", st.tuples(VALUES, VALUES)), ("--scheduler", VALUES),
              ("--connect-timeout", VALUES), ("--json", VALUES), ("--plot", VALUES)],
    "params": [("--model", VALUES), ("--d-model", VALUES), ("--layers", VALUES), ("--d-ff", VALUES),
               ("--vocab", VALUES), ("--positions", VALUES), ("--targets", VALUES), ("--rank", VALUES),
               ("--dtype", VALUES), ("--optimizer-dtype", VALUES), ("--frozen", VALUES), ("--json", None)],
    "check": [("--seed", VALUES), ("--json", VALUES), ("--dtype", VALUES), ("--property", VALUES), ("--verbose", None)],
    "merge": [("--scale", VALUES), ("--dtype", VALUES), ("--unmerge", None), ("--json", None)],
    "inspect": [("--base", VALUES), ("--json", None)],
    "vectors": [],
}
def _or_right(right: str) -> Any:
    """The right argument half of the time (so that the other mistakes of a run get seen)."""
    return st.just(right) | VALUES


POSITIONALS = {
    "demo": [], "sweep": [], "params": [], "inspect": [_or_right("ad")],
    "check": [st.just("h4_fuzz_adapter:NumpyAdapter") | st.sampled_from(
        ["h4_fuzz_adapter:Nope", "h4_fuzz_adapter:", ":NumpyAdapter", "os:path", "afolder", "bad.json", "x", ""])],
    "merge": [_or_right("base.safetensors"), _or_right("ad"), _or_right("out.safetensors")],
    "vectors": [st.sampled_from(["export", "verify", "x", ""]), _or_right("vec")],
}
BOUNDS = {"demo": ["--steps", "3"], "sweep": ["--steps", "2", "--workers", "1", "--tasks", "seed"],
          "check": ["--max-examples", "0", "--property", "forward", "--dtype", "float64"]}


@st.composite
def argv_mistakes(draw: Any) -> list[str]:
    command = draw(st.sampled_from(sorted(OPTIONS)))
    argv = [command]
    positionals = [draw(s) for s in POSITIONALS[command]]
    if positionals and draw(st.integers(0, 4)) == 0:  # one missing, or one too many
        positionals = positionals[:-1] if draw(st.booleans()) else [*positionals, draw(VALUES)]
    argv += positionals
    for option, values in draw(st.lists(st.sampled_from(OPTIONS[command]), max_size=3, unique=True)
                               if OPTIONS[command] else st.just([])):
        argv.append(option)
        if values is not None:
            value = draw(values)
            argv += list(value) if isinstance(value, tuple) else [value]
    if draw(st.integers(0, 5)) == 0:
        argv.insert(draw(st.integers(1, len(argv))), draw(st.sampled_from(["--bogus", "-x", "--json=1", "--"])))
    return argv + BOUNDS.get(command, [])


@settings(max_examples=250, deadline=15000, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(argv=argv_mistakes())
def test_argument_mistakes_never_escape_as_a_traceback(template: Path, argv: list[str]) -> None:
    with _copy_of(template) as work:
        inputs = _inputs(argv, work)
        code, _, err = _run(argv)
        _assert_clean(argv, code, err)
        for path in inputs:  # an output may replace any file the user names, but never an input
            assert path.read_bytes() == (template / path.relative_to(work)).read_bytes(), (argv, path)


def _inputs(argv: list[str], work: Path) -> list[Path]:
    """The fixture files the run reads: merge's BASE and adapter, inspect's adapter and --base,
    the module of a check target."""
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        try:
            args = build_parser().parse_args(argv)
        except SystemExit:
            return []  # a usage error: nothing runs
    names = {"merge": lambda: [args.base, args.adapter], "inspect": lambda: [args.adapter, args.base],
             "check": lambda: [args.target.split(":")[0] + ".py"]}.get(argv[0], list)()
    out = []
    for name in names:
        if not name or "\x00" in name:
            continue
        path = (work / name).resolve()
        if work.resolve() in path.parents and path.exists():
            out += sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return [work / p.relative_to(work.resolve()) for p in out]


@pytest.mark.parametrize("command", sorted(OPTIONS))
def test_every_subcommand_has_its_help_and_refuses_an_unknown_option(command: str) -> None:
    assert _run([command, "--help"])[0] == 0
    code, _, err = _run([command, "--no-such-option"])  # or, first, a missing positional argument
    assert code == 2 and err.count("\n") == 1 and err.startswith("minilora"), err


def _mutate(data: bytes, edits: list[tuple[int, int]], resize: int) -> bytes:
    out = bytearray(data)
    for position, value in edits:
        out[position % len(out)] = value
    return bytes(out[:max(len(out) + resize, 0)] if resize < 0 else out + bytes(resize))


EDITS = st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=6)


@settings(max_examples=80, deadline=5000, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(which=st.sampled_from(["manifest.json", "forward.safetensors", "adam.safetensors", "invalid.safetensors"]),
       edits=EDITS, resize=st.integers(-32, 32), rehash=st.booleans())
def test_vectors_verify_on_mutated_files_is_one_line(template: Path, which: str, edits: list[tuple[int, int]],
                                                      resize: int, rehash: bool) -> None:
    """``minilora vectors verify`` on a vector folder with one file's bytes changed (and, for a
    tensor file, its SHA-256 in the manifest updated, so the parser sees the bytes)."""
    with _copy_of(template) as work:
        folder = work / "vec"
        path = folder / which
        path.write_bytes(_mutate(path.read_bytes(), edits, resize))
        if rehash and which != "manifest.json":
            manifest = json.loads((folder / "manifest.json").read_text())
            manifest["files"][which] = {"sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                                        "bytes": path.stat().st_size}
            (folder / "manifest.json").write_text(json.dumps(manifest))
        code, out, err = _run(["vectors", "verify", str(folder)])
        _assert_clean(["vectors", "verify", which], code, err)
        assert code in (0, 1)
        if code == 0:  # a change verify accepts must leave every case agreeing
            assert "agree with minilora" in out
