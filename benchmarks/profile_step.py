"""Where a LoRA training step spends its time: every array operation of the step, timed in place.

minilora's step on NumPy is a fixed sequence of array operations: the forward of
``ops.lora_linear``, the loss's forward and VJP, the VJP of the LoRA linear, the Adam update.
This script runs that sequence as it is written in ``minilora/ops.py`` and ``optim.py``, with a
clock read around each operation, so each one is timed where it runs in the step (after the
operation before it, with the caches as the step leaves them; timed alone, an operation finds
its operands in cache and looks cheaper). Each operation is marked

    floor   one of the matrix products the step cannot avoid (bench_step.py's floor)
    extra   what minilora does beyond them: the scale, the add, the loss's elementwise passes,
            the Adam update

In the same loop it times the real step (``value_and_grad`` through ``lora_dense`` and the
loss, then ``adam_step``) and the floor as bench_step.py does; the real step minus the sum of
the timed operations is autograd's tracing, the input checks and the Python between the
operations. Before timing, it checks that the instrumented sequence gives bit for bit the A and
B of the real step, so the profile is of minilora's arithmetic and nothing else.

``--scipy-gemm`` also times the forward with the add done inside BLAS (scipy's gemm with
beta = 1, no (n, d_out) temporary), alone and alternating with NumPy's matmul as it would in a
step. Usage:

    python benchmarks/profile_step.py [--shapes 256x1024x1024x8 ...] [--dtypes float64 float32]
        [--losses mse l1] [--seconds 4] [--scipy-gemm] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_step import floor_step, make_case, minilora_step, parse_shapes  # noqa: E402

import minilora as ml  # noqa: E402
from minilora import losses  # noqa: E402
from minilora.optim import adam_apply, adam_options  # noqa: E402

SHAPES = [(256, 1024, 1024, 8), (2048, 1024, 1024, 8)]
RUN = 3  # timed calls in a row of one contender, after one untimed call


class Clock:
    """Records the time of each named operation of one instrumented step."""

    def __init__(self) -> None:
        self.times: dict = {}
        self.kinds: dict = {}

    def __call__(self, name: str, kind: str, fn: Any) -> Any:
        t = time.perf_counter()
        out = fn()
        self.times.setdefault(name, []).append(time.perf_counter() - t)
        self.kinds[name] = kind
        return out


def instrumented_step(c: dict, loss: str, clock: Clock) -> tuple[Any, dict]:
    """minilora's NumPy step, operation by operation, as ``ops.lora_linear`` (forward and VJP for
    A and B, no bias, no mask; the VJP forms h = s (x A^T) again, nothing is kept from the
    forward), ``losses.mse_loss_op``/``l1_loss_op`` (mean; the forward reduces d in blocks of
    ``losses.BLOCK``, the VJP forms d again) and ``optim.adam_apply`` compute it."""
    W, x, t, s = c["W"], c["x"], c["y"], c["scale"]
    box = {"lora": {"A": c["A"].copy(), "B": c["B"].copy()}}
    box["state"], opts = ml.adam_init(box["lora"]), adam_options(lr=1e-4)
    one = np.asarray(1.0, dtype=x.dtype)
    N = t.size

    def step() -> None:
        A, B = box["lora"]["A"], box["lora"]["B"]
        h = clock("x A^T", "floor", lambda: x @ A.T)
        h = clock("h * s (in place)", "extra", lambda: np.multiply(h, s, out=h))
        y = clock("x W^T", "floor", lambda: x @ W.T)
        z = clock("h B^T", "floor", lambda: h @ B.T)
        y = clock("y + h B^T (in place)", "extra", lambda: np.add(y, z, out=y))
        clock("loss: blocked sum of |d| or d * d" if N > losses.BLOCK else "loss: sum of |d| or d * d", "extra",
              lambda: losses._reduce(y, t, square=loss == "mse") / N)
        g = one  # the loss's cotangent, as autograd seeds it
        c_ = (2.0 / N) * g if loss == "mse" else g / N
        G = clock("G = (y - t) * c" if loss == "mse" else "G = sign(y - t) * c", "extra",
                  lambda: losses._scaled_d(y, t, c_, sign=loss == "l1"))
        gB = clock("G B", "floor", lambda: G @ B)
        gB = clock("(G B) * s", "extra", lambda: gB * s)
        dA = clock("(G B)^T x", "floor", lambda: gB.T @ x)
        h2 = clock("h = (x A^T) * s again (the VJP's)", "extra", lambda: (x @ A.T) * s)
        dB = clock("G^T h", "floor", lambda: G.T @ h2)
        box["lora"], box["state"] = clock("Adam on A and B", "extra",
                                          lambda: adam_apply(box["lora"], {"A": dA, "B": dB}, box["state"], opts))

    return step, box


def check_same_arithmetic(c: dict, loss: str) -> None:
    """The instrumented step and the real one give identical A and B after two steps."""
    real = minilora_step(c, loss)
    mine, box = instrumented_step(c, loss, Clock())
    for _ in range(2):
        real()
        mine()
    for k in ("A", "B"):
        if not np.array_equal(real.box["lora"][k], box["lora"][k]):  # type: ignore[attr-defined]
            raise SystemExit(f"profile_step: the instrumented step's {k} differs from minilora's step; "
                             "update instrumented_step to follow minilora/ops.py")


def profile(shape: tuple, dtype: str, loss: str, seconds: float) -> dict:
    c = make_case(*shape, dtype)
    check_same_arithmetic(c, loss)
    clock = Clock()
    fns = {"step": minilora_step(c, loss), "floor": floor_step(c), "instrumented": instrumented_step(c, loss, clock)[0]}
    for fn in fns.values():  # warm up
        fn()
    t0 = time.perf_counter()
    for fn in fns.values():
        fn()
    rounds = max(5, int(seconds / max((RUN + 1) * (time.perf_counter() - t0), 1e-9)))
    clock.times.clear()
    times: dict = {k: [] for k in fns}
    for _ in range(rounds):  # turns: one untimed call, then RUN timed calls (and clock readings)
        for k, fn in fns.items():
            fn()
            for _ in range(RUN):
                t = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t)
    ops_ms = [{"name": name, "kind": clock.kinds[name], "ms": 1e3 * statistics.median(v)}
              for name, v in clock.times.items()]
    return {"shape": list(shape), "dtype": dtype, "loss": loss, "ops": ops_ms,
            **{f"{k}_ms": 1e3 * statistics.median(v) for k, v in times.items()}}


def print_profile(rec: dict) -> None:
    floor = rec["floor_ms"]
    print(f"({', '.join(map(str, rec['shape']))}) {rec['dtype']} {rec['loss']}: step {rec['step_ms']:.3f} ms, "
          f"floor {floor:.3f} ms, ratio {rec['step_ms'] / floor:.3f}")
    print(f"  {'operation':<34} {'kind':<6} {'ms':>8} {'% of floor':>11}")
    for op in rec["ops"]:
        print(f"  {op['name']:<34} {op['kind']:<6} {op['ms']:8.3f} {100 * op['ms'] / floor:10.1f}%")
    total = {kind: sum(o["ms"] for o in rec["ops"] if o["kind"] == kind) for kind in ("floor", "extra")}
    rest = rec["step_ms"] - total["floor"] - total["extra"]
    for name, ms in (("sum of floor operations", total["floor"]), ("sum of extra operations", total["extra"]),
                     ("autograd, checks, Python (the rest)", rest)):
        print(f"  {name:<41} {ms:8.3f} {100 * ms / floor:10.1f}%")


def scipy_gemm(shape: tuple, dtype: str, seconds: float) -> dict:
    """The forward's y = x W^T + h B^T: NumPy (matmul, then add the temporary h B^T) against
    scipy's BLAS (gemm, then gemm with beta = 1 into y: no temporary), each alone, and the two
    alternating as they would in a step whose other products stay on NumPy."""
    from scipy.linalg import blas

    c = make_case(*shape, dtype)
    W, A, B, x = c["W"], c["A"], c["B"], c["x"]
    gemm = blas.dgemm if dtype == "float64" else blas.sgemm
    h = x @ A.T

    def numpy_forward() -> Any:
        y = x @ W.T
        y += h @ B.T
        return y

    def scipy_forward() -> Any:
        # y is C-ordered (n, d_out), i.e. Fortran-ordered y^T = W x^T (+ B h^T)
        yt = gemm(1.0, W.T, x.T, trans_a=1)
        return gemm(1.0, B.T, h.T, beta=1.0, c=yt, trans_a=1, overwrite_c=1).T

    np.testing.assert_allclose(scipy_forward(), numpy_forward(), rtol=1e-4 if dtype == "float32" else 1e-10)

    def medians(fns: dict, budget: float) -> dict:
        times: dict = {k: [] for k in fns}
        t_end = time.perf_counter() + budget
        while time.perf_counter() < t_end or min(len(v) for v in times.values()) < 5:
            for k, fn in fns.items():
                t = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t)
        return {k: 1e3 * statistics.median(v) for k, v in times.items()}

    out = {"numpy alone": medians({"n": numpy_forward}, seconds / 3)["n"]}
    time.sleep(0.3)
    out["scipy alone"] = medians({"s": scipy_forward}, seconds / 3)["s"]
    time.sleep(0.3)
    pair = medians({"n": numpy_forward, "s": scipy_forward}, seconds / 3)
    out["numpy then scipy, alternating (sum of the two)"] = pair["n"] + pair["s"]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", metavar="NxDINxDOUTxR", help="default: 256x1024x1024x8 2048x1024x1024x8")
    p.add_argument("--dtypes", nargs="+", choices=("float64", "float32"), default=["float64", "float32"])
    p.add_argument("--losses", nargs="+", choices=("mse", "l1"), default=["mse", "l1"])
    p.add_argument("--seconds", type=float, default=4.0, help="time per case (default 4)")
    p.add_argument("--scipy-gemm", action="store_true", help="also time the forward through scipy's gemm")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    shapes = SHAPES
    if args.shapes:
        shapes = parse_shapes(p, args.shapes)
    if not args.seconds > 0:
        p.error(f"--seconds must be > 0; got {args.seconds}")
    records, gemm = [], []
    for shape in shapes:
        for dtype in args.dtypes:
            for loss in args.losses:
                records.append(profile(shape, dtype, loss, args.seconds))
                print_profile(records[-1])
                time.sleep(0.3)
            if args.scipy_gemm:
                gemm.append({"shape": list(shape), "dtype": dtype, "ms": scipy_gemm(shape, dtype, args.seconds)})
                print(f"forward y = x W^T + h B^T, ({', '.join(map(str, shape))}) {dtype}:")
                for name, ms in gemm[-1]["ms"].items():
                    print(f"  {name:<48} {ms:9.3f} ms")
    if args.json:
        from minilora.formats.fileio import atomic_open

        with atomic_open(args.json, "w") as fh:
            json.dump({"profiles": records, "scipy_gemm": gemm}, fh, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
