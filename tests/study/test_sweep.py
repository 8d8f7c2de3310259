"""Rank sweeps: results against the experiments run directly, the Eckart-Young floor, any
executor (threads, processes, a Dask cluster started here), the table, JSON and plot of
``minilora sweep``, progress, and bad input."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import FakeTerminal, require

from minilora.errors import MiniLoraTypeError, MiniLoraValueError
from minilora.study.seed import seed_experiment
from minilora.study.subspace import subspace_similarity_grid
from minilora.study.sweep import run_case, summarize, sweep, synthetic_experiment

REPO = Path(__file__).resolve().parents[2]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
BLOCK_MATPLOTLIB = (
    "import runpy, sys\n"
    "sys.modules['matplotlib'] = None\n"
    "sys.argv = ['minilora', *sys.argv[1:]]\n"
    "runpy.run_module('minilora', run_name='__main__', alter_sys=True)\n"
)


def run_cli(*args: str, wrapper: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    command = [sys.executable, "-c", wrapper, *args] if wrapper else [sys.executable, "-m", "minilora", *args]
    return subprocess.run(command, check=False, capture_output=True, text=True, env=env, cwd=REPO, timeout=120)


def one_line_error(out: subprocess.CompletedProcess, *fragments: str) -> str:
    assert out.returncode != 0, out.stdout
    assert "Traceback" not in out.stderr, out.stderr
    lines = out.stderr.strip("\n").split("\n")
    assert len(lines) == 1, out.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def small() -> dict:
    """Two ranks, two seeds, both tasks, on a thread pool (reused by several tests)."""
    with cf.ThreadPoolExecutor(max_workers=2) as pool:
        return sweep([1, 4], seeds=[0, 1], steps=60, executor=pool)


# ---------------------------------------------------------------- results


def test_cases_and_order(small: dict) -> None:
    keys = [(r["task"], r["rank"], r["seed"]) for r in small["results"]]
    assert keys == [(t, r, s) for t in ("seed", "synthetic") for r in (1, 4) for s in (0, 1)]
    for r in small["results"]:
        assert len(r["losses"]) == 60 and r["final_loss"] == r["losses"][-1]
        assert np.asarray(r["A"]).shape == (r["rank"], 100 if r["task"] == "seed" else 32)


@pytest.mark.parametrize("rank", [1, 4])
def test_seed_cases_are_the_seed_experiment(small: dict, rank: int) -> None:
    for seed in (0, 1):
        record = next(r for r in small["results"] if (r["task"], r["rank"], r["seed"]) == ("seed", rank, seed))
        direct = seed_experiment(steps=60, rank=rank, seed=seed)
        assert record["losses"] == direct["losses"]
        assert record["rel_error"] == direct["rel_error"]
        assert record["lora_params"] == direct["lora_params"] == rank * (100 + 100)


def test_synthetic_params_and_floor(small: dict) -> None:
    for r in (x for x in small["results"] if x["task"] == "synthetic"):
        assert r["lora_params"] == r["rank"] * (32 + 32)
        sigma = np.arange(4, 0, -1.0)  # intrinsic rank 4: singular values 4, 3, 2, 1
        assert r["best_error"] == pytest.approx(np.linalg.norm(sigma[r["rank"]:]) / np.linalg.norm(sigma), abs=1e-15)
        assert r["rel_error"] >= r["best_error"] - 1e-12  # nothing beats Eckart-Young


@pytest.mark.parametrize("k", [2, 3])
def test_synthetic_error_reaches_the_floor(k: int) -> None:
    """Below the intrinsic rank the trained error sits on the best rank-r error; at it, near 0."""
    for rank in (1, k):
        out = synthetic_experiment(steps=300, rank=rank, seed=3, intrinsic_rank=k)
        assert out["rel_error"] == pytest.approx(out["best_error"], abs=0.01)
    assert synthetic_experiment(steps=300, rank=k, seed=3, intrinsic_rank=k)["rel_error"] < 0.01


def test_same_problem_at_every_rank() -> None:
    """The data depends on the seed only: rank 2 and rank 5 start from the same loss."""
    a = synthetic_experiment(steps=1, rank=2, seed=9)
    b = synthetic_experiment(steps=1, rank=5, seed=9)
    assert a["losses"][0] == b["losses"][0]  # B = 0 at the start: the loss is the data's


def test_summary_means_over_seeds(small: dict) -> None:
    rows = summarize(small["results"])
    assert [(r["task"], r["rank"]) for r in rows] == [("seed", 1), ("seed", 4), ("synthetic", 1), ("synthetic", 4)]
    for row in rows:
        group = [r for r in small["results"] if (r["task"], r["rank"]) == (row["task"], row["rank"])]
        assert row["seeds"] == 2
        assert row["final_loss"] == pytest.approx(np.mean([g["final_loss"] for g in group]), rel=1e-15)
        assert row["rel_error"] == pytest.approx(np.mean([g["rel_error"] for g in group]), rel=1e-15)


def test_similarity_is_the_grid_of_the_returned_factors(small: dict) -> None:
    for task, sim in small["similarity"].items():
        assert sim["ranks"] == [1, 4] and sim["seed"] == 0
        a1 = next(r["A"] for r in small["results"] if (r["task"], r["rank"], r["seed"]) == (task, 1, 0))
        a2 = next(r["A"] for r in small["results"] if (r["task"], r["rank"], r["seed"]) == (task, 4, 0))
        np.testing.assert_allclose(sim["grid"], subspace_similarity_grid(np.asarray(a1), np.asarray(a2)), atol=1e-14)


# ---------------------------------------------------------------- executors


def test_default_process_pool_gives_the_same_numbers(small: dict) -> None:
    out = sweep([1, 4], seeds=[0, 1], steps=60, max_workers=2)
    for a, b in zip(out["results"], small["results"], strict=True):
        assert (a["task"], a["rank"], a["seed"], a["losses"], a["rel_error"]) == \
               (b["task"], b["rank"], b["seed"], b["losses"], b["rel_error"])


def test_on_result_reports_each_case() -> None:
    calls: list[tuple[int, int]] = []
    with cf.ThreadPoolExecutor(max_workers=1) as pool:
        sweep([1, 2], tasks=["synthetic"], steps=5, executor=pool,
              on_result=lambda done, total, record: calls.append((done, total)))
    assert calls == [(1, 2), (2, 2)]


@pytest.fixture(scope="module")
def dask_cluster() -> Any:
    distributed = require("distributed")
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False, protocol="tcp",
                                  dashboard_address=None) as cluster:
        yield cluster


def test_dask_executor_python_api(dask_cluster: Any, small: dict) -> None:
    from distributed import Client

    with Client(dask_cluster) as client:
        out = sweep([1, 4], seeds=[0, 1], steps=60, executor=client.get_executor())
    assert [r["losses"] for r in out["results"]] == [r["losses"] for r in small["results"]]


@pytest.mark.slow
def test_dask_scheduler_option(dask_cluster: Any) -> None:
    out = run_cli("sweep", "--ranks", "1", "2", "--steps", "20", "--tasks", "synthetic",
                  "--scheduler", dask_cluster.scheduler_address, "--json", "-")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["where"] == f"dask scheduler {dask_cluster.scheduler_address}"
    direct = [synthetic_experiment(steps=20, rank=r, seed=0)["losses"] for r in (1, 2)]
    assert [r["losses"] for r in report["results"]] == direct


@pytest.mark.slow
def test_unreachable_scheduler_is_one_line() -> None:
    require("distributed")
    one_line_error(run_cli("sweep", "--ranks", "1", "--steps", "2", "--scheduler", "tcp://127.0.0.1:9",
                           "--connect-timeout", "0.5"), "--scheduler", "cannot connect")
    one_line_error(run_cli("sweep", "--ranks", "1", "--steps", "2", "--scheduler", "bogus:://x"),
                   "--scheduler", "bogus")


def test_scheduler_without_dask_is_one_line() -> None:
    wrapper = BLOCK_MATPLOTLIB.replace("sys.modules['matplotlib'] = None", "sys.modules['distributed'] = None")
    out = run_cli("sweep", "--ranks", "1", "--steps", "2", "--scheduler", "tcp://127.0.0.1:9", wrapper=wrapper)
    one_line_error(out, "dask", "pip install")


# ---------------------------------------------------------------- the command


@pytest.mark.slow
def test_acceptance_command_under_a_minute(tmp_path: Path) -> None:
    """``minilora sweep --ranks 1 2 4 8 --steps 300 --plot sweep.png`` (the issue's acceptance)."""
    require("matplotlib")
    start = time.perf_counter()
    out = run_cli("sweep", "--ranks", "1", "2", "4", "8", "--steps", "300", "--plot", str(tmp_path / "sweep.png"))
    seconds = time.perf_counter() - start
    assert out.returncode == 0, out.stderr
    assert seconds < 60, seconds
    assert (tmp_path / "sweep.png").read_bytes()[:8] == PNG_SIGNATURE
    assert [p.name for p in tmp_path.iterdir()] == ["sweep.png"]
    lines = out.stdout.splitlines()
    for task in ("seed", "synthetic"):
        assert sum(1 for line in lines if line.split()[:1] == [task]) == 4
    assert "subspace similarity phi(A_r=1, A_r=8, i, j), synthetic" in out.stdout


def test_table_shows_the_json_numbers(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    out = run_cli("sweep", "--ranks", "2", "3", "--seeds", "0", "1", "--steps", "30", "--json", str(target))
    assert out.returncode == 0, out.stderr
    report = json.loads(target.read_text())
    assert report["settings"]["ranks"] == [2, 3] and report["settings"]["seeds"] == [0, 1]
    rows = {(line.split()[0], int(line.split()[1])): line.split() for line in out.stdout.splitlines()[2:]
            if line.split()[:1] in (["seed"], ["synthetic"])}
    for row in summarize(report["results"]):
        cells = rows[(row["task"], row["rank"])]
        assert int(cells[2]) == row["lora_params"]
        assert float(cells[3]) == pytest.approx(row["final_loss"], rel=1e-5)
        assert float(cells[4]) == pytest.approx(row["rel_error"], abs=5e-5)
    assert f"json    {target}" in out.stdout


def test_json_to_stdout_is_one_object() -> None:
    out = run_cli("sweep", "--ranks", "1", "--steps", "3", "--tasks", "seed", "--json", "-")
    assert out.returncode == 0 and out.stderr == ""
    report = json.loads(out.stdout)
    assert set(report) == {"settings", "results", "similarity", "seconds", "where"}
    assert report["results"][0]["lora_params"] == 200


@pytest.mark.slow
def test_picture_shows_what_the_table_says() -> None:
    """The figure's curves end at the table's final losses, and its heat maps hold the grids."""
    require("matplotlib")
    from minilora.cli.sweep import sweep_figure

    with cf.ThreadPoolExecutor(max_workers=2) as pool:
        out = sweep([1, 2, 4], seeds=[0, 1], steps=40, executor=pool)
    fig = sweep_figure(out)
    try:
        axes = fig.axes
        rows = summarize(out["results"])
        for t, task in enumerate(out["settings"]["tasks"]):
            curves, heat = axes[2 * t], axes[2 * t + 1]  # the colorbars' axes come after the grid
            finals = [line.get_ydata()[-1] for line in curves.get_lines()]
            expected = [r["final_loss"] for r in rows if r["task"] == task]
            np.testing.assert_allclose(finals, expected, rtol=1e-12)
            labels = [text.get_text() for text in curves.get_legend().get_texts()]
            assert labels == [f"r={r}: final {v:.3g}" for r, v in zip((1, 2, 4), expected, strict=True)]
            np.testing.assert_array_equal(heat.get_images()[0].get_array(), np.asarray(out["similarity"][task]["grid"]))
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


def test_plot_without_matplotlib(tmp_path: Path) -> None:
    out = run_cli("sweep", "--ranks", "1", "--steps", "2", "--plot", str(tmp_path / "s.png"), wrapper=BLOCK_MATPLOTLIB)
    one_line_error(out, "matplotlib", "pip install")
    assert not (tmp_path / "s.png").exists()


@pytest.mark.parametrize(("args", "fragment"), [
    (["--ranks", "0"], "--ranks"),
    (["--ranks", "-2", "4"], "--ranks"),
    (["--ranks", "two"], "--ranks"),
    (["--ranks", "2", "2"], "--ranks must not repeat"),
    (["--ranks", "1", "2", "--compare", "1", "8"], "--compare ranks must be among --ranks"),
    (["--seeds", "-1"], "--seeds"),
    (["--tasks", "imagenet"], "imagenet"),
    (["--steps", "0"], "--steps"),
    (["--lr", "0", "--steps", "1"], "lr must be > 0.0"),
    (["--connect-timeout", "0", "--scheduler", "tcp://x:1"], "--connect-timeout"),
    (["--json", "/nonexistent/folder/out.json"], "does not exist"),
])
def test_bad_arguments_one_line(args: list[str], fragment: str) -> None:
    out = run_cli("sweep", *args)
    one_line_error(out, fragment)
    assert out.stdout == ""


# ---------------------------------------------------------------- Python API bad input


@pytest.mark.parametrize(("ranks", "error", "fragment"), [
    ([], MiniLoraValueError, "ranks must not be empty"),
    ([0], MiniLoraValueError, "ranks must hold positive integers; got 0 at position 0"),
    ([2, -1], MiniLoraValueError, "got -1 at position 1"),
    ([4, 4], MiniLoraValueError, "must not repeat a value; got 4 twice"),
    ([1.5], MiniLoraTypeError, "got 1.5 at position 0"),
    ([True], MiniLoraTypeError, "got True at position 0"),
    ("12", MiniLoraTypeError, "ranks must be a list of positive integers; got str"),
    (3, MiniLoraTypeError, "got int"),
])
def test_bad_rank_lists(ranks: Any, error: type, fragment: str) -> None:
    with pytest.raises(error) as info:
        sweep(ranks, steps=1, executor=cf.ThreadPoolExecutor(1))
    assert fragment in str(info.value)


@pytest.mark.parametrize(("kwargs", "error", "fragment"), [
    ({"seeds": []}, MiniLoraValueError, "seeds must be a non-empty list"),
    ({"seeds": [-1]}, MiniLoraValueError, "seeds must hold integers >= 0; got -1"),
    ({"tasks": ["mnist"]}, MiniLoraValueError, "tasks must be a non-empty list from seed, synthetic"),
    ({"compare": (1, 16)}, MiniLoraValueError, "compare must be two of the swept ranks [1, 2]"),
    ({"steps": 0}, MiniLoraValueError, "steps must be a positive integer"),
    ({"executor": object()}, MiniLoraTypeError, "executor must be a concurrent.futures.Executor"),
    ({"intrinsic_rank": 0}, MiniLoraValueError, "intrinsic_rank must be a positive integer"),
])
def test_bad_sweep_arguments(kwargs: dict, error: type, fragment: str) -> None:
    with pytest.raises(error) as info:
        sweep([1, 2], **kwargs)
    assert fragment in str(info.value)


def test_bad_case_and_intrinsic_rank() -> None:
    with pytest.raises(MiniLoraValueError, match="task must be one of"):
        run_case({"task": "mnist", "rank": 1, "seed": 0, "steps": 1, "lr": 0.01})
    with pytest.raises(MiniLoraValueError, match="intrinsic_rank must be <= d = 32; got 40"):
        synthetic_experiment(steps=1, intrinsic_rank=40)


# ---------------------------------------------------------------- progress


@pytest.mark.parametrize("tty", [True, False])
def test_progress_on_a_terminal_only(tty: bool) -> None:
    from minilora.cli.common import Progress
    from minilora.cli.sweep import case_line

    stream = FakeTerminal(tty)
    progress = Progress(stream=stream)
    with cf.ThreadPoolExecutor(max_workers=1) as pool:
        sweep([1, 2], tasks=["synthetic"], steps=3, executor=pool,
              on_result=lambda done, total, record: progress.show(case_line(done, total, record)))
    progress.close()
    if tty:
        assert "case 1/2  synthetic r=1 seed 0" in stream.text and "case 2/2  synthetic r=2 seed 0" in stream.text
        assert stream.text.endswith("\r")
    else:
        assert stream.text == ""
