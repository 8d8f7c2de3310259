"""Shared fixtures: the two backends every backend-sensitive test runs on, hypothesis profiles,
and the rule that in CI a comparison test may not skip."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from helpers import CURRENT_TEST, STRICT, require
from hypothesis import HealthCheck, settings

import minilora as ml

settings.register_profile(
    "ci", derandomize=True, max_examples=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if STRICT else "dev"))


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


# Fixtures that hand a test a framework of the `compare` extra: a test using one is a `compare`
# test whether or not it says so (module-scoped fixtures run before ``require`` can see the test).
COMPARE_FIXTURES = frozenset({"torch", "bnb", "peft", "loralib", "torch_and_peft"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if COMPARE_FIXTURES & set(getattr(item, "fixturenames", ())) and item.get_closest_marker("compare") is None:
            item.add_marker(pytest.mark.compare)


@pytest.fixture(autouse=True)
def _running_test(request: pytest.FixtureRequest) -> Any:
    """Let ``helpers.require`` see the running test's marks (a `compare` framework needs one)."""
    CURRENT_TEST.append(request.node)
    yield
    CURRENT_TEST.pop()


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
