"""The init property of ``minilora check``: a fresh adapter has B = 0 exactly and A drawn as
``minilora.lora_init`` draws it (range, sample mean and std over two shapes).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from minilora.errors import one_line
from minilora.testing.compare import Comparison, compare
from minilora.testing.report import PropertyResult, severity

__all__ = ["INIT_DTYPE", "INIT_SHAPES", "INIT_STD_TOLERANCE", "init_checks", "run_init"]

INIT_DTYPE = "float32"
# init: two shapes of 32768 draws each. The sample std of n draws has a relative standard error
# of sqrt((kurtosis - 1) / (4 n)): 0.0039 for a normal, 0.0025 for a uniform, so a 2.5% tolerance
# is 6.4 (normal) to 10 (uniform) standard errors (a false alarm below 1e-9), while a
# distribution 7% too wide or 10% too narrow is 18 or more standard errors off.
INIT_SHAPES = (dict(d_in=2048, d_out=8, rank=16), dict(d_in=4096, d_out=4, rank=8))
INIT_STD_TOLERANCE = 0.025


def init_checks(adapter: Any, init: str, seed: int, shape: dict) -> list[Comparison]:
    """B = 0 exactly; A of the right shape, in range (uniform inits), its sample mean and std
    near the target's."""
    d_in, d_out, r = shape["d_in"], shape["d_out"], shape["rank"]
    got = adapter.init(d_in, d_out, r, init, seed)
    if not isinstance(got, dict) or not {"A", "B"} <= set(got):
        return [Comparison("init", False, (), problem="init() must return {'A': ..., 'B': ...}")]
    A, B = np.asarray(got["A"], dtype=np.float64), np.asarray(got["B"], dtype=np.float64)
    out = [compare(B, np.zeros((d_out, r)), 0.0, name="B")]
    if A.shape != (r, d_in):
        return out + [Comparison("A", False, A.shape, problem=f"has shape {A.shape}; expected {(r, d_in)}")]
    if init in ("kaiming", "he_uniform"):
        # kaiming: U(-c, c), c = 1/sqrt(d_in) (torch's kaiming_uniform_(a=sqrt(5)));
        # he_uniform: c = sqrt(6 / d_in) (Keras, Flax)
        c = 1.0 / math.sqrt(d_in) if init == "kaiming" else math.sqrt(6.0 / d_in)
        std = c / math.sqrt(3.0)
        top = float(np.max(np.abs(A)))
        slack = c * 2.0**-20
        out.append(Comparison(f"max|A| [{init}]", top <= c + slack, (), (), top, c, max(0.0, top - c), slack,
                              max(0.0, top - c) / slack, int(top > c + slack)))
    else:  # "gaussian": N(0, 1/r^2) as PEFT; "normal": N(0, 1) as the paper
        std = 1.0 / r if init == "gaussian" else 1.0
    n = A.size
    sample_std, mean = float(A.std()), float(A.mean())
    for name, value, target, tol in (
        ("std(A)", sample_std, std, INIT_STD_TOLERANCE * std),
        ("mean(A)", mean, 0.0, 6.0 * std / math.sqrt(n)),
    ):
        err = abs(value - target)
        out.append(Comparison(f"{name} [{init}]", err <= tol, (), (), value, target, err, tol, err / tol,
                              int(err > tol)))
    return out


def run_init(adapter: Any, init: str, seed: int, shape: dict, row: PropertyResult) -> None:
    case = f"init={init!r}, A {shape['rank']}x{shape['d_in']}, seed {seed}"
    try:
        checks = init_checks(adapter, init, seed, shape)
    except Exception as exc:
        row.fail(case, f"init() raised {one_line(exc)}", raised=True)
        return
    row.add(max(checks, key=severity), case, INIT_STD_TOLERANCE)
