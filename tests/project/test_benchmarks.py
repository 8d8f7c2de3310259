"""The benchmark scripts run and write what they promise. No timing is asserted here: speed is
measured by running the scripts themselves (see docs/performance.md), never by tests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import require

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"


def run(script: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True,
                          check=check, timeout=300)


@pytest.mark.compare
def test_bench_step_writes_one_record_per_case(tmp_path: Path) -> None:
    require("torch")
    out = tmp_path / "step.json"
    run("bench_step.py", "--shapes", "8x16x12x2", "--repeat", "2", "--json", str(out))
    records = json.loads(out.read_text())
    assert len(records) == 4  # one shape x (float64, float32) x (mse, l1)
    for rec in records:
        for key in ("name", "dtype", "n", "d_in", "d_out", "r", "loss", "minilora_s", "torch_s", "floor_s",
                    "numpy_xW_s", "torch_xW_s"):
            assert key in rec, key
        assert (rec["n"], rec["d_in"], rec["d_out"], rec["r"]) == (8, 16, 12, 2)
        assert rec["minilora_s"] > 0 and rec["floor_s"] > 0 and rec["torch_s"] > 0
        assert rec["numpy_xW_s"] > 0 and rec["torch_xW_s"] > 0
    assert {(r["dtype"], r["loss"]) for r in records} == {(d, lo) for d in ("float64", "float32") for lo in ("mse", "l1")}


@pytest.mark.slow
@pytest.mark.parametrize("script", ["bench_step.py", "profile_step.py"])
@pytest.mark.parametrize("shape", ["8x16x12", "8x0x12x2", "8x16xtwelvex2"])
def test_step_benchmarks_reject_bad_shapes(script: str, shape: str) -> None:
    proc = run(script, "--shapes", shape, check=False)
    assert proc.returncode == 2 and "--shapes takes N x D_IN x D_OUT x R" in proc.stderr and shape in proc.stderr


@pytest.mark.slow
def test_bench_memory_finds_no_weight_sized_temporary_in_a_lora_step(tmp_path: Path) -> None:
    out = tmp_path / "mem.json"
    run("bench_memory.py", "--n", "16", "--d", "512", "--rank", "4", "--dtype", "float64", "--json", str(out))
    (rec,) = json.loads(out.read_text())
    assert rec["lora_step_allocates_weight_sized_temporary"] is False
    assert rec["lora"]["step_peak_bytes"] < rec["lora"]["weight_bytes"]
    # the full fine-tuning step must hold W's gradient at least: the measurement sees it
    assert rec["full"]["step_peak_bytes"] >= rec["full"]["weight_bytes"]
    assert rec["lora"]["trainable_params"] == 2 * 4 * 512 and rec["full"]["trainable_params"] == 512 * 512


@pytest.mark.slow
def test_bench_import_reports_no_heavy_module(tmp_path: Path) -> None:
    out = tmp_path / "imp.json"
    proc = run("bench_import.py", "--runs", "2", "--json", str(out), check=False)
    rec = json.loads(out.read_text())
    assert rec["heavy_modules_imported"] == []
    assert rec["numpy_ms"] > 0 and rec["minilora_extra_ms"] > 0
    assert "import minilora on top" in proc.stdout


@pytest.mark.compare
def test_bench_seed_compares_with_torch(tmp_path: Path) -> None:
    require("torch")
    out = tmp_path / "seed.json"
    run("bench_seed.py", "--steps", "20", "--repeat", "1", "--json", str(out))
    records = json.loads(out.read_text())
    assert [r["dtype"] for r in records] == ["float64", "float32"]
    # same initial values, same algorithm: float64 histories agree far below any tolerance worry
    assert records[0]["max_rel_loss_diff"] < 1e-12


def test_gpu_check_says_no_cuda_device_here() -> None:
    try:
        import cupy  # noqa: F401

        pytest.skip("CuPy is installed here: the no-device message does not apply")
    except ImportError:
        pass
    proc = run("gpu_check.py")
    assert proc.returncode == 0
    assert "no CUDA device" in proc.stdout


def test_gpu_check_correctness_part_passes_on_the_cpu_stand_in() -> None:
    require("array_api_strict")
    proc = run("gpu_check.py", "--stand-in")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for check in ("forward", "grad x", "grad A", "grad B", "20 Adam steps: A", "20 Adam steps: B"):
        assert check in proc.stdout
    assert "FAIL" not in proc.stdout


@pytest.mark.slow
def test_profile_step_times_every_operation_of_the_step(tmp_path: Path) -> None:
    out = tmp_path / "profile.json"
    proc = run("profile_step.py", "--shapes", "8x16x12x2", "--dtypes", "float32", "--seconds", "0.05",
               "--scipy-gemm", "--json", str(out))
    rec = json.loads(out.read_text())
    assert [(p["shape"], p["dtype"], p["loss"]) for p in rec["profiles"]] == [
        ([8, 16, 12, 2], "float32", "mse"), ([8, 16, 12, 2], "float32", "l1")]
    for p in rec["profiles"]:
        names = [o["name"] for o in p["ops"]]
        # the six products of bench_step's floor, each timed where it runs in the step
        assert [n for n, o in zip(names, p["ops"], strict=True) if o["kind"] == "floor"] == [
            "x A^T", "x W^T", "h B^T", "G B", "(G B)^T x", "G^T h"]
        assert "Adam on A and B" in names and ("sign(d)" in names) == (p["loss"] == "l1")
        assert all(o["ms"] > 0 for o in p["ops"]) and p["step_ms"] > 0 and p["floor_ms"] > 0
    assert set(rec["scipy_gemm"][0]["ms"]) == {
        "numpy alone", "scipy alone", "numpy then scipy, alternating (sum of the two)"}
    assert "autograd, checks, Python (the rest)" in proc.stdout


def test_profile_step_refuses_to_profile_arithmetic_that_is_not_minilora_s(monkeypatch: pytest.MonkeyPatch) -> None:
    # the instrumented copy of the step must track minilora/ops.py: a drift is an error, not a
    # profile of something else
    monkeypatch.syspath_prepend(str(BENCH))
    import profile_step

    c = profile_step.make_case(8, 16, 12, 2, "float64")
    profile_step.check_same_arithmetic(c, "l1")  # passes as written
    monkeypatch.setattr(profile_step.ml, "adam_step", lambda p, g, st, lr: ({k: v + 1 for k, v in p.items()}, st))
    with pytest.raises(SystemExit, match="differs from minilora's step"):
        profile_step.check_same_arithmetic(c, "l1")
