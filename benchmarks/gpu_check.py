"""The GPU check: minilora on CuPy against the NumPy float64 oracle, then timed against PyTorch CUDA.

One script, one table, under five minutes on one GPU; it needs CuPy, PyTorch (CUDA build) and
what minilora needs, nothing else. On a machine without a CUDA device it says so and exits 0.

1. Correctness, float32 on the GPU against float64 NumPy on the host, same (float32-rounded)
   initial values: lora_dense forward and the gradients of the MSE loss w.r.t. x, A and B, each
   element against the bound of ``minilora.testing.lora_bounds`` (the tolerance model, see
   docs/tolerance.md); 20 Adam steps, where the gradients themselves differ at every step,
   against a relative error of 1e-4 (float32's unit roundoff 6e-8 times the problem's reduction
   length 512, times a safety factor of ~3).
2. Speed, float32: one LoRA training step (forward, MSE, gradients of A and B, Adam) for the
   shapes of benchmarks/bench_step.py, minilora-on-CuPy against PyTorch CUDA eager, medians
   with the device synchronized before every clock read.

    python benchmarks/gpu_check.py [--json PATH] [--repeat 20]
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
import minilora as ml  # noqa: E402

SHAPES = [(32, 100, 100, 4), (256, 1024, 1024, 8), (2048, 1024, 1024, 8), (512, 4096, 4096, 16)]
FALLBACK_RTOL = 1e-4  # for the Adam trajectory only (see the docstring)


def cuda_available() -> tuple[Any, str]:
    try:
        import cupy
    except ImportError as exc:
        return None, f"no CUDA device: CuPy is not installed ({exc})"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CuPy raises its own CUDARuntimeError without a driver
        return None, f"no CUDA device: {exc}"
    if n < 1:
        return None, "no CUDA device: CUDA reports 0 devices"
    return cupy, ""


def problem(n: int, d_in: int, d_out: int, r: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "W": rng.standard_normal((d_out, d_in)) / np.sqrt(d_in), "b": rng.standard_normal(d_out) * 0.1,
        "A": rng.standard_normal((r, d_in)) / np.sqrt(d_in), "B": rng.standard_normal((d_out, r)) * 0.1,
        "x": rng.standard_normal((n, d_in)), "y": rng.standard_normal((n, d_out)),
    }


def forward_and_grads(p: dict, scale: float = 2.0) -> tuple[Any, Any]:
    def loss(lora: dict, x: Any, base: dict, y: Any) -> Any:
        return ml.mse_loss(ml.lora_dense(base, lora, x, scale=scale), y)

    base, lora = {"W": p["W"], "b": p["b"]}, {"A": p["A"], "B": p["B"]}
    out = ml.lora_dense(base, lora, p["x"], scale=scale)
    g_lora, g_x = ml.grad(loss, (0, 1))(lora, p["x"], base, p["y"])
    return out, {"A": g_lora["A"], "B": g_lora["B"], "x": g_x}


def adam_run(p: dict, steps: int = 20) -> dict:
    def loss(lora: dict, base: dict, x: Any, y: Any) -> Any:
        return ml.mse_loss(ml.lora_dense(base, lora, x, scale=2.0), y)

    lora, _ = ml.fit(loss, {"A": p["A"], "B": p["B"]}, ({"W": p["W"], "b": p["b"]}, p["x"], p["y"]),
                     steps=steps, lr=1e-3)
    return lora


def rel_err(gpu: Any, oracle: np.ndarray) -> float:
    g = np.asarray(ml.to_numpy(gpu), dtype=np.float64)
    return float(np.max(np.abs(g - oracle)) / max(np.max(np.abs(oracle)), np.finfo(np.float64).tiny))


def correctness(backend: Any, device: Any = None) -> list[dict]:
    """Forward and gradients against minilora.testing's tolerance model (elementwise bounds for
    float32 given the same float32-rounded inputs); the 20 Adam steps, whose gradients differ
    step by step, against a relative error of FALLBACK_RTOL."""
    from minilora.testing import lora_bounds

    # both sides get the same values: the inputs rounded to float32 once
    p = {k: v.astype(np.float32).astype(np.float64) for k, v in problem(64, 512, 384, 8).items()}
    with ml.use_backend("numpy"):
        out64, g64 = forward_and_grads(p)
        lora64 = adam_run(p)
    with ml.use_backend(backend, device=device):
        p32 = {k: ml.get_backend().asarray(v, ml.get_backend().dtype("float32")) for k, v in p.items()}
        out32, g32 = forward_and_grads(p32)
        lora32 = adam_run(p32)
    cotangent = 2.0 * (np.asarray(out64) - p["y"]) / p["y"].size  # d(mean squared error)/dy
    bounds = lora_bounds({"W": p["W"], "b": p["b"]}, {"A": p["A"], "B": p["B"]}, p["x"], scale=2.0,
                         dtype="float32", cotangent=cotangent)
    rows = []
    cases = [("forward", out32, out64, "y")] + [(f"grad {k}", g32[k], g64[k], k) for k in ("x", "A", "B")]
    for name, gpu, oracle, key in cases:
        err = np.abs(np.asarray(ml.to_numpy(gpu), dtype=np.float64) - np.asarray(oracle))
        worst = float(np.max(err / bounds[key]))
        rows.append({"check": name, "rel_error": rel_err(gpu, np.asarray(oracle)), "worst_error_over_bound": worst,
                     "tolerance": 1.0, "tolerance_kind": "model", "ok": worst <= 1.0})
    for k in ("A", "B"):
        err = rel_err(lora32[k], np.asarray(lora64[k]))
        rows.append({"check": f"20 Adam steps: {k}", "rel_error": err, "tolerance": FALLBACK_RTOL,
                     "tolerance_kind": "relative", "ok": err <= FALLBACK_RTOL})
    return rows


def timed(fn: Any, sync: Any, repeat: int) -> float:
    for _ in range(3):
        fn()
    sync()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def speed(cupy: Any, repeat: int) -> list[dict]:
    import torch

    rows = []
    for n, d_in, d_out, r in SHAPES:
        p = problem(n, d_in, d_out, r)
        with ml.use_backend("cupy"):
            be = ml.get_backend()
            c = {k: be.asarray(v, be.dtype("float32")) for k, v in p.items()}

            def loss(lora: dict, fr: dict, x: Any, y: Any) -> Any:
                return ml.mse_loss(ml.lora_dense(fr, lora, x, scale=2.0), y)

            vg = ml.value_and_grad(loss)
            box = {"lora": {"A": c["A"], "B": c["B"]}}
            box["state"] = ml.adam_init(box["lora"])

            def mini_step(vg: Any = vg, box: dict = box, c: dict = c) -> None:  # bound: timed in this iteration
                _, g = vg(box["lora"], {"W": c["W"]}, c["x"], c["y"])
                box["lora"], box["state"] = ml.adam_step(box["lora"], g, box["state"], lr=1e-4)

            mini_s = timed(mini_step, cupy.cuda.Device().synchronize, repeat)
        dev = torch.device("cuda")
        t = {k: torch.tensor(v, dtype=torch.float32, device=dev) for k, v in p.items()}
        A, B = torch.nn.Parameter(t["A"].clone()), torch.nn.Parameter(t["B"].clone())
        opt = torch.optim.Adam([A, B], lr=1e-4)
        F = torch.nn.functional

        def torch_step(opt: Any = opt, F: Any = F, t: dict = t, A: Any = A, B: Any = B) -> None:
            opt.zero_grad()
            out = F.linear(t["x"], t["W"]) + F.linear(F.linear(t["x"], A), B) * 2.0
            F.mse_loss(out, t["y"]).backward()
            opt.step()

        torch_s = timed(torch_step, torch.cuda.synchronize, repeat)
        rows.append({"n": n, "d_in": d_in, "d_out": d_out, "r": r, "dtype": "float32",
                     "minilora_s": mini_s, "torch_s": torch_s, "ratio": mini_s / torch_s})
    return rows


def print_correctness(rows: list[dict]) -> None:
    print(f"{'check (float32 vs float64 oracle)':<34} {'rel. error':>11} {'err/bound':>10}  verdict")
    for r in rows:
        ratio = r.get("worst_error_over_bound")
        shown = "-" if ratio is None else f"{ratio:.3f}"
        how = "tolerance model" if ratio is not None else f"relative tolerance {r['tolerance']:.0e}"
        print(f"{r['check']:<34} {r['rel_error']:>11.2e} {shown:>10}  {'ok' if r['ok'] else 'FAIL'} ({how})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--stand-in", action="store_true",
                   help="run the correctness part on the CPU stand-in (array_api_strict on 'device1'), "
                   "to test this script where there is no GPU")
    args = p.parse_args(argv)
    if args.stand_in:
        import array_api_strict as xps

        rows = correctness(xps, xps.Device("device1"))
        print_correctness(rows)
        return 0 if all(r["ok"] for r in rows) else 1
    cupy, why = cuda_available()
    if cupy is None:
        print(f"{why}. Nothing to check on this machine; run this script on a CUDA machine with CuPy.")
        return 0
    props = cupy.cuda.runtime.getDeviceProperties(0)
    device = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    print(f"device: {device}; cupy {cupy.__version__}; numpy {np.__version__}; minilora {ml.__version__}")
    report: dict = {"device": device, "cupy": cupy.__version__}
    try:
        report["correctness"] = correctness("cupy")
        print_correctness(report["correctness"])
    except Exception as exc:  # report and carry on to the timings: one run must say as much as it can
        report["correctness_error"] = f"{type(exc).__name__}: {exc}"
        print(f"correctness check failed to run: {report['correctness_error']}")
    try:
        import torch

        report["torch"] = torch.__version__
        report["speed"] = rows = speed(cupy, args.repeat)
        print(f"{'n':>5} {'d_in':>5} {'d_out':>5} {'r':>3} {'minilora ms':>12} {'torch ms':>9} {'ratio':>6}")
        for r in rows:
            print(f"{r['n']:>5} {r['d_in']:>5} {r['d_out']:>5} {r['r']:>3} {r['minilora_s'] * 1e3:>12.3f} "
                  f"{r['torch_s'] * 1e3:>9.3f} {r['ratio']:>6.2f}")
    except Exception as exc:
        report["speed_error"] = f"{type(exc).__name__}: {exc}"
        print(f"timing failed to run: {report['speed_error']}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1)
    failed = any(not r["ok"] for r in report.get("correctness", [])) or "correctness_error" in report
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
