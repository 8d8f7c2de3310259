"""``minilora check``: PyTorch, PEFT and loralib pass for real, deliberately broken adapters fail
on exactly the properties they break (with the worst element named), bad targets give one line,
and the suite runs inside pytest (this file's TestTorchConformance, and a user project's run)."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from helpers import REPO, assert_one_line_error, require, run_cli

import minilora
import minilora.cli.common
from minilora.testing.adapters import FrameworkUnavailableError, TargetError, load_adapter
from minilora.testing.conformance import CORE_PROPERTIES, EDGE_CASES, check, planned
from minilora.testing.pytest_plugin import ConformanceTests
from minilora.testing.variant_checks import DORA_PROPERTIES, VARIANT_PROPERTIES

TESTS = Path(__file__).resolve().parent
ALL_DTYPES = ["float64", "float32", "float16", "bfloat16"]
FRAMEWORK = {"torch": "torch", "peft": "peft", "loralib": "loralib"}


def cli_check(target: str, json_path: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = run_cli("check", target, "--json", json_path)
    report = json.loads(Path(json_path).read_text()) if Path(json_path).exists() else {}
    return out, report


# --------------------------------------------------------------------------- the three frameworks


@pytest.mark.compare
@pytest.mark.parametrize("target", ["torch", "peft", "loralib"])
def test_check_passes_for_the_real_frameworks(target: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    module = require(FRAMEWORK[target])
    path = tmp_path_factory.mktemp(target) / "report.json"
    out, report = cli_check(target, str(path))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith(f"minilora check {target}: ")
    assert f"minilora {minilora.__version__}" in lines[0]
    # what the adapter declared is shown: torch's float32 sums under float16/bfloat16
    assert lines[1].startswith("declared: float16: ") and "accumulate float32" in lines[1]
    if target == "peft":
        assert "adapter float32" in lines[1]
    assert lines[2].split() == ["property", "dtype", "cases", "worst", "error", "/", "bound", "detects", "verdict"]
    rows = [line.split() for line in lines[3:] if line.startswith("  ")]
    expected = [(p, d) for p in CORE_PROPERTIES if p != "init" for d in ALL_DTYPES
                if not (p == "adam" and d == "float16")]
    expected.append(("init", "float32"))
    expected += [(p, "any") if p == "trainable" else (p, d) for p in VARIANT_PROPERTIES
                 for d in (("any",) if p == "trainable" else ("float64", "float32"))]
    assert [(r[0], r[1]) for r in rows] == expected
    # loralib has no DoRA: those rows are n/a, every other row passes
    na = set(DORA_PROPERTIES) if target == "loralib" else set()
    assert all(r[-1] == ("n/a" if r[0] in na else "pass") for r in rows)
    for r in rows:  # cases, then "error / bound (ratio)", each error within its bound, then ">threshold"
        if r[0] in na or r[0] == "trainable":  # no numbers: n/a, or a set compared exactly
            continue
        cases, error, bound, threshold = int(r[2]), float(r[3]), float(r[5]), float(r[7].lstrip(">"))
        assert cases >= (2 if r[0] == "init" else 20) and error <= bound and 0 < threshold < 0.1
    assert lines[-1].startswith(f"all {len(expected) - 2 * len(na)} checks passed")

    assert report["passed"] is True and report["target"] == target
    assert report["seed"] == 0 and report["max_examples"] == 20
    assert report["versions"]["minilora"] == minilora.__version__
    assert report["versions"]["numpy"] == __import__("numpy").__version__
    if target != "loralib":  # loralib has no __version__; its version comes from the package metadata
        assert report["versions"][target] == module.__version__
    assert report["versions"][target] not in ("", "unknown")
    assert [(r["property"], r["dtype"]) for r in report["results"]] == expected
    for r in report["results"]:
        if r["property"] in na:
            assert r["verdict"] == "n/a" and r["cases"] == 0
            continue
        assert r["verdict"] == "pass" and r["failed_cases"] == 0 and r["ratio"] <= 1.0


# --------------------------------------------------------------------------- broken adapters

BROKEN = [
    ("WrongScale", {"forward", "grad_x", "grad_A", "grad_B", "merge", "merged_forward"}),
    ("DroppedBias", {"forward"}),
    ("TransposedB", {"forward", "grad_x", "grad_A", "grad_B"}),
    ("NoMergeTranspose", {"merge", "merged_forward"}),
    ("AdamWithoutBiasCorrection", {"adam"}),
]


@pytest.mark.compare
@pytest.mark.parametrize(("name", "breaks"), BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_adapters_fail_exactly_where_they_are_broken(name: str, breaks: set) -> None:
    require("torch")
    import broken_adapter

    report = check(getattr(broken_adapter, name), max_examples=4, seed=1)
    assert not report.passed
    failed = {r.property for r in report.results if not r.passed}
    if name == "WrongScale":  # its round trip cancels only in exact arithmetic: a 16x larger delta at
        failed.discard("unmerge")  # width 1024 leaves a rounding residue beyond the right scale's bound in some dtypes
    assert failed == breaks
    for r in report.results:
        if r.property in breaks:  # broken in every dtype, with numbers, not an exception
            assert r.verdict == "FAIL" and r.error is None and r.worst.ratio > 1, r
            message = r.message()
            assert message.startswith(f"FAIL {r.property} ({r.dtype}): ")
            assert "worst element" in message and "> bound" in message and "got" in message


@pytest.mark.compare
def test_the_cli_names_the_failing_property_and_worst_element(tmp_path: Path) -> None:
    require("torch")
    report_path = tmp_path / "r.json"
    out = run_cli("check", "broken_adapter:WrongScale", "--max-examples", "3", "--dtype", "float32",
                  "--json", str(report_path), pythonpath_first=TESTS)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    text = out.stdout
    assert re.search(r"^  forward +float32 ", text, re.M) and "FAIL" in text
    fail_lines = [line for line in text.splitlines() if line.startswith("FAIL ")]
    assert [line.split()[1] for line in fail_lines] == ["forward", "grad_x", "grad_A", "grad_B", "merge",
                                                        "merged_forward"]
    forward = fail_lines[0]
    assert "worst element y[" in forward and "expected" in forward and "x the bound" in forward
    # 9 rows of plain LoRA and 14 of the variants (13 in float32, the trainable set), which pass
    assert text.splitlines()[-1].startswith("6 of 23 checks FAILED")
    report = json.loads(report_path.read_text())
    assert report["passed"] is False
    bad = [r for r in report["results"] if not r["passed"]]
    assert bad[0]["property"] == "forward" and bad[0]["worst_output"] == "y"
    assert len(bad[0]["worst_index"]) >= 2 and bad[0]["ratio"] > 1 and "worst element" in bad[0]["message"]


@pytest.mark.compare
def test_an_adapter_that_raises_is_an_error_not_a_crash() -> None:
    require("torch")
    import broken_adapter

    report = check(broken_adapter.Crashes, max_examples=1, dtypes=["float64"])
    forward = report.result("forward", "float64")
    assert forward.verdict == "ERROR"
    assert "forward() raised RuntimeError: this adapter always crashes" in forward.message()
    assert report.result("grad_x", "float64").passed  # the other methods still run


class BadOutputs:
    """Answers of the wrong kind: a wrong shape, a grads dict without 'A', a merge without 'y'."""

    dtypes = ("float64",)

    def forward(self, p: Any) -> Any:
        return p.x  # (..., d_in), not (..., d_out)

    def grads(self, p: Any) -> dict:
        return {"x": p.x, "B": p.B}

    def merge(self, p: Any) -> dict:
        return {"W": p.W}

    def unmerge(self, p: Any) -> Any:
        return p.W

    def adam(self, p: Any) -> Any:
        return None


def test_outputs_of_the_wrong_kind_are_reported() -> None:
    report = check(BadOutputs(), max_examples=0)
    by_name = {r.property: r for r in report.results}
    assert "has shape" in by_name["forward"].message() and "expected" in by_name["forward"].message()
    assert "grads() returned no 'A' entry" in by_name["grad_A"].message()
    assert "merge() returned no 'y' entry" in by_name["merged_forward"].message()
    assert "adam() must return" in by_name["adam"].message()
    assert by_name["unmerge"].passed  # W back unchanged is right, even if nothing was merged
    assert by_name["grad_x"].verdict == by_name["merge"].verdict == "FAIL"  # x is no gradient, W no merge
    assert "init" not in by_name  # no init method: not planned


# --------------------------------------------------------------------------- options and API


@pytest.mark.compare
def test_seed_makes_runs_reproducible() -> None:
    require("torch")
    import broken_adapter

    def run(seed: int) -> list:
        report = check(broken_adapter.Float64Only, max_examples=5, seed=seed)
        return [(r["property"], r["cases"], r.get("worst_case"), r.get("worst_error")) for r in
                report.to_dict()["results"]]

    first = run(3)
    assert run(3) == first
    assert run(4) != first


@pytest.mark.compare
def test_filters_and_planning() -> None:
    require("torch")
    adapter = load_adapter("torch")
    assert ("adam", "float16") not in planned(adapter)
    assert planned(adapter, ["bfloat16"], ["forward", "adam", "init"]) == [("forward", "bfloat16"),
                                                                          ("adam", "bfloat16")]
    assert planned(adapter, None, ["init"]) == [("init", "float32")]
    report = check("torch", dtypes=["float64"], properties=["merge"], max_examples=0)
    assert [(r.property, r.dtype, r.cases) for r in report.results] == [("merge", "float64", len(EDGE_CASES))]


@pytest.mark.compare
def test_progress_is_shown_on_a_terminal(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    require("torch")

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.syspath_prepend(str(TESTS))
    code = minilora.cli.main(["check", "broken_adapter:Float64Only", "--max-examples", "1"])
    assert code == 0
    shown = terminal.getvalue()
    assert "\r  checking layer float64" in shown and "\r  checking adam float64" in shown
    assert shown.endswith("\r")  # the line is cleared at the end
    assert "all 23 checks passed" in capsys.readouterr().out  # 9 of plain LoRA, 14 of the variants


# --------------------------------------------------------------------------- bad targets


def test_unknown_target() -> None:
    assert_one_line_error(run_cli("check", "tensorflow"), "unknown target 'tensorflow'", "module:Class")


@pytest.mark.slow
def test_module_that_does_not_import(tmp_path: Path) -> None:
    (tmp_path / "broken_syntax.py").write_text("def oops(:\n")
    (tmp_path / "imports_missing.py").write_text("import no_such_package_here\n")
    assert_one_line_error(run_cli("check", "broken_syntax:Adapter", pythonpath_first=tmp_path),
                          "cannot import module 'broken_syntax'", "SyntaxError")
    assert_one_line_error(run_cli("check", "imports_missing:Adapter", pythonpath_first=tmp_path),
                          "cannot import module 'imports_missing'", "No module named 'no_such_package_here'")
    assert_one_line_error(run_cli("check", "no_module_by_this_name:Adapter"),
                          "No module named 'no_module_by_this_name'")


@pytest.mark.slow
def test_missing_class_and_missing_methods() -> None:
    assert_one_line_error(run_cli("check", "broken_adapter:NoSuchClass", pythonpath_first=TESTS),
                          "module 'broken_adapter' has no attribute 'NoSuchClass'")
    assert_one_line_error(run_cli("check", "broken_adapter:MissingMethods", pythonpath_first=TESTS),
                          "missing the adapter method(s) grads (an adapter needs forward, grads")
    with pytest.raises(TargetError, match="must look like module:Class"):
        load_adapter("broken_adapter:")


@pytest.mark.compare
@pytest.mark.parametrize(("target", "package"), [("peft", "peft"), ("loralib", "loralib"), ("torch", "torch")])
def test_framework_not_installed(target: str, package: str) -> None:
    block = (
        "import runpy, sys\n"
        f"sys.modules[{package!r}] = None  # as if it were not installed\n"
        "sys.argv = ['minilora', *sys.argv[1:]]\n"
        "runpy.run_module('minilora', run_name='__main__', alter_sys=True)\n"
    )
    line = assert_one_line_error(run_cli("check", target, wrapper=block), f"target {target!r} needs {package}",
                                 "pip install 'minilora[compare]'")
    assert "not installed" in line


def test_framework_error_is_an_import_error() -> None:
    assert issubclass(FrameworkUnavailableError, ImportError)
    assert issubclass(FrameworkUnavailableError, minilora.MiniLoraError)


def test_json_into_a_missing_folder(tmp_path: Path) -> None:
    assert_one_line_error(run_cli("check", "broken_adapter:Float64Only", "--json", str(tmp_path / "no" / "r.json"),
                                  pythonpath_first=TESTS), "--json: folder")


# --------------------------------------------------------------------------- inside pytest


@pytest.mark.compare
class TestTorchConformance(ConformanceTests):
    """The suite as another project would run it, here against plain PyTorch."""

    target = "torch"
    max_examples = 3
    seed = 5


@pytest.mark.compare
def test_the_plugin_in_a_users_project(tmp_path: Path) -> None:
    """A project with its own adapter runs the suite in its pytest: a subclass in its tests, and
    the ready-made module via the plugin's option. Failures name the property and element."""
    require("torch")
    (tmp_path / "test_theirs.py").write_text(textwrap.dedent("""
        from minilora.testing.pytest_plugin import ConformanceTests

        class TestGood(ConformanceTests):
            target = "broken_adapter:Float64Only"
            max_examples = 2

        class TestBad(ConformanceTests):
            target = "broken_adapter:DroppedBias"
            max_examples = 2
            dtypes = ["float32"]
            properties = ["forward", "merge"]
    """))
    env_path = [str(TESTS), str(REPO)]
    base = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts="]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(env_path)}
    # their test file, and the ready-made suite module pointed at another adapter by the option
    out = subprocess.run([*base, "-p", "minilora.testing.pytest_plugin", "--minilora-target",
                          "broken_adapter:AdamWithoutBiasCorrection", "--minilora-max-examples", "1",
                          "--pyargs", "test_theirs.py", "minilora.testing.suite"],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert out.returncode == 1, out.stdout + out.stderr
    failed = sorted(line.split(" - ")[0].split("::", 1)[1] for line in out.stdout.splitlines()
                    if line.startswith("FAILED"))
    assert failed == [  # (the suite module lies outside the rootdir: pytest prints no path for it)
        "TestBad::test_conformance[forward-float32]",
        "TestConformance::test_conformance[adam-bfloat16]",
        "TestConformance::test_conformance[adam-float32]",
        "TestConformance::test_conformance[adam-float64]",
    ], out.stdout
    # TestGood: 9 properties in float64 and 14 of the variants; TestBad: 2; the suite: 32 and 27
    # of the variants (float64, float32, the trainable set) for a torch-based adapter
    assert "4 failed, 80 passed" in out.stdout, out.stdout
    assert "FAIL forward (float32)" in out.stdout and "worst element y[" in out.stdout
    assert "FAIL adam (float32)" in out.stdout and "worst element" in out.stdout

    out = subprocess.run([*base, "-p", "minilora.testing.pytest_plugin", "--pyargs", "minilora.testing.suite"],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert out.returncode != 0 and "no adapter to check" in out.stdout + out.stderr
