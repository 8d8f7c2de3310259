"""The conformance suite as a ready-made pytest module (see ``minilora.testing.pytest_plugin``):

    pytest -p minilora.testing.pytest_plugin --minilora-target mypackage:MyAdapter \\
           --pyargs minilora.testing.suite
"""

from __future__ import annotations

from minilora.testing.pytest_plugin import ConformanceTests


class TestConformance(ConformanceTests):
    """Checks the adapter named by ``--minilora-target``."""
