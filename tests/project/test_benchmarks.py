"""The benchmark scripts run and write what they promise. No timing is asserted here: speed is
measured by running the scripts themselves (see docs/performance.md), never by tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import require

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"


def run(script: str, *args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True,
                          check=check, timeout=300, env=env)


def blocking(tmp_path: Path, *modules: str) -> dict:
    """An environment in which ``import MODULE`` raises ImportError for each of ``modules``, as
    when it is not installed: a folder of stand-ins first on PYTHONPATH."""
    stubs = tmp_path / "blocked"
    stubs.mkdir()
    for m in modules:
        (stubs / f"{m}.py").write_text(f"raise ImportError('{m} is blocked for this test')\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(stubs)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch) -> object:
    """The benchmark scripts as modules (bench_step, bench_seed), importable without JAX."""
    monkeypatch.syspath_prepend(str(BENCH))
    import bench_seed
    import bench_step

    class Modules:
        step, seed = bench_step, bench_seed

    return Modules


@pytest.mark.compare
def test_bench_step_writes_one_record_per_case(tmp_path: Path) -> None:
    require("torch")
    out = tmp_path / "step.json"
    run("bench_step.py", "--shapes", "8x16x12x2", "--repeat", "2", "--json", str(out))
    records = json.loads(out.read_text())
    assert len(records) == 4  # one shape x (float64, float32) x (mse, l1)
    for rec in records:
        for key in ("name", "dtype", "n", "d_in", "d_out", "r", "loss", "minilora_s", "torch_s", "floor_s",
                    "numpy_xW_s", "torch_xW_s", "jax_s", "minilora_over_jax", "jax_xW_s", "jax_check_rel_diff",
                    "jax_check_ok"):
            assert key in rec, key
        assert (rec["n"], rec["d_in"], rec["d_out"], rec["r"]) == (8, 16, 12, 2)
        assert rec["minilora_s"] > 0 and rec["floor_s"] > 0 and rec["torch_s"] > 0
        assert rec["numpy_xW_s"] > 0 and rec["torch_xW_s"] > 0
    assert {(r["dtype"], r["loss"]) for r in records} == {(d, lo) for d in ("float64", "float32") for lo in ("mse", "l1")}


@pytest.mark.slow
def test_bench_step_skips_jax_with_a_note_without_it(tmp_path: Path) -> None:
    out = tmp_path / "step.json"
    env = blocking(tmp_path, "jax", "optax", "torch")  # torch too: the test needs neither
    proc = run("bench_step.py", "--quick", "--shapes", "8x16x12x2", "--repeat", "2", "--json", str(out), env=env)
    assert "note: jax (or optax) is not installed; the jax columns are skipped" in proc.stdout
    assert "note: torch is not installed" in proc.stdout
    records = json.loads(out.read_text())
    assert len(records) == 4
    for rec in records:
        assert rec["minilora_s"] > 0 and rec["floor_s"] > 0
        for key in ("jax_s", "minilora_over_jax", "jax_xW_s", "jax_check_rel_diff", "jax_check_ok", "torch_s"):
            assert rec[key] is None, key
        assert rec["environment"]["jax"] is None


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
    # with JAX installed the script also checks JAX's losses and exits 1 if they disagree
    assert all("jax_s" in r and "ratio_jax" in r for r in records)


@pytest.mark.compare
def test_bench_seed_skips_jax_with_a_note_without_it(tmp_path: Path) -> None:
    require("torch")
    out = tmp_path / "seed.json"
    proc = run("bench_seed.py", "--steps", "20", "--repeat", "1", "--json", str(out),
               env=blocking(tmp_path, "jax", "optax"))
    assert "note: jax (or optax) is not installed; the jax columns are skipped" in proc.stdout
    records = json.loads(out.read_text())
    assert [r["dtype"] for r in records] == ["float64", "float32"]
    for rec in records:
        assert rec["jax_s"] is None and rec["ratio_jax"] is None and "jax_agrees" not in rec
        assert rec["torch_s"] > 0 and rec["ratio"] > 0
        assert rec["environment"]["jax"] is None


def test_bench_seed_without_torch_or_jax_has_nothing_to_compare(tmp_path: Path) -> None:
    proc = run("bench_seed.py", "--steps", "2", check=False, env=blocking(tmp_path, "jax", "optax", "torch"))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "note: jax (or optax) is not installed" in proc.stdout and "note: torch is not installed" in proc.stdout
    assert "nothing to compare against" in proc.stdout


# JAX is not a test dependency and CI turns every skip into a failure (tests/conftest.py), so no
# test here needs JAX: the JAX contenders' agreement with minilora is checked by the scripts
# themselves whenever JAX is installed (the "jax check" column of bench_step.py, exit status 1 on
# a disagreement in both scripts). What is tested here is the logic around it, without JAX.


def test_import_jax_is_none_when_jax_cannot_be_imported(bench: object, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "jax", None)  # `import jax` raises ImportError
    assert bench.step.import_jax() is None  # type: ignore[attr-defined]


def test_step_check_compares_loss_and_both_factors(bench: object) -> None:
    step = bench.step  # type: ignore[attr-defined]
    c = step.make_case(8, 16, 12, 2, "float64")
    mini = step.minilora_step(c, "l1")
    mini()
    mini()
    ref = mini.box  # the loss of the second step and A, B after two updates
    assert ref["loss"] is not None and float(ref["loss"]) > 0
    same = {"loss": float(ref["loss"]), "lora": {k: np.array(v) for k, v in ref["lora"].items()}}
    assert step.step_rel_diff(ref, same) == 0.0
    for part in ("loss", "A", "B"):
        other = {"loss": same["loss"], "lora": dict(same["lora"])}
        if part == "loss":
            other["loss"] = same["loss"] * (1 + 1e-9)
        else:
            other["lora"][part] = same["lora"][part] * (1 + 1e-9)
        d = step.step_rel_diff(ref, other)
        assert 0.5e-9 < d < 2e-9, part
        assert d > step.JAX_CHECK_TOL["float64"] and d < step.JAX_CHECK_TOL["float32"]
    with pytest.raises(ValueError, match="shapes differ"):
        step.rel_diff(np.zeros(3), np.zeros(4))
    assert step.rel_diff(np.zeros(3), np.zeros(3)) == 0.0


def test_seed_agreement_checks_the_last_loss_and_the_early_ones(bench: object) -> None:
    seed = bench.seed  # type: ignore[attr-defined]
    losses = list(np.geomspace(2460.0, 0.63, 300))
    ok = seed.jax_agreement(losses, losses, "float64")
    assert ok["jax_agrees"] and ok["jax_final_rel_loss_diff"] == 0.0 and ok["jax_final_loss"] == losses[-1]
    last_off = losses[:-1] + [losses[-1] * 1.2]  # a float32 run on the same plateau
    assert not seed.jax_agreement(losses, last_off, "float64")["jax_agrees"]
    assert seed.jax_agreement(losses, last_off, "float32")["jax_agrees"]
    early_off = [losses[0] * (1 + 1e-4)] + losses[1:]  # before the histories may part
    r = seed.jax_agreement(losses, early_off, "float32")
    assert not r["jax_agrees"] and r["jax_early_max_rel_loss_diff"] == pytest.approx(1e-4)
    late_off = losses[:200] + [v * 1.3 for v in losses[200:]]  # after step EARLY_STEPS: only the last counts
    assert seed.jax_agreement(losses, late_off, "float32")["jax_agrees"]
    with pytest.raises(ValueError, match="different lengths"):
        seed.jax_agreement(losses, losses[:-1], "float64")


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
        assert "Adam on A and B" in names and ("G = sign(y - t) * c" in names) == (p["loss"] == "l1")
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
