"""Rank sweeps: train the same problem at several LoRA ranks and seeds, in parallel, and compare.

Two tasks:
- "seed": the seed blog experiment (``minilora.demo.seed_experiment``: W = I(100), mean L1,
  Adam lr 1e-2); the error is ||W_merged - W_finetuned||_F / ||W_finetuned||_F.
- "synthetic": y = x (W0 + dW*)^T + b with a target update dW* = U diag(k, k-1, ..., 1) V^T of
  *intrinsic rank* k (U, V random orthonormal, d x k); LoRA (PEFT's kaiming init, alpha = r) is
  fitted with mean squared error. The error is ||s B A - dW*||_F / ||dW*||_F, and no rank-r
  update can beat ||dW* - best rank-r approximation||_F / ||dW*||_F (Eckart-Young), reported
  as ``best_error``: below rank k the sweep shows that floor, from rank k on the error vanishes.

Each (task, rank, seed) case is one call of ``run_case``, submitted to any
``concurrent.futures.Executor``: a process pool by default, or e.g. a Dask client's
``client.get_executor()`` for sweeps bigger than one machine. A case's problem depends only on
its seed, so every rank of one seed sees the same data.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import numbers
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from minilora._checks import check_rank, check_real
from minilora.errors import MiniLoraTypeError, MiniLoraValueError

__all__ = ["TASKS", "synthetic_experiment", "run_case", "sweep", "summarize", "check_ranks"]

TASKS = ("seed", "synthetic")


def synthetic_experiment(*, steps: int = 300, rank: int = 4, seed: int = 0, intrinsic_rank: int = 4,
                         d: int = 32, n: int = 256, lr: float = 1e-2) -> dict:
    """Fit rank-``rank`` LoRA to a target update of rank ``intrinsic_rank`` (see module doc).

    Returns losses, losses_last, rel_error, best_error, lora_params, seconds, A (rank, d) as a
    nested list, and the settings.
    """
    from minilora.layers import dense_init, lora_dense, lora_init, lora_scale
    from minilora.losses import mse_loss
    from minilora.train import count_params, fit

    rank, k, d, n = check_rank(rank), check_rank(intrinsic_rank, "intrinsic_rank"), check_rank(d, "d"), check_rank(n, "n")
    if k > d:
        raise MiniLoraValueError(f"intrinsic_rank must be <= d = {d}; got {k}")
    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    base = dense_init(rng, d, d)  # W0 (d, d), b (d,)
    U = np.linalg.qr(rng.standard_normal((d, k)))[0]
    V = np.linalg.qr(rng.standard_normal((d, k)))[0]
    sigma = np.arange(k, 0, -1.0)  # k, k-1, ..., 1
    delta = (U * sigma) @ V.T  # (d_out, d_in), rank k
    x = rng.standard_normal((n, d))
    y = x @ (base["W"] + delta).T + base["b"]
    lora = lora_init(rng, d, d, rank)  # drawn after the problem: same data at every rank
    scale = lora_scale(rank, rank)

    def loss(lora: dict, base: dict, x: Any, y: Any) -> Any:
        return mse_loss(lora_dense(base, lora, x, scale=scale), y)

    lora, losses = fit(loss, lora, (base, x, y), steps=steps, lr=lr)
    learned = scale * lora["B"] @ lora["A"]
    norm = np.linalg.norm(sigma)
    return {
        "losses": losses,
        "losses_last": losses[-1],
        "rel_error": float(np.linalg.norm(learned - delta) / norm),
        "best_error": float(np.linalg.norm(sigma[rank:]) / norm),
        "lora_params": count_params(lora),
        "seconds": time.perf_counter() - start,
        "A": np.asarray(lora["A"]).tolist(),
        "rank": rank, "seed": seed, "steps": steps, "lr": lr, "intrinsic_rank": k, "d": d, "n": n,
    }


def _seed_case(steps: int, rank: int, seed: int, lr: float) -> dict:
    from minilora.study.seed import seed_experiment

    last: dict = {}

    def keep(step: int, loss: float, params: Any, state: Any) -> None:
        last["lora"] = params  # the trained factors (seed_experiment reports only numbers)

    result = seed_experiment(steps=steps, rank=rank, seed=seed, lr=lr, callback=keep)
    result["A"] = np.asarray(last["lora"]["A"]).tolist()
    return result


def run_case(case: dict) -> dict:
    """Run one sweep case {"task", "rank", "seed", "steps", "lr", "intrinsic_rank"} and return a
    flat record: task, rank, seed, steps, losses, final_loss, rel_error, best_error (synthetic
    only, else None), lora_params, seconds, A. A top-level function, so a process pool or a
    Dask worker can import and run it."""
    task, rank, seed, steps, lr = case["task"], case["rank"], case["seed"], case["steps"], case["lr"]
    if task == "seed":
        r = _seed_case(steps, rank, seed, lr)
    elif task == "synthetic":
        r = synthetic_experiment(steps=steps, rank=rank, seed=seed, lr=lr,
                                 intrinsic_rank=case.get("intrinsic_rank", 4))
    else:
        raise MiniLoraValueError(f"task must be one of {', '.join(TASKS)}; got {task!r}")
    return {
        "task": task, "rank": rank, "seed": seed, "steps": steps,
        "final_loss": r["losses_last"], "rel_error": r["rel_error"], "best_error": r.get("best_error"),
        "lora_params": r["lora_params"], "seconds": r["seconds"], "losses": r["losses"], "A": r["A"],
    }


def check_ranks(ranks: Any, name: str = "ranks") -> list[int]:
    """A non-empty list of distinct positive integers."""
    if isinstance(ranks, (str, bytes)) or not isinstance(ranks, Sequence):
        raise MiniLoraTypeError(f"{name} must be a list of positive integers; got {type(ranks).__name__}")
    if len(ranks) == 0:
        raise MiniLoraValueError(f"{name} must not be empty")
    out = []
    for pos, r in enumerate(ranks):
        if isinstance(r, bool) or not isinstance(r, numbers.Integral):
            raise MiniLoraTypeError(f"{name} must hold positive integers; got {r!r} at position {pos}")
        if r <= 0:
            raise MiniLoraValueError(f"{name} must hold positive integers; got {r} at position {pos}")
        if int(r) in out:
            raise MiniLoraValueError(f"{name} must not repeat a value; got {r} twice")
        out.append(int(r))
    return out


def _check_seeds(seeds: Any) -> list[int]:
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Sequence) or len(seeds) == 0:
        raise MiniLoraValueError(f"seeds must be a non-empty list of integers >= 0; got {seeds!r}")
    for pos, s in enumerate(seeds):
        if isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 0:
            raise MiniLoraValueError(f"seeds must hold integers >= 0; got {s!r} at position {pos}")
    if len(set(seeds)) != len(seeds):
        raise MiniLoraValueError(f"seeds must not repeat a value; got {list(seeds)}")
    return [int(s) for s in seeds]


def sweep(
    ranks: Sequence[int],
    seeds: Sequence[int] = (0,),
    *,
    tasks: Sequence[str] = TASKS,
    steps: int = 300,
    lr: float = 1e-2,
    intrinsic_rank: int = 4,
    compare: tuple[int, int] | None = None,
    executor: cf.Executor | None = None,
    max_workers: int | None = None,
    on_result: Callable[[int, int, dict], Any] | None = None,
) -> dict:
    """Run every (task, rank, seed) case through ``executor`` and collect the results.

    executor: any ``concurrent.futures.Executor`` (``submit`` returning futures); default: a
    process pool of ``max_workers`` (default: all cores), created and shut down here.
    compare: the two ranks whose learned A factors are compared by subspace similarity (default:
    the smallest and the largest), for each task on the first seed.
    on_result(done, total, record) is called as each case finishes (for progress).

    Returns {"settings", "results": records sorted by task, rank, seed (see ``run_case``),
    "similarity": {task: {"ranks": [r1, r2], "seed", "grid": (r1, r2) nested list}}, "seconds"}.
    """
    from minilora.study.subspace import subspace_similarity_grid

    ranks = check_ranks(ranks)
    seeds = _check_seeds(seeds)
    if isinstance(tasks, str) or not tasks or any(t not in TASKS for t in tasks):
        raise MiniLoraValueError(f"tasks must be a non-empty list from {', '.join(TASKS)}; got {tasks!r}")
    tasks = list(dict.fromkeys(tasks))
    steps = check_rank(steps, "steps")
    lr = check_real(lr, "lr", low=0.0, low_open=True)
    intrinsic_rank = check_rank(intrinsic_rank, "intrinsic_rank")
    if compare is None:
        compare = (min(ranks), max(ranks))
    elif (not isinstance(compare, Sequence) or len(compare) != 2
          or any(isinstance(r, bool) or r not in ranks for r in compare)):
        raise MiniLoraValueError(f"compare must be two of the swept ranks {ranks}; got {compare!r}")
    if executor is not None and not callable(getattr(executor, "submit", None)):
        raise MiniLoraTypeError(f"executor must be a concurrent.futures.Executor; got {type(executor).__name__}")

    cases = [{"task": t, "rank": r, "seed": s, "steps": steps, "lr": lr, "intrinsic_rank": intrinsic_rank}
             for t in tasks for r in ranks for s in seeds]
    start = time.perf_counter()
    own = executor is None
    if executor is None:
        workers = max_workers if max_workers is not None else (os.cpu_count() or 1)
        # forkserver (spawn where missing): forking a process that runs threads (a notebook,
        # torch, a Dask client) can deadlock, and Python 3.14 makes forkserver the default too
        method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
        executor = cf.ProcessPoolExecutor(max_workers=check_rank(workers, "max_workers"),
                                          mp_context=multiprocessing.get_context(method))
    results = []
    try:
        futures = [executor.submit(run_case, case) for case in cases]
        for future in cf.as_completed(futures):
            record = future.result()
            results.append(record)
            if on_result is not None:
                on_result(len(results), len(cases), record)
    finally:
        if own:
            executor.shutdown(cancel_futures=True)
    results.sort(key=lambda r: (tasks.index(r["task"]), r["rank"], r["seed"]))
    similarity = {}
    for t in tasks:
        by_rank = {r["rank"]: r for r in results if r["task"] == t and r["seed"] == seeds[0]}
        grid = subspace_similarity_grid(np.asarray(by_rank[compare[0]]["A"]), np.asarray(by_rank[compare[1]]["A"]))
        similarity[t] = {"ranks": list(compare), "seed": seeds[0], "grid": grid.tolist()}
    return {
        "settings": {"ranks": ranks, "seeds": seeds, "tasks": tasks, "steps": steps, "lr": lr,
                     "intrinsic_rank": intrinsic_rank, "compare": list(compare)},
        "results": results,
        "similarity": similarity,
        "seconds": time.perf_counter() - start,
    }


def summarize(results: list[dict]) -> list[dict]:
    """One row per (task, rank): the mean over seeds of final_loss, rel_error and seconds, with
    best_error and lora_params (the same for every seed)."""
    rows: dict[tuple[str, int], list[dict]] = {}
    for r in results:
        rows.setdefault((r["task"], r["rank"]), []).append(r)
    out = []
    for (task, rank), group in rows.items():
        out.append({
            "task": task, "rank": rank, "seeds": len(group),
            "final_loss": float(np.mean([g["final_loss"] for g in group])),
            "rel_error": float(np.mean([g["rel_error"] for g in group])),
            "best_error": group[0]["best_error"],
            "lora_params": group[0]["lora_params"],
            "seconds": float(np.mean([g["seconds"] for g in group])),
        })
    return out
