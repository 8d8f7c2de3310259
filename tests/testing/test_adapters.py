"""The adapter protocol (minilora.testing.adapters) and the report's verdicts: optional methods
are "n/a", options an adapter lacks are "not covered" (never a pass), unknown names are refused
with the valid list, a wrong shape is a failure row naming the output, one raising case is a FAIL
for that case, and the precision an adapter declares sets its bounds. NumPy adapters only."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy_adapter as na
import pytest
from helpers import run_cli

from minilora.testing.adapters import TargetError, declared_precision, load_adapter
from minilora.testing.conformance import check

TESTS = Path(__file__).resolve().parent


def test_a_correct_numpy_adapter_passes() -> None:
    report = check(na.NumpyAdapter, max_examples=3)
    assert report.passed, report.failures()
    assert all(r.verdict == "pass" for r in report.results)
    assert report.to_dict()["results"][0]["case_results"][0]["passed"] is True


def test_merge_and_unmerge_are_optional() -> None:
    report = check(na.NoMerge, max_examples=1, dtypes=["float64"])
    verdicts = {r.property: r.verdict for r in report.results}
    assert verdicts["merge"] == verdicts["merged_forward"] == verdicts["unmerge"] == "n/a"
    assert verdicts["forward"] == "pass" and report.passed
    assert "has no merge() method" in report.result("merge", "float64").message()
    assert "merge" not in report.declared["methods"]


def test_missing_optimizer_options_are_not_covered_never_passed() -> None:
    report = check(na.NoAmsgradNoL2, max_examples=10, dtypes=["float64"], properties=["adam"])
    row = report.result("adam", "float64")
    assert row.not_covered > 0 and set(row.missing) <= {"amsgrad", "l2"} and row.missing
    assert row.cases > 0 and row.verdict == "pass"  # the covered cases passed
    assert "not covered" in report.table()
    skipped = [c for c in row.to_dict()["case_results"] if c["passed"] is None]
    assert len(skipped) == row.not_covered

    class OnlyAmsgrad(na.NumpyAdapter):
        optimizer_features = ()

    only = check(OnlyAmsgrad, max_examples=0, dtypes=["float64"], properties=["adam"]).result("adam", "float64")
    assert only.cases < len(only.case_results)  # the plain Adam cases still run


def test_a_row_with_every_case_not_covered_is_not_a_pass() -> None:
    from minilora.testing.report import PropertyResult

    row = PropertyResult("adam", "float64")
    row.skip("case 1", ["amsgrad"])
    assert row.verdict == "not covered" and not row.passed and not row.failed
    assert "need amsgrad" in row.message()


@pytest.mark.parametrize(("attr", "value", "valid"), [
    ("features", ("dropuot",), "dropout"),
    ("inits", ("he_uniformm",), "he_uniform"),
    ("optimizer_features", ("amsgrad", "nesterov"), "maximize"),
    ("dtypes", ("float8",), "bfloat16"),
    ("features", "dropout", "a list of names"),
])
def test_unknown_names_are_refused_with_the_valid_list(attr: str, value: Any, valid: str) -> None:
    adapter = na.NumpyAdapter()
    setattr(adapter, attr, value)
    with pytest.raises(TargetError, match=attr) as info:
        load_adapter(adapter)
    assert valid in str(info.value) and "valid" in str(info.value)


def test_bad_precision_declarations_are_refused() -> None:
    adapter = na.NumpyAdapter()
    adapter.precision = {"float32": {"acumulate": "float64"}}  # type: ignore[attr-defined]
    with pytest.raises(TargetError, match="unknown keys.*acumulate.*valid: adapter, accumulate, bias_correction"):
        load_adapter(adapter)
    adapter.precision = {"float32": {"accumulate": "float128"}}  # type: ignore[attr-defined]
    with pytest.raises(TargetError, match="unknown dtypes"):
        load_adapter(adapter)


def test_declared_precision_defaults_and_callables() -> None:
    assert declared_precision(na.NumpyAdapter(), "float32") == {"adapter": "float32", "accumulate": "float32",
                                                               "bias_correction": "float64"}

    class Wide(na.NumpyAdapter):
        def precision(self, dtype: str) -> dict:
            return {"bias_correction": "float32"}

    assert declared_precision(Wide(), "float64")["bias_correction"] == "float32"


def test_wrong_shapes_are_a_failure_row_naming_the_output() -> None:
    report = check(na.WrongShapes, max_examples=2, dtypes=["float64"], properties=["forward", "grad_x"])
    forward = report.result("forward", "float64")
    assert forward.verdict == "FAIL" and forward.failed_cases == forward.cases
    assert "y: has shape" in forward.message()
    assert report.result("grad_x", "float64").passed


def test_one_raising_case_is_a_failure_of_that_case_not_an_error_row() -> None:
    report = check(na.RaisesOnSquare, max_examples=4, dtypes=["float64"], properties=["forward"])
    row = report.result("forward", "float64")
    assert row.verdict == "FAIL" and 0 < row.raised < row.cases
    failed = [c for c in row.case_results if not c["passed"]]
    assert failed and all("square layers are not supported" in c["message"] for c in failed)
    for c in failed:  # exactly the square cases
        d_in, d_out = re.search(r"d_in (\d+), d_out (\d+)", c["case"]).groups()  # type: ignore[union-attr]
        assert d_in == d_out
    assert any("edge: square" in c["case"] for c in failed)


def test_every_bfloat16_adam_case_catches_a_missing_update() -> None:
    report = check(na.NoUpdate, max_examples=10, dtypes=["bfloat16", "float32"], properties=["adam"])
    for dt in ("bfloat16", "float32"):
        row = report.result("adam", dt)
        assert row.verdict == "FAIL", row
    bf16 = report.result("adam", "bfloat16")
    assert bf16.failed_cases == bf16.cases  # every case, not some: each one can see its update


def test_detection_thresholds_are_reported() -> None:
    report = check(na.NumpyAdapter, max_examples=2, dtypes=["float32"], properties=["forward", "adam"])
    for r in report.results:
        assert 0 < r.threshold < 1e-3
        assert r.to_dict()["detection_threshold"] == r.threshold
        assert all(c["threshold"] >= r.threshold for c in r.case_results)


@pytest.mark.slow
def test_cli_verbose_json_first_and_no_hypothesis_folder(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    out = run_cli("check", "numpy_adapter:NoAmsgradNoL2", "--max-examples", "2", "--dtype", "float64",
                  "--verbose", "--json", str(path), pythonpath_first=TESTS, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "not covered" in out.stdout and "    pass  error/bound" in out.stdout
    assert "[edge: square, fan_in_fan_out" in out.stdout
    report = json.loads(path.read_text())
    adam = [r for r in report["results"] if r["property"] == "adam"][0]
    assert adam["not_covered"] > 0 and adam["case_results"]
    assert ".hypothesis" not in os.listdir(tmp_path)
