"""Self-test of ``minilora check`` (tests/testing/planted.py): every planted bug fails every row
where it shows, in every dtype where it is larger than the rounding, and the honest adapters,
written differently, pass. Short here (CI); benchmarks/planted_bugs.py runs 10 seeds and 200
honest cases and docs/tolerance.md has its numbers."""

from __future__ import annotations

import re

import planted
import pytest
from helpers import require

from minilora.testing.conformance import check


@pytest.mark.compare
@pytest.mark.slow
@pytest.mark.parametrize("bug", list(planted.BUGS), ids=[b.__name__ for b in planted.BUGS])
def test_every_planted_bug_fails_everywhere_it_shows(bug: type) -> None:
    require("torch")
    props = planted.BUGS[bug]
    report = check(bug, max_examples=3, seed=7, properties=sorted(props))
    only = planted.ONLY_IN.get(bug)
    rows = [r for r in report.results if only is None or r.dtype in only]
    assert rows and {r.property for r in rows} == props
    missed = [(r.property, r.dtype) for r in rows if not r.failed]
    assert not missed, missed


@pytest.mark.compare
def test_the_bugs_hidden_off_square_layers_pass_there() -> None:
    """SwappedAB, FanInFanOutIgnored and MergeWithoutTranspose are right on non-square layers:
    only the square edge cases find them, so they find them at every seed."""
    require("torch")
    for bug, prop in ((planted.SwappedAB, "forward"), (planted.FanInFanOutIgnored, "forward"),
                      (planted.MergeWithoutTranspose, "merge")):
        row = check(bug, max_examples=0, dtypes=["float64"], properties=[prop]).result(prop, "float64")
        failed = [c["case"] for c in row.case_results if not c["passed"]]
        sizes = [re.search(r"d_in (\d+), d_out (\d+)", c).groups() for c in failed]  # type: ignore[union-attr]
        assert failed and all(a == b for a, b in sizes), (bug.__name__, failed)


@pytest.mark.compare
@pytest.mark.slow
@pytest.mark.parametrize("adapter", list(planted.HONEST), ids=[a.__name__ for a in planted.HONEST])
def test_honest_adapters_pass(adapter: type) -> None:
    require("torch")
    report = check(adapter, max_examples=10, seed=3)
    assert report.passed, report.failures()
