"""The report of ``minilora check`` (``minilora.testing.conformance.check``): one row per
(property, dtype) with its worst element, its detection threshold, the verdict, every case's
result, and the JSON and table forms.

Verdicts: ``pass`` (every case within its bound), ``FAIL`` (a case beyond its bound, an output
of the wrong shape or kind, or a method that raised on some case), ``ERROR`` (the method raised
on every case: nothing was compared), ``not covered`` (every case needs an option the adapter
declares it lacks: nothing was checked, so nothing passed), ``n/a`` (the adapter has no such
method, e.g. no merge). Only FAIL and ERROR fail a check; a row that is neither pass nor those
is listed as what it is, never as a pass.

The detection threshold of a case is the smallest relative error it would have rejected: an
answer off by a factor (1 + t) everywhere fails when t > min_i bound_i / |expected_i|. A row's
threshold is the smallest over its cases, so a pass says what it could have seen.
"""

from __future__ import annotations

import builtins
import math
from dataclasses import dataclass, field
from typing import Any

from minilora.testing.compare import Comparison

VERDICTS = ("pass", "FAIL", "ERROR", "not covered", "n/a")


@dataclass
class PropertyResult:
    """One (property, dtype) row of the report: the worst element over all its cases."""

    property: str
    dtype: str
    cases: int = 0
    failed_cases: int = 0
    worst: Comparison | None = None
    worst_case: str = ""
    error: str | None = None  # the first case where the adapter raised or returned something unusable
    raised: int = 0  # cases where the method raised
    not_covered: int = 0  # cases that need an option the adapter lacks
    missing: list[str] = field(default_factory=list)  # those options
    na: str | None = None  # why the property does not apply (no such method)
    threshold: float = math.inf  # the smallest relative error any case would have rejected
    probable: int = 0  # cases judged by the probabilistic bound (no worst-case bound exists there)
    hint: str | None = None  # a likely cause of the failures (a precision declared wider than used)
    _hint_ruled_out: bool = field(default=False, repr=False)
    case_results: list[dict] = field(default_factory=list)

    @builtins.property  # (the field `property` shadows the builtin for type checkers)
    def passed(self) -> bool:
        return self.verdict == "pass"

    @builtins.property
    def failed(self) -> bool:
        return self.verdict in ("FAIL", "ERROR")

    @builtins.property
    def verdict(self) -> str:
        if self.na is not None:
            return "n/a"
        if self.cases and self.raised == self.cases:
            return "ERROR"
        if self.failed_cases:
            return "FAIL"
        if self.cases == 0:
            return "not covered" if self.not_covered else "ERROR"
        return "pass"

    def add(self, comparison: Comparison, case: str, threshold: float = math.inf) -> None:
        self.cases += 1
        if not comparison.passed:
            self.failed_cases += 1
        if self.worst is None or severity(comparison) > severity(self.worst):
            self.worst, self.worst_case = comparison, case
        self.threshold = min(self.threshold, threshold)
        entry: dict[str, Any] = {"case": case, "passed": comparison.passed, "output": comparison.name,
                                 "ratio": _num(comparison.ratio), "threshold": _num(threshold)}
        if comparison.problem is not None:
            entry["problem"] = comparison.problem
        elif not comparison.passed:
            entry["message"] = comparison.describe(self.dtype)
        self.case_results.append(entry)

    def precision_evidence(self, evidence: str | bool | None) -> None:
        """What one failed case says about the precision hint: its text when the case's error fits
        the storage dtype's own bounds, False when it does not, None when that cannot be told. The
        hint stands only while every failed case that can tell fits."""
        if evidence is False:
            self._hint_ruled_out, self.hint = True, None
        elif isinstance(evidence, str) and not self._hint_ruled_out and self.hint is None:
            self.hint = evidence

    def fail(self, case: str, message: str, *, raised: bool = False) -> None:
        """A case the adapter could not answer: it raised, or returned something unusable."""
        self.cases += 1
        self.failed_cases += 1
        self.raised += int(raised)
        if self.error is None:
            self.error = f"{case}: {message}"
        self.case_results.append({"case": case, "passed": False, "message": message})

    def skip(self, case: str, missing: list[str]) -> None:
        """A case that needs options the adapter lacks: not covered, neither passed nor failed."""
        self.not_covered += 1
        for m in missing:
            if m not in self.missing:
                self.missing.append(m)
        self.case_results.append({"case": case, "passed": None, "not_covered": missing})

    def message(self) -> str:
        """What went wrong, in words (empty when it passed)."""
        head = f"{self.verdict} {self.property} ({self.dtype})"
        if self.verdict == "pass":
            return ""
        if self.verdict == "n/a":
            return f"{head}: {self.na}"
        if self.verdict == "not covered":
            return f"{head}: all {self.not_covered} cases need {', '.join(self.missing)}, which the adapter lacks"
        if self.cases == 0:
            return f"{head}: no case ran"
        w = self.worst
        if w is not None and not w.passed:
            text = (f"{head}: {self.failed_cases} of {self.cases} cases fail. Worst case "
                    f"[{self.worst_case}]: {w.describe(self.dtype)}")
            if self.error is not None:
                text += f"; also {self.error}"
            if self.hint is not None:
                text += f". Hint: {self.hint}"
            return text
        return f"{head}: {self.failed_cases} of {self.cases} cases fail: {self.error}"

    def to_dict(self) -> dict:
        w = self.worst
        out: dict[str, Any] = {
            "property": self.property, "dtype": self.dtype, "cases": self.cases,
            "failed_cases": self.failed_cases, "not_covered": self.not_covered, "passed": self.passed,
            "verdict": self.verdict, "error": self.error, "detection_threshold": _num(self.threshold),
            "probabilistic_bound_cases": self.probable,
        }
        if self.hint is not None:
            out["hint"] = self.hint
        if self.missing:
            out["missing_options"] = list(self.missing)
        if self.na is not None:
            out["na"] = self.na
        if w is not None:
            out.update(
                worst_case=self.worst_case, worst_output=w.name, worst_index=list(w.index or ()),
                worst_actual=_num(w.actual), worst_expected=_num(w.expected), worst_error=_num(w.error),
                bound=_num(w.bound), ratio=_num(w.ratio), problem=w.problem,
            )
        if self.verdict != "pass":
            out["message"] = self.message()
        out["case_results"] = list(self.case_results)
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
    declared: dict = field(default_factory=dict)  # what the adapter declared: dtypes, features, precision

    @builtins.property  # (the field `property` shadows the builtin for type checkers)
    def passed(self) -> bool:
        """No row failed and at least one passed (not covered and n/a rows are no failure)."""
        return any(r.passed for r in self.results) and not any(r.failed for r in self.results)

    def result(self, prop: str, dtype: str) -> PropertyResult:
        for r in self.results:
            if (r.property, r.dtype) == (prop, dtype):
                return r
        raise KeyError((prop, dtype))

    def table(self) -> str:
        rows = [("property", "dtype", "cases", "worst error / bound", "detects", "verdict")]
        for r in self.results:
            if r.worst is not None and r.worst.problem is None:
                w = r.worst
                ratio = "inf" if math.isinf(w.ratio) else f"{w.ratio:.2g}"
                cell = f"{w.error:.3g} / {w.bound:.3g} ({ratio})"
            else:
                cell = "-"
            detects = f">{r.threshold:.2g}" if math.isfinite(r.threshold) else "-"
            verdict = r.verdict
            if r.not_covered and r.verdict != "not covered":
                verdict += f" ({r.not_covered} not covered: {', '.join(r.missing)})"
            if r.probable:
                verdict += f" ({r.probable} on the probabilistic bound)"
            rows.append((r.property, r.dtype, str(r.cases), cell, detects, verdict))
        widths = [max(len(row[i]) for row in rows) for i in range(6)]
        lines = []
        for row in rows:
            cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1]), row[2].rjust(widths[2]),
                     row[3].ljust(widths[3]), row[4].ljust(widths[4]), row[5]]
            lines.append("  " + "  ".join(cells).rstrip())
        return "\n".join(lines)

    def failures(self) -> list[str]:
        return [r.message() for r in self.results if r.failed]

    def notes(self) -> list[str]:
        """The rows that are neither passed nor failed (not covered, n/a), in words."""
        return [r.message() for r in self.results if not r.passed and not r.failed]

    def verbose(self) -> str:
        """Every case of every row, one line each."""
        lines = []
        for r in self.results:
            lines.append(f"{r.property} ({r.dtype}): {r.verdict}")
            for c in r.case_results:
                if c.get("passed") is None:
                    state = f"not covered (needs {', '.join(c['not_covered'])})"
                elif c["passed"]:
                    state = f"pass  error/bound {c['ratio'] if isinstance(c['ratio'], str) else format(c['ratio'], '.2g')}"
                else:
                    state = "FAIL  " + str(c.get("problem") or c.get("message", ""))
                lines.append(f"    {state}  [{c['case']}]")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "target": self.target, "passed": self.passed, "versions": self.versions, "seed": self.seed,
            "max_examples": self.max_examples, "seconds": round(self.seconds, 3), "declared": self.declared,
            "results": [r.to_dict() for r in self.results],
        }
