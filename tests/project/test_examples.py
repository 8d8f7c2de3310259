"""The scripts in examples/ run, each in well under a minute, and print what they claim."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import require

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_example(name: str, *args: str) -> tuple[str, float]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    start = time.perf_counter()
    out = subprocess.run([sys.executable, str(EXAMPLES / name), *args], check=False, capture_output=True, text=True, env=env,
                         cwd=REPO, timeout=120)
    seconds = time.perf_counter() - start
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    return out.stdout, seconds


def test_the_walkthroughs_exist() -> None:
    """The three walkthroughs tested below (other examples may have tests of their own)."""
    names = {p.name for p in EXAMPLES.glob("*.py")}
    assert {"qlora_mlp.py", "rank_sweep.py", "seed_step_by_step.py"} <= names


@pytest.mark.slow
def test_seed_step_by_step(tmp_path: Path) -> None:
    require("matplotlib")
    out, seconds = run_example("seed_step_by_step.py", "--plot", str(tmp_path / "seed.png"))
    assert seconds < 60
    assert "|dL/dB| = 0.0000 (zero" in out  # the seed's zero factor blocks B's first gradient
    losses = [float(m) for m in re.findall(r"step\s+\d+\s+loss\s+([\d.]+)", out)]
    assert len(losses) >= 5 and losses[-1] < 1e-3 * losses[0]
    assert "merged dense == LoRA forward: True" in out
    error = float(re.search(r"relative Frobenius error ([\d.]+)", out).group(1))
    assert error < 0.01
    assert (tmp_path / "seed.png").read_bytes()[:8] == PNG_SIGNATURE


@pytest.mark.slow
def test_rank_sweep(tmp_path: Path) -> None:
    require("matplotlib")
    out, seconds = run_example("rank_sweep.py", "--plot", str(tmp_path / "sweep.png"))
    assert seconds < 60
    rows = [line.split() for line in out.splitlines() if re.match(r"\s+\d+\s+\d+\s+[\d.]+\s+[\d.]+", line)]
    assert [int(r[0]) for r in rows] == [1, 2, 3, 4, 6, 8]
    for rank, _params, error, floor, *_ in rows:
        assert float(error) >= float(floor) - 1e-4  # nothing beats the best rank-r approximation
        assert float(error) <= float(floor) + 0.01  # and training reaches it
        if int(rank) >= 4:
            assert float(floor) == 0.0
    assert (tmp_path / "sweep.png").read_bytes()[:8] == PNG_SIGNATURE


@pytest.mark.slow
def test_qlora_mlp(tmp_path: Path) -> None:
    """Run with its defaults (400 steps), as a reader would."""
    require("matplotlib")
    out, seconds = run_example("qlora_mlp.py", "--plot", str(tmp_path / "q.png"))
    assert seconds < 60
    assert "4.127 bits per weight" in out
    for layer in ("l1", "l2"):
        rel = float(re.search(rf"layer {layer}: .* relative error ([\d.]+)", out).group(1))
        assert 0 < rel < 0.15
    q = re.search(r"QLoRA \(NF4 base\)\s+loss ([\d.e-]+) -> ([\d.e-]+)", out)
    f = re.search(r"LoRA \(float64 base\)\s+loss ([\d.e-]+) -> ([\d.e-]+)", out)
    assert float(q.group(2)) < 0.01 * float(q.group(1))
    assert float(f.group(2)) < float(q.group(2))  # the NF4 base costs accuracy LoRA does not fully win back
    assert (tmp_path / "q.png").read_bytes()[:8] == PNG_SIGNATURE
