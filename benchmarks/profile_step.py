"""Where a LoRA training step spends its time beyond the matrix products: a cumulative profile.

Five versions of one step, each the one before plus one part of minilora's step, run
interleaved call by call (so the machine's drift hits them alike), medians over many rounds.
The difference between two neighbours is what that part costs inside the step, with the
caches as the step leaves them (a part timed alone finds its operands in cache and looks
cheaper):

    1 floor           the products alone, as in bench_step.py: x W^T, x A^T, h B^T, G B,
                      (G B)^T x, G^T h, with a given G
    2 + forward add   minilora's forward (ops.lora_linear): h = s x A^T and y = x W^T + h B^T,
                      which adds the (n, d_out) product h B^T into y; then its VJP with the given G
    3 + loss          the loss's forward and VJP (ops.mse_loss_op / l1_loss_op): d = y - t, the
                      reduction (MSE: one BLAS dot; L1: sum |d|), the gradient G = d * c or
                      sign(d) * c, which the products of version 2 now use
    4 + Adam          the update of A and B (optim.adam_apply)
    5 minilora step   the real step: lora_dense, the loss, value_and_grad (autograd's tracing)
                      and adam_step (the input checks), as bench_step.py times it

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
from bench_step import floor_step, make_case, minilora_step  # noqa: E402

import minilora as ml  # noqa: E402
from minilora import ops  # noqa: E402
from minilora.optim import adam_apply, adam_options  # noqa: E402

SHAPES = [(256, 1024, 1024, 8), (2048, 1024, 1024, 8)]
VERSIONS = ("floor", "+ forward add", "+ loss", "+ Adam", "minilora step")


def versions(c: dict, loss: str) -> dict:
    """The five versions of the step as functions of no arguments, in VERSIONS order."""
    W, x, t, G0, s = c["W"], c["x"], c["y"], c["G"], c["scale"]
    loss_op = ops.mse_loss_op if loss == "mse" else ops.l1_loss_op
    loss_vjp = ops._loss_vjp(ops._mse_grad if loss == "mse" else ops._l1_grad)
    one = np.asarray(1.0, dtype=x.dtype)
    box = {"lora": {"A": c["A"].copy(), "B": c["B"].copy()}}
    box["state"], opts = ml.adam_init(box["lora"]), adam_options(lr=1e-4)

    def lora_part(G: Any = None) -> tuple[Any, ...]:
        A, B = box["lora"]["A"], box["lora"]["B"]
        y = ops.lora_linear.fun(x, W, None, A, B, None, scale=s)
        if G is None:  # version 3 on: the loss's own gradient
            value = loss_op.fun(y, t)
            (G,) = loss_vjp((0,), value, (y, t), {})(one)
        dA, dB = ops._lora_linear_vjp((3, 4), y, (x, W, None, A, B, None), {"scale": s})(G)
        return dA, dB

    def with_adam() -> None:
        dA, dB = lora_part(None)
        box["lora"], box["state"] = adam_apply(box["lora"], {"A": dA, "B": dB}, box["state"], opts)

    return dict(zip(VERSIONS, (floor_step(c), lambda: lora_part(G0), lambda: lora_part(None), with_adam,
                               minilora_step(c, loss))))


def interleaved_medians(fns: dict, seconds: float) -> dict:
    """Median seconds per call of each function, calling them in turn, round after round."""
    for fn in fns.values():  # warm up
        fn()
        fn()
    t0 = time.perf_counter()
    for fn in fns.values():
        fn()
    rounds = max(7, int(seconds / max(time.perf_counter() - t0, 1e-9)))
    times: dict = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def profile(shape: tuple, dtype: str, loss: str, seconds: float) -> dict:
    med = interleaved_medians(versions(make_case(*shape, dtype), loss), seconds)
    return {"shape": list(shape), "dtype": dtype, "loss": loss, "ms": {k: 1e3 * v for k, v in med.items()}}


def print_profile(rec: dict) -> None:
    ms = rec["ms"]
    floor = ms["floor"]
    print(f"({', '.join(map(str, rec['shape']))}) {rec['dtype']} {rec['loss']}")
    print(f"  {'version':<16} {'ms':>9} {'adds ms':>9} {'adds, % of floor':>17} {'ratio to floor':>15}")
    prev = None
    for name in VERSIONS:
        add = "" if prev is None else f"{ms[name] - prev:9.3f}"
        share = "" if prev is None else f"{100 * (ms[name] - prev) / floor:16.1f}%"
        print(f"  {name:<16} {ms[name]:9.3f} {add:>9} {share:>17} {ms[name] / floor:15.3f}")
        prev = ms[name]


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
    out = {}
    for name, fns in (("numpy", {"numpy": numpy_forward}), ("scipy", {"scipy": scipy_forward})):
        out[name + " alone"] = 1e3 * interleaved_medians(fns, seconds / 3)[name]
        time.sleep(0.3)
    pair = interleaved_medians({"numpy": numpy_forward, "scipy": scipy_forward}, seconds / 3)
    out["numpy then scipy, alternating (sum of the two)"] = 1e3 * (pair["numpy"] + pair["scipy"])
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
        try:
            shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes]
            assert all(len(s) == 4 and min(s) > 0 for s in shapes)
        except (ValueError, AssertionError):
            p.error(f"--shapes takes N x D_IN x D_OUT x R with positive integers, e.g. 256x1024x1024x8; "
                    f"got {' '.join(args.shapes)}")
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
                print(f"  forward y = x W^T + h B^T, ({', '.join(map(str, shape))}) {dtype}:")
                for name, ms in gemm[-1]["ms"].items():
                    print(f"    {name:<48} {ms:9.3f} ms")
    if args.json:
        from minilora._io import atomic_open

        with atomic_open(args.json, "w") as fh:
            json.dump({"profiles": records, "scipy_gemm": gemm}, fh, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
