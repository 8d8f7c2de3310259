"""The report of ``minilora check`` (``minilora.testing.conformance.check``): one row per
(property, dtype) with its worst element, the verdict, and the JSON and table forms.
"""

from __future__ import annotations

import builtins
import math
from dataclasses import dataclass, field
from typing import Any

from minilora.testing.compare import Comparison


@dataclass
class PropertyResult:
    """One (property, dtype) row of the report: the worst element over all its cases."""

    property: str
    dtype: str
    cases: int = 0
    failed_cases: int = 0
    worst: Comparison | None = None
    worst_case: str = ""
    error: str | None = None  # the adapter raised, or returned something unusable

    @builtins.property  # (the field `property` shadows the builtin for type checkers)
    def passed(self) -> bool:
        return self.error is None and self.failed_cases == 0 and self.cases > 0

    @builtins.property
    def verdict(self) -> str:
        return "pass" if self.passed else ("ERROR" if self.error is not None else "FAIL")

    def add(self, comparison: Comparison, case: str) -> None:
        self.cases += 1
        if not comparison.passed:
            self.failed_cases += 1
        if self.worst is None or severity(comparison) > severity(self.worst):
            self.worst, self.worst_case = comparison, case

    def fail(self, case: str, message: str) -> None:
        self.cases += 1
        self.failed_cases += 1
        if self.error is None:
            self.error = f"{case}: {message}"

    def message(self) -> str:
        """What went wrong, in words (empty when it passed)."""
        if self.passed:
            return ""
        head = f"{self.verdict} {self.property} ({self.dtype})"
        if self.error is not None:
            return f"{head}: {self.error}"
        w = self.worst
        assert w is not None
        return (f"{head}: {self.failed_cases} of {self.cases} cases exceed the bound. Worst case "
                f"[{self.worst_case}]: {w.describe(self.dtype)}")

    def to_dict(self) -> dict:
        w = self.worst
        out: dict[str, Any] = {
            "property": self.property, "dtype": self.dtype, "cases": self.cases,
            "failed_cases": self.failed_cases, "passed": self.passed, "verdict": self.verdict,
            "error": self.error,
        }
        if w is not None:
            out.update(
                worst_case=self.worst_case, worst_output=w.name, worst_index=list(w.index or ()),
                worst_actual=_num(w.actual), worst_expected=_num(w.expected), worst_error=_num(w.error),
                bound=_num(w.bound), ratio=_num(w.ratio), problem=w.problem,
            )
        if not self.passed:
            out["message"] = self.message()
        return out


def severity(c: Comparison) -> float:
    """How bad a comparison is, for picking the worst: an unusable output (a problem) beats any ratio."""
    return math.inf if c.problem is not None else c.ratio


def _num(v: float) -> float | str:
    """JSON has no inf or NaN: write them as strings."""
    return v if math.isfinite(v) else str(v)


@dataclass
class CheckReport:
    target: str
    versions: dict
    seed: int
    max_examples: int
    results: list[PropertyResult] = field(default_factory=list)
    seconds: float = 0.0

    @builtins.property  # (the field `property` shadows the builtin for type checkers)
    def passed(self) -> bool:
        return bool(self.results) and all(r.passed for r in self.results)

    def result(self, prop: str, dtype: str) -> PropertyResult:
        for r in self.results:
            if (r.property, r.dtype) == (prop, dtype):
                return r
        raise KeyError((prop, dtype))

    def table(self) -> str:
        rows = [("property", "dtype", "cases", "worst error / bound", "verdict")]
        for r in self.results:
            if r.worst is not None and r.worst.problem is None:
                w = r.worst
                ratio = "inf" if math.isinf(w.ratio) else f"{w.ratio:.2g}"
                cell = f"{w.error:.3g} / {w.bound:.3g} ({ratio})"
            else:
                cell = "-"
            rows.append((r.property, r.dtype, str(r.cases), cell, r.verdict))
        widths = [max(len(row[i]) for row in rows) for i in range(5)]
        lines = []
        for row in rows:
            cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1]), row[2].rjust(widths[2]),
                     row[3].ljust(widths[3]), row[4]]
            lines.append("  " + "  ".join(cells).rstrip())
        return "\n".join(lines)

    def failures(self) -> list[str]:
        return [r.message() for r in self.results if not r.passed]

    def to_dict(self) -> dict:
        return {
            "target": self.target, "passed": self.passed, "versions": self.versions, "seed": self.seed,
            "max_examples": self.max_examples, "seconds": round(self.seconds, 3),
            "results": [r.to_dict() for r in self.results],
        }
