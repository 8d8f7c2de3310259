"""Shared fixtures: the two backends every backend-sensitive test runs on, hypothesis profiles,
and the rule that in CI a comparison test may not skip."""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

import minilora as ml

# CI=true (set by the CI runner) or MINILORA_REQUIRE_ALL=1: a missing framework is a failure.
STRICT = os.environ.get("CI", "").lower() in ("1", "true", "yes") or os.environ.get("MINILORA_REQUIRE_ALL") == "1"

settings.register_profile(
    "ci", derandomize=True, max_examples=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if STRICT else "dev"))


def require(module: str) -> Any:
    """Import an optional framework; skip without it locally, fail without it in CI."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if STRICT:
            pytest.fail(f"{module} is required in CI but could not be imported: {exc}")
        pytest.skip(f"{module} is not installed (pip install -e '.[test,compare]')")


@dataclass
class BackendCase:
    """One backend under test: ``put`` moves host NumPy data there, ``get`` brings it back."""

    name: str
    xp: Any
    device: Any

    def put(self, a: Any, dtype: str = "float64") -> Any:
        return ml.get_backend().asarray(np.asarray(a, dtype=dtype))

    def get(self, a: Any) -> np.ndarray:
        return np.asarray(ml.to_numpy(a))

    def tree(self, t: Any, dtype: str = "float64") -> Any:
        if isinstance(t, dict):
            return {k: self.tree(v, dtype) for k, v in t.items()}
        return self.put(t, dtype)


BACKENDS = ["numpy", "array_api_strict"]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Any:
    """Run the test with minilora's backend set to NumPy, then to array_api_strict arrays on the
    non-default 'device1' (the CPU stand-in for CuPy: they refuse conversion to host NumPy)."""
    if request.param == "numpy":
        with ml.use_backend("numpy") as be:
            yield BackendCase("numpy", be.xp, None)
    else:
        xps = require("array_api_strict")
        device = xps.Device("device1")
        with ml.use_backend(xps, device=device) as be:
            yield BackendCase("array_api_strict", be.xp, device)


class FakeTerminal:
    """A stream that claims to be a terminal (or not) and records what is written to it, for
    testing progress lines."""

    def __init__(self, tty: bool) -> None:
        self.tty, self.text = tty, ""

    def isatty(self) -> bool:
        return self.tty

    def write(self, s: str) -> None:
        self.text += s

    def flush(self) -> None:
        pass


_skipped: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped:
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """In CI nothing may skip: a skipped comparison would hide a missing framework."""
    if STRICT and _skipped and session.exitstatus == 0:
        session.exitstatus = 1
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(
                f"CI: {len(_skipped)} test(s) skipped, which CI treats as failure: {_skipped[:5]}", red=True
            )
