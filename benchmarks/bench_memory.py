"""Peak memory of one LoRA fine-tuning step against one full fine-tuning step on a 4096x4096 layer.

Each case runs in a fresh Python process, which builds its arrays, runs one warm-up step, then
measures one more step two ways:

    tracemalloc   bytes NumPy allocated during the step above what was alive before it
                  (NumPy reports its array allocations to tracemalloc), and the total peak
    peak RSS      the process's peak resident set size during the step (Linux VmHWM, reset just
                  before the step; elsewhere ``ru_maxrss`` over the process's life), which
                  includes the frozen weight, the data and the optimizer state

    lora  W (4096, 4096) frozen; A (16, 4096), B (4096, 16) trained: forward, MSE loss,
          gradients of A and B, one Adam step
    full  the same layer with W trained: the gradient of W and Adam's two moments for W

The script also checks that no temporary as large as W is allocated during a LoRA step: if the
step's tracemalloc peak stays below the size of one (d_out, d_in) array, no such array can have
been alive. Usage:

    python benchmarks/bench_memory.py [--n 256] [--d 4096] [--rank 16] [--dtype float64|float32|both] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tracemalloc

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))


def run_case(case: str, n: int, d: int, rank: int, dtype: str) -> dict:
    """One case, in this process (the parent calls this through a fresh child process)."""
    import minilora as ml

    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, d)).astype(dtype)
    y = rng.standard_normal((n, d)).astype(dtype)
    base = ml.dense_init(rng, d, d, bias=False, dtype=dtype)
    if case == "lora":
        lora = ml.lora_init(rng, d, d, rank, dtype=dtype)
        trained, frozen = lora, base

        def loss(lo: dict, fr: dict, x: np.ndarray, y: np.ndarray) -> np.ndarray:
            return ml.mse_loss(ml.lora_dense(fr, lo, x, scale=2.0), y)
    else:
        trained, frozen = base, {}

        def loss(p: dict, fr: dict, x: np.ndarray, y: np.ndarray) -> np.ndarray:
            return ml.mse_loss(ml.dense(p, x), y)

    grad = ml.grad(loss)
    state = ml.adam_init(trained)

    def step(trained: dict, state: dict) -> tuple[dict, dict]:
        return ml.adam_step(trained, grad(trained, frozen, x, y), state, lr=1e-4)

    trained, state = step(trained, state)  # warm-up: first-call allocations are not the step's
    hwm_reset = _reset_peak_rss()  # so setup transients (e.g. float64 draws cast to float32) don't count
    tracemalloc.start()
    before, _ = tracemalloc.get_traced_memory()
    trained, state = step(trained, state)
    after, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    itemsize = np.dtype(dtype).itemsize
    return {
        "case": case, "n": n, "d_in": d, "d_out": d, "r": rank if case == "lora" else None, "dtype": dtype,
        "step_peak_bytes": peak - before,
        "trainable_params": ml.count_params(trained),
        "peak_rss_bytes": _peak_rss() if hwm_reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_rss_scope": "step" if hwm_reset else "process lifetime",
        "weight_bytes": d * d * itemsize,
    }


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (Linux: clear_refs 5 resets VmHWM); False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _peak_rss() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def in_fresh_process(case: str, args: argparse.Namespace, dtype: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", case, "--n", str(args.n), "--d", str(args.d),
           "--rank", str(args.rank), "--dtype", dtype]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def mib(b: float) -> str:
    return f"{b / 2**20:9.1f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=256, help="batch rows (default 256)")
    p.add_argument("--d", type=int, default=4096, help="d_in = d_out (default 4096)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--dtype", choices=("float64", "float32", "both"), default="both")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--child", choices=("lora", "full"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(run_case(args.child, args.n, args.d, args.rank, args.dtype)))
        return 0
    dtypes = ("float64", "float32") if args.dtype == "both" else (args.dtype,)
    print(f"one training step, batch {args.n}, layer ({args.d}, {args.d}), LoRA rank {args.rank}; MiB")
    print(f"{'dtype':>8} {'case':>5} {'step peak':>10} {'peak RSS':>9} {'W itself':>9}")
    records, ok = [], True
    for dtype in dtypes:
        res = {case: in_fresh_process(case, args, dtype) for case in ("lora", "full")}
        for case in ("lora", "full"):
            r = res[case]
            print(f"{dtype:>8} {case:>5} {mib(r['step_peak_bytes']):>10} {mib(r['peak_rss_bytes']):>9} "
                  f"{mib(r['weight_bytes']):>9}")
        lora, full = res["lora"], res["full"]
        rec = {
            "dtype": dtype, "lora": lora, "full": full,
            "step_peak_ratio": lora["step_peak_bytes"] / full["step_peak_bytes"],
            "peak_rss_ratio": lora["peak_rss_bytes"] / full["peak_rss_bytes"],
            "lora_step_allocates_weight_sized_temporary": lora["step_peak_bytes"] >= lora["weight_bytes"],
        }
        ok &= not rec["lora_step_allocates_weight_sized_temporary"]
        records.append(rec)
        print(f"{dtype:>8} ratio lora/full: step peak {rec['step_peak_ratio']:.3f}, "
              f"peak RSS {rec['peak_rss_ratio']:.3f}; "
              f"weight-sized temporary in the LoRA step: "
              f"{'YES' if rec['lora_step_allocates_weight_sized_temporary'] else 'no'}")
    if args.json:
        from minilora.formats.fileio import atomic_open

        env = {"python": platform.python_version(), "numpy": np.__version__, "platform": platform.platform()}
        with atomic_open(args.json, "w") as fh:
            json.dump([{**r, "environment": env} for r in records], fh, indent=1)
        print(f"wrote {args.json}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
