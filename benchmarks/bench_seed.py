"""The seed experiment (1000 Adam steps of rank-4 LoRA on a 100x100 identity) in minilora and in
PyTorch written as the blog writes it, timed in the same process; the ratio is minilora/torch.

Both start from the same arrays (minilora.demo.seed_problem) and both train in the same dtype.
Each side runs --repeat times (after one warm-up run); medians are reported.

    python benchmarks/bench_seed.py [--steps 1000] [--repeat 5] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import minilora as ml  # noqa: E402
from minilora.formats.fileio import atomic_open  # noqa: E402
from minilora.study.seed import seed_experiment, seed_problem  # noqa: E402


def run_minilora(steps: int, dtype: str) -> tuple[float, list[float]]:
    t = time.perf_counter()
    result = seed_experiment(steps=steps, dtype=dtype)
    return time.perf_counter() - t, result["losses"]


def run_torch(steps: int, dtype: str, torch: Any) -> tuple[float, list[float]]:
    """The blog's loop, verbatim but for the dtype and the shared initial values."""
    nn, F = torch.nn, torch.nn.functional
    prob = seed_problem(0, 100, 4, dtype=dtype)
    t = time.perf_counter()
    W = torch.from_numpy(np.array(prob["frozen"]["W"]))
    W_B = nn.Parameter(torch.from_numpy(np.array(prob["lora"]["A"]).T.copy()))  # (100, r) zeros
    W_A = nn.Parameter(torch.from_numpy(np.array(prob["lora"]["B"]).T.copy()))  # (r, 100) ~ N(0, 1)
    input_batch = torch.from_numpy(np.array(prob["x"]))
    target_batch = torch.from_numpy(np.array(prob["target"]))
    losses = []
    optimizer = torch.optim.Adam([W_A, W_B], lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        out = input_batch @ (W + (W_B @ W_A))
        loss = F.l1_loss(out, target_batch)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach().numpy()))
    with torch.no_grad():
        W += W_B @ W_A  # the blog's merge, timed too (seed_experiment merges as well)
    return time.perf_counter() - t, losses


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    try:
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
    except ImportError:
        print("torch is not installed (pip install -e '.[compare]'): nothing to compare against")
        return 1
    records = []
    print(f"{'dtype':>8} {'minilora s':>11} {'torch s':>9} {'ratio':>6} {'max |loss diff| / loss':>24}")
    for dtype in ("float64", "float32"):
        run_minilora(args.steps, dtype), run_torch(args.steps, dtype, torch)  # warm-up
        mini, tor = [], []
        for _ in range(args.repeat):  # interleaved, so a noisy moment hits both sides;
            time.sleep(0.3)  # the pauses outlast torch's OpenMP spin-wait (200 ms by default)
            mini.append(run_minilora(args.steps, dtype))
            time.sleep(0.3)
            tor.append(run_torch(args.steps, dtype, torch))
        m_s = statistics.median(t for t, _ in mini)
        t_s = statistics.median(t for t, _ in tor)
        lm, lt = np.array(mini[0][1]), np.array(tor[0][1])
        diff = float(np.max(np.abs(lm - lt) / np.abs(lt)))
        rec = {"dtype": dtype, "steps": args.steps, "minilora_s": m_s, "torch_s": t_s, "ratio": m_s / t_s,
               "max_rel_loss_diff": diff}
        records.append(rec)
        print(f"{dtype:>8} {m_s:>11.4f} {t_s:>9.4f} {m_s / t_s:>6.2f} {diff:>24.2e}", flush=True)
    if args.json:
        env = {"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__,
               "minilora": ml.__version__, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}
        with atomic_open(args.json, "w") as fh:
            json.dump([{**r, "environment": env} for r in records], fh, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
