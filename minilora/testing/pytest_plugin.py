"""Run minilora's conformance suite inside your own pytest run.

Opt-in, two ways:

1. Subclass ``ConformanceTests`` in one of your test files and name your adapter::

       from minilora.testing.pytest_plugin import ConformanceTests

       class TestMyLora(ConformanceTests):
           target = "mypackage.lora_adapter:MyAdapter"   # or the class itself, or "torch"
           max_examples = 10                              # hypothesis cases per dtype
           seed = 0

   Each (property, dtype) your adapter supports becomes one test, e.g.
   ``test_conformance[grad_A-float32]``; a failure names the worst element and its bound.

2. Without writing a test file: load this plugin and collect the ready-made suite module::

       pytest -p minilora.testing.pytest_plugin --minilora-target mypackage:MyAdapter \\
              --pyargs minilora.testing.suite

The options ``--minilora-target``, ``--minilora-max-examples`` and ``--minilora-seed`` exist
once the plugin is loaded (``-p minilora.testing.pytest_plugin`` or
``pytest_plugins = ["minilora.testing.pytest_plugin"]`` in your root conftest.py); a class's
own attributes take precedence over them. Nothing here runs unless you ask for it.
"""

from __future__ import annotations

from typing import Any

import pytest

from minilora.testing.adapters import FrameworkUnavailableError, load_adapter
from minilora.testing.conformance import CheckReport, check, planned

__all__ = ["ConformanceTests", "pytest_addoption"]

DEFAULT_MAX_EXAMPLES = 10

# one run of the suite per (target, dtype, examples, seed) in a session, shared by its tests
_reports: dict[tuple, CheckReport] = {}
_adapters: dict[Any, Any] = {}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("minilora", "minilora conformance suite")
    group.addoption("--minilora-target", default=None,
                    help="adapter to check: torch, peft, loralib or module:Class")
    group.addoption("--minilora-max-examples", type=int, default=None,
                    help=f"hypothesis cases per dtype (default {DEFAULT_MAX_EXAMPLES})")
    group.addoption("--minilora-seed", type=int, default=None, help="seed of the hypothesis cases (default 0)")


def _adapter(target: Any) -> Any:
    key = target if isinstance(target, str | type) else id(target)
    if key not in _adapters:
        _adapters[key] = load_adapter(target)
    return _adapters[key]


class ConformanceTests:
    """Base class: set ``target`` (and optionally ``max_examples``, ``seed``, ``dtypes``,
    ``properties``) in a subclass whose name starts with ``Test``."""

    target: Any = None
    max_examples: int | None = None
    seed: int | None = None
    dtypes: Any = None
    properties: Any = None

    def _settings(self, config: pytest.Config) -> tuple[Any, int, int]:
        target = self.target if self.target is not None else config.getoption("minilora_target", None)
        examples = self.max_examples
        if examples is None:
            examples = config.getoption("minilora_max_examples", None)
        seed = self.seed if self.seed is not None else config.getoption("minilora_seed", None)
        return target, DEFAULT_MAX_EXAMPLES if examples is None else examples, 0 if seed is None else seed

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        if "minilora_check" not in metafunc.fixturenames:
            return
        target, _, _ = self._settings(metafunc.config)
        if target is None:
            raise pytest.UsageError(
                f"{type(self).__name__}: no adapter to check; set `target = 'module:Class'` on the class "
                "or pass --minilora-target (with -p minilora.testing.pytest_plugin)"
            )
        try:
            adapter = _adapter(target)
        except FrameworkUnavailableError as exc:  # skipped, with the reason (pip install ...)
            metafunc.parametrize("minilora_check", [pytest.param(None, marks=pytest.mark.skip(reason=str(exc)))])
            return
        pairs = planned(adapter, self.dtypes, self.properties)
        metafunc.parametrize("minilora_check", pairs, ids=[f"{p}-{d}" for p, d in pairs])

    def test_conformance(self, minilora_check: tuple[str, str], pytestconfig: pytest.Config) -> None:
        prop, dtype = minilora_check
        target, examples, seed = self._settings(pytestconfig)
        adapter = _adapter(target)
        props = None if self.properties is None else tuple(self.properties)
        key = (target if isinstance(target, str | type) else id(target), dtype, examples, seed, props)
        if key not in _reports:
            _reports[key] = check(adapter, dtypes=[dtype], properties=self.properties, max_examples=examples,
                                  seed=seed)
        result = _reports[key].result(prop, dtype)
        if not result.passed:
            pytest.fail(result.message(), pytrace=False)
