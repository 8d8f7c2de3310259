"""benchmarks/bench_merge.py runs at a tiny size and writes what it promises (no timing asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import require

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.compare
def test_bench_merge_tiny_run_is_bit_equal(tmp_path: Path) -> None:
    require("torch"), require("peft"), require("transformers")
    out = tmp_path / "merge.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_merge.py"), "--hidden", "64", "--layers", "1",
                           "--intermediate", "96", "--vocab", "100", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "outputs bit-equal: True" in proc.stdout
    rec = json.loads(out.read_text())
    assert rec["bit_equal"] is True and rec["comparison"]["tensors"] > 5
    assert rec["comparison"]["differing_elements"] == 0 and rec["comparison"]["max_ulps"] == 0
    for case in ("copy", "minilora", "pytorch"):
        assert rec["cases"][case]["wall_s"] > 0 and rec["cases"][case]["peak_rss_mb"] > 0
        assert rec["cases"][case]["cpu_s"] >= 0 and rec["cases"][case]["mb_per_s"] > 0
    assert set(rec["ratios"]) == {"wall_vs_pytorch", "wall_vs_copy", "rss_vs_pytorch"}
