"""Where the time of one LoRA training step goes: each part timed on its own.

The parts of minilora's step (MSE loss; L1 differs only in the loss's elementwise passes):

    x W^T                 the frozen product, the same in any implementation
    LoRA products         x A^T and (x A^T) B^T (forward); G B, (G B)^T x, G^T h (backward)
    elementwise passes    y + hB^T, the residual d = y - t, its reduction, the loss gradient
    Adam                  the update of A and B
    the rest              the measured step minus the parts: what the parts cost more when they
                          run one after another in the step, plus autograd and input checks

It also times the step's arithmetic with autograd and the checks taken out (the primitives'
forward functions and VJP makers called by hand), which separates the cost of autograd from the
cost of the extra elementwise passes.

Each part is the median of many repetitions; "rest" is the measured step minus the parts, so
the rows add up to the step. Usage:

    python benchmarks/profile_step.py [--shape 256x1024x1024x8] [--dtype float64] [--json PATH]
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


def median_ms(fn: Any, seconds: float = 1.0) -> float:
    fn()
    t0 = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t0, 1e-7)
    times = []
    for _ in range(max(5, min(2000, int(seconds / once)))):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def profile(n: int, d_in: int, d_out: int, r: int, dtype: str) -> dict:
    c = make_case(n, d_in, d_out, r, dtype)
    W, A, B, x, y, G, s = c["W"], c["A"], c["B"], c["x"], c["y"], c["G"], c["scale"]
    h = (x @ A.T) * s
    yy = x @ W.T
    d = yy - y
    lora, state = {"A": A, "B": B}, ml.adam_init({"A": A, "B": B})
    grads = {"A": A.copy(), "B": B.copy()}
    parts = {
        "x W^T": median_ms(lambda: x @ W.T),
        "LoRA products, forward (x A^T, h B^T)": median_ms(lambda: (x @ A.T) @ B.T),
        "LoRA products, backward (G B, (G B)^T x, G^T h)": median_ms(lambda: ((G @ B).T @ x, G.T @ h)),
        "elementwise: y + h B^T, y - t, sum d^2, d * c": median_ms(
            lambda: (np.add(yy, d, out=np.empty_like(yy)), yy - y, np.vdot(d, d), d * 2.0)),
        "Adam on A and B": median_ms(lambda: ml.adam_step(lora, grads, state, lr=1e-4)),
    }
    step = median_ms(minilora_step(c, "mse"))
    floor = median_ms(floor_step(c))
    raw = median_ms(raw_step(c))
    parts["the rest: the parts run together, autograd, checks"] = step - sum(parts.values())
    return {"shape": [n, d_in, d_out, r], "dtype": dtype, "step_ms": step, "floor_ms": floor, "raw_ms": raw,
            "parts_ms": parts}


def raw_step(c: dict) -> Any:
    """minilora's step with autograd and the input checks taken out: the primitives' forward
    functions and VJP makers called by hand, then the Adam update. The same arithmetic."""
    from minilora import ops
    from minilora.optim import adam_apply, adam_options

    W, x, y, dtype = c["W"], c["x"], c["y"], c["x"].dtype
    box = {"lora": {"A": c["A"].copy(), "B": c["B"].copy()}}
    box["state"], opts = ml.adam_init(box["lora"]), adam_options(lr=1e-4)
    loss_vjp = ops._loss_vjp(ops._mse_grad)

    def step() -> None:
        A, B = box["lora"]["A"], box["lora"]["B"]
        out = ops.lora_linear.fun(x, W, None, A, B, None, scale=c["scale"])
        loss = ops.mse_loss_op.fun(out, y)
        (g,) = loss_vjp((0,), loss, (out, y), {})(np.asarray(1.0, dtype=dtype))
        dA, dB = ops._lora_linear_vjp((3, 4), out, (x, W, None, A, B, None), {"scale": c["scale"]})(g)
        box["lora"], box["state"] = adam_apply(box["lora"], {"A": dA, "B": dB}, box["state"], opts)

    return step


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="256x1024x1024x8", help="N x D_IN x D_OUT x R")
    p.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    try:
        n, d_in, d_out, r = (int(v) for v in args.shape.split("x"))
    except ValueError:
        p.error(f"--shape takes N x D_IN x D_OUT x R, e.g. 256x1024x1024x8; got {args.shape}")
    rec = profile(n, d_in, d_out, r, args.dtype)
    print(f"one minilora training step, MSE, (n, d_in, d_out, r) = ({n}, {d_in}, {d_out}, {r}), {args.dtype}")
    for name, ms in rec["parts_ms"].items():
        print(f"  {name:<52} {ms:8.3f} ms  {100 * ms / rec['step_ms']:5.1f}%")
    print(f"  {'step (measured)':<52} {rec['step_ms']:8.3f} ms")
    print(f"  {'floor (the matrix products alone)':<52} {rec['floor_ms']:8.3f} ms  "
          f"ratio {rec['step_ms'] / rec['floor_ms']:.2f}")
    print(f"  {'the same arithmetic without autograd and checks':<52} {rec['raw_ms']:8.3f} ms  "
          f"ratio to the floor {rec['raw_ms'] / rec['floor_ms']:.2f}")
    if args.json:
        from minilora._io import atomic_open

        with atomic_open(args.json, "w") as fh:
            json.dump(rec, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
