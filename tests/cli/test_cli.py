"""The command line, run as a user runs it: ``python -m minilora`` in a subprocess.

A user mistake must print exactly one line on stderr and exit non-zero, never a traceback.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import FakeTerminal, assert_one_line_error, require, run_cli

import minilora

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Runs ``python -m minilora`` after making ``import matplotlib`` fail as if it were not installed.
BLOCK_MATPLOTLIB = (
    "import runpy, sys\n"
    "sys.modules['matplotlib'] = None  # import matplotlib -> ModuleNotFoundError\n"
    "sys.argv = ['minilora', *sys.argv[1:]]\n"
    "runpy.run_module('minilora', run_name='__main__', alter_sys=True)\n"
)


@functools.cache
def demo_json(*args: str) -> dict:
    """``minilora demo --json *args`` (cached: several tests compare against the same runs)."""
    out = run_cli("demo", "--json", *args)
    assert out.returncode == 0, out.stderr
    assert out.stderr == "", "a successful run off a terminal writes nothing to stderr"
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1, f"--json must print one line, got {out.stdout!r}"
    report = json.loads(lines[0])
    assert isinstance(report, dict)
    return report


# ---------------------------------------------------------------- the full demo

@pytest.mark.slow
def test_default_demo_table() -> None:
    """The whole seed experiment (1000 steps): the blog's parameter counts and a close merge."""
    out = run_cli("demo")
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
    text = out.stdout
    assert int(re.search(r"original parameters\s+(\d+)", text).group(1)) == 100 * 100
    assert int(re.search(r"LoRA parameters\s+(\d+)", text).group(1)) == 4 * 100 + 100 * 4
    rel = float(re.search(r"relative Frobenius error\s+([0-9.eE+-]+)", text).group(1))
    assert 0 <= rel < 0.01
    first = float(re.search(r"first loss\s+([0-9.eE+-]+)", text).group(1))
    last = [float(v) for v in re.search(r"last losses\s+(.+)", text).group(1).split()]
    assert len(last) == 3 and max(last) < first / 100


def test_default_demo_json() -> None:
    report = demo_json()
    assert report["original_params"] == 10000
    assert report["lora_params"] == 800
    assert report["steps"] == 1000 and report["rank"] == 4 and report["dtype"] == "float64"
    for key in ("losses_first", "losses_last", "rel_error", "max_abs_error", "seconds"):
        assert isinstance(report[key], float), key
    assert report["rel_error"] < 0.01
    assert report["losses_last"] < report["losses_first"] / 100
    assert 0 < report["max_abs_error"] and report["seconds"] > 0
    assert report["losses_tail"][-1] == report["losses_last"]


# ---------------------------------------------------------------- options are honoured

@pytest.mark.parametrize("rank", [1, 2, 8])
def test_rank_option(rank: int) -> None:
    report = demo_json("--steps", "5", "--rank", str(rank))
    assert report["rank"] == rank
    assert report["lora_params"] == 2 * 100 * rank
    assert report["original_params"] == 10000


def test_steps_option() -> None:
    short, full = demo_json("--steps", "5"), demo_json()
    assert short["steps"] == 5 and len(short["losses_tail"]) == 3
    assert short["losses_first"] == full["losses_first"]  # same problem, same first loss
    assert short["losses_last"] > full["losses_last"]  # but far less trained
    assert short["rel_error"] > 0.5
    one = demo_json("--steps", "1")
    assert one["losses_last"] == one["losses_first"] and one["losses_tail"] == [one["losses_first"]]


def test_seed_option() -> None:
    base = demo_json("--steps", "5")
    same = demo_json("--steps", "5", "--seed", "0")
    other = demo_json("--steps", "5", "--seed", "3")
    assert base["seed"] == 0 and other["seed"] == 3
    for key in ("losses_first", "losses_last", "rel_error", "merged_W_corner"):
        assert same[key] == base[key], key
    assert other["losses_first"] != base["losses_first"]


def test_dtype_option() -> None:
    f64, f32 = demo_json("--steps", "5"), demo_json("--steps", "5", "--dtype", "float32")
    assert f32["dtype"] == "float32"
    assert f32["losses_first"] != f64["losses_first"]  # really computed in float32 ...
    # ... to float32 accuracy: the loss is a mean of 3,200 terms of size ~2,500 (eps32 ~ 1.2e-7)
    assert f32["losses_first"] == pytest.approx(f64["losses_first"], rel=1e-5)


def test_lr_and_orientation_options() -> None:
    frozen = demo_json("--steps", "5", "--lr", "0")
    assert frozen["lr"] == 0.0 and frozen["losses_last"] == frozen["losses_first"]
    peft = demo_json("--steps", "5", "--orientation", "peft")
    assert peft["orientation"] == "peft"
    assert peft["losses_first"] == demo_json("--steps", "5")["losses_first"]  # both start at B A = 0
    assert peft["losses_last"] != demo_json("--steps", "5")["losses_last"]


def test_array_api_strict_backend_matches_numpy() -> None:
    require("array_api_strict")
    host, strict = demo_json("--steps", "20"), demo_json("--steps", "20", "--backend", "array_api_strict")
    assert strict["backend"] == "array_api_strict" and host["backend"] == "numpy"
    for key in ("losses_first", "losses_last", "rel_error", "max_abs_error"):
        assert strict[key] == pytest.approx(host[key], rel=1e-12, abs=1e-12), key
    assert strict["losses_tail"] == pytest.approx(host["losses_tail"], rel=1e-12, abs=1e-12)


def test_cupy_backend_missing_or_working() -> None:
    import importlib.util

    out = run_cli("demo", "--steps", "2", "--json", "--backend", "cupy")
    if importlib.util.find_spec("cupy") is None:
        assert_one_line_error(out, "cupy", "pip install")
    else:
        assert out.returncode == 0 and json.loads(out.stdout)["backend"] == "cupy"


# ---------------------------------------------------------------- --plot

@pytest.mark.slow
def test_plot_writes_png(tmp_path: Path) -> None:
    require("matplotlib")
    target = tmp_path / "loss.png"
    out = run_cli("demo", "--steps", "20", "--plot", str(target))
    assert out.returncode == 0, out.stderr
    data = target.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR" and data[-8:-4] == b"IEND"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 100 and height > 100
    assert str(target) in out.stdout
    assert [p.name for p in tmp_path.iterdir()] == ["loss.png"], "no temp file may be left behind"


def test_plot_without_matplotlib(tmp_path: Path) -> None:
    target = tmp_path / "loss.png"
    out = run_cli("demo", "--steps", "5", "--plot", str(target), wrapper=BLOCK_MATPLOTLIB)
    assert_one_line_error(out, "matplotlib", "pip install")
    assert not target.exists()


def test_plot_with_broken_matplotlib(tmp_path: Path) -> None:
    """matplotlib present but failing to import (a broken install): still one line, no traceback."""
    fake = tmp_path / "fake_site" / "matplotlib"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('simulated broken matplotlib install')\n")
    target = tmp_path / "loss.png"
    out = run_cli("demo", "--steps", "5", "--plot", str(target), pythonpath_first=fake.parent)
    assert_one_line_error(out, "matplotlib")
    assert not target.exists()


@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_plot_into_missing_folder(tmp_path: Path, json_flag: list[str]) -> None:
    target = tmp_path / "missing" / "loss.png"
    out = run_cli("demo", "--steps", "5", *json_flag, "--plot", str(target))
    line = assert_one_line_error(out)
    assert "does not exist" in line or "matplotlib" in line  # without matplotlib that is reported first
    assert out.stdout == ""
    assert not target.parent.exists()


# ---------------------------------------------------------------- bad arguments

@pytest.mark.parametrize(("args", "fragment"), [
    (["demo", "--steps", "0"], "--steps"),
    (["demo", "--steps", "ten"], "--steps"),
    (["demo", "--rank", "-1"], "--rank"),
    (["demo", "--rank", "0"], "--rank"),
    (["demo", "--dtype", "int8"], "int8"),
    (["demo", "--seed", "-2"], "--seed"),
    (["demo", "--backend", "jax"], "jax"),
    (["demo", "--orientation", "sideways"], "sideways"),
    (["demo", "--frobnicate"], "--frobnicate"),
    (["frobnicate"], "frobnicate"),
    ([], "required"),
    (["demo", "--steps", "2", "--lr", "-1"], "lr must be >= 0.0"),
    (["demo", "--steps", "2", "--lr", "nan"], "lr must be finite"),
])
def test_bad_arguments_one_line(args: list[str], fragment: str) -> None:
    out = run_cli(*args)
    line = assert_one_line_error(out, fragment)
    assert line.startswith("minilora")
    assert out.stdout == ""


def test_version() -> None:
    out = run_cli("--version")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"minilora {minilora.__version__}"


@pytest.mark.parametrize("args", [["--help"], ["demo", "--help"]])
def test_help(args: list[str]) -> None:
    out = run_cli(*args)
    assert out.returncode == 0 and out.stderr == ""
    assert "demo" in out.stdout and "usage" in out.stdout.lower()
    if args[0] == "demo":
        for option in ("--steps", "--rank", "--seed", "--dtype", "--backend", "--json", "--plot"):
            assert option in out.stdout


@pytest.mark.parametrize("tty", [True, False])
def test_progress_shows_on_a_terminal_only(tty: bool) -> None:
    from minilora.cli.common import Progress as _Progress

    stream = FakeTerminal(tty)
    progress = _Progress(1000, stream)
    for step in range(1, 1001):
        progress(step, 1.0 / step, None, None)
    progress.close()
    if tty:
        assert "step    500/1000" in stream.text and "step   1000/1000" in stream.text
        assert stream.text.count("\r") >= 100  # redrawn in place, about every 1% of the run
        assert stream.text.endswith("\r")  # the line is cleared at the end
    else:
        assert stream.text == ""


def test_a_closed_pipe_is_not_a_traceback() -> None:
    """``minilora demo | head -1``: the reader closes early; no traceback, exit 141 like a shell."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen([sys.executable, "-m", "minilora", "demo", "--steps", "5"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    proc.stdout.close()  # nobody reads the table
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.wait(timeout=60) == 141, err
    assert "Traceback" not in err
