"""Comparing an implementation's answer with the oracle's under elementwise bounds, and saying
in words where it is off: the worst element, its index, the values, the error and the bound."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from minilora.errors import MiniLoraValueError
from minilora.testing.tolerance import dot_bound, dtype_name

__all__ = ["Comparison", "compare", "assert_lora_close", "ToleranceError", "detection_threshold"]


class ToleranceError(AssertionError):
    """``assert_lora_close`` found an element beyond its bound (an ``AssertionError``, so test
    runners report it as a failure)."""


@dataclass
class Comparison:
    """The outcome of comparing ``actual`` with ``expected`` under an elementwise ``bound``.

    ``index`` is the worst element (largest error / bound); ``ratio`` its error / bound
    (> 1 fails; 0/0 counts as 0, anything / 0 as infinite); ``failed`` counts elements over.
    """

    name: str
    passed: bool
    shape: tuple[int, ...]
    index: tuple[int, ...] | None = None
    actual: float = 0.0
    expected: float = 0.0
    error: float = 0.0
    bound: float = 0.0
    ratio: float = 0.0
    failed: int = 0
    problem: str | None = None  # a shape mismatch or a non-array, instead of numbers

    def element(self) -> str:
        if self.index is None:
            return self.name
        return f"{self.name}[{', '.join(str(i) for i in self.index)}]" if self.index else self.name

    def describe(self, dtype: str | None = None) -> str:
        """One sentence a person can act on."""
        if self.problem is not None:
            return f"{self.name}: {self.problem}"
        where = "" if dtype is None else f" in {dtype}"
        size = int(np.prod(self.shape)) if self.shape else 1
        if self.passed:
            return (
                f"{self.name}: all {size} elements within the bound{where}; worst {self.element()}: "
                f"error {self.error:.3g} <= bound {self.bound:.3g} ({self.ratio:.2g} of it)"
            )
        times = "infinitely" if math.isinf(self.ratio) else f"{self.ratio:.3g}x"
        return (
            f"{self.name}: {self.failed} of {size} elements exceed the bound{where}; worst element "
            f"{self.element()}: got {self.actual!r}, expected {self.expected!r}, error {self.error:.3g} "
            f"> bound {self.bound:.3g} ({times} the bound)"
        )


def compare(actual: Any, expected: Any, bound: Any, *, name: str = "y") -> Comparison:
    """Compare elementwise: passes when |actual - expected| <= bound everywhere (NaN only
    matches NaN, an infinity only the same infinity)."""
    try:
        a = np.asarray(actual, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        return Comparison(name, False, (), problem=f"not a float array ({type(actual).__name__}: {exc})")
    e = np.asarray(expected, dtype=np.float64)
    if a.shape != e.shape:
        return Comparison(name, False, e.shape, problem=f"has shape {a.shape}; expected {e.shape}")
    try:
        t = np.broadcast_to(np.asarray(bound, dtype=np.float64), e.shape)
    except (TypeError, ValueError):
        return Comparison(name, False, e.shape, problem=f"its bound has shape {np.shape(bound)}, which does not "
                                                        f"broadcast to the expected shape {e.shape}")
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        same = (a == e) | (np.isnan(a) & np.isnan(e))
        err = np.where(same, 0.0, np.abs(a - e))
        err = np.where(np.isnan(err), np.inf, err)
        ratio = np.where(err == 0, 0.0, np.where(t > 0, err / t, np.inf))
    if e.size == 0:
        return Comparison(name, True, e.shape)
    flat = int(np.argmax(ratio))
    idx = np.unravel_index(flat, e.shape) if e.shape else ()
    worst = float(ratio.reshape(-1)[flat])
    return Comparison(
        name, bool(worst <= 1.0), e.shape, tuple(int(i) for i in idx),
        float(a.reshape(-1)[flat]), float(e.reshape(-1)[flat]),
        float(err.reshape(-1)[flat]), float(t.reshape(-1)[flat]), worst, int(np.sum(ratio > 1.0)),
    )


def assert_lora_close(
    actual: Any,
    expected: Any,
    *,
    bound: Any = None,
    dtype: Any = None,
    k: int | None = None,
    magnitude: Any = None,
    name: str = "y",
    reference: Any = "float64",
) -> Comparison:
    """Assert ``actual`` is within its floating-point bound of ``expected`` (the oracle's).

    Give either ``bound`` (e.g. from ``lora_bounds``) or ``dtype``, ``k`` and ``magnitude``
    (then the bound is ``dot_bound(k, magnitude, dtype)`` plus the reference's own). Raises
    ``ToleranceError`` (an AssertionError) naming the worst element, its index, the values,
    the error and the bound; returns the ``Comparison`` when everything is within.
    """
    if bound is None:
        if dtype is None or k is None or magnitude is None:
            raise MiniLoraValueError("assert_lora_close needs bound=, or dtype=, k= and magnitude=")
        bound = dot_bound(k, magnitude, dtype)
        if reference is not None:
            bound = bound + dot_bound(k, magnitude, reference)
    result = compare(actual, expected, bound, name=name)
    if not result.passed:
        what = "" if dtype is None else f" (dtype {dtype_name(dtype)})"
        raise ToleranceError(
            result.describe() + f"{what}. The bound is the floating-point error an honest "
            "implementation may make (minilora.testing.lora_bounds); a larger error means a "
            "different formula, not rounding."
        )
    return result


def detection_threshold(expected: Any, bound: Any) -> float:
    """The smallest relative error (1 + t) everywhere that this comparison rejects:
    min_i bound_i / |expected_i| over the nonzero expected elements (inf when all are 0)."""
    e = np.abs(np.asarray(expected, dtype=np.float64))
    t = np.broadcast_to(np.asarray(bound, dtype=np.float64), e.shape)
    nz = e > 0
    if not np.any(nz):
        return math.inf
    return float(np.min(t[nz] / e[nz]))
