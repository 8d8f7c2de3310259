"""Time one LoRA training step: minilora, PyTorch eager (CPU), JAX (jit, CPU) and the BLAS floor.

A step is: lora forward y = x W^T + s (x A^T) B^T, the loss (MSE or L1, mean), the gradients
for A and B (W is frozen), and one Adam update of A and B. The contenders, in one process:

    minilora  value_and_grad(loss)(lora, frozen, x, y) + adam_step
    torch     the same with nn.Parameter A, B, F.linear, F.mse_loss / F.l1_loss, backward,
              torch.optim.Adam (skipped with a note when torch is not installed)
    jax       one jax.jit of jax.value_and_grad(loss) + optax.adam's update, with W, x, y passed
              as arguments (not baked in as constants) and block_until_ready on the results, the
              same hyper-parameters as the others (lr 1e-4, betas (0.9, 0.999), eps 1e-8, no
              decay); float64 through jax_enable_x64. Compiled by an untimed check before the
              timing (two steps from the same arrays as minilora's, compared with minilora's
              loss, A and B: the jax_check_rel_diff key). Skipped with a note when JAX or optax
              is not installed; JAX is not a dependency of minilora or of its tests.
    floor     only the matrix products the step cannot avoid, as bare NumPy calls:
              x W^T, x A^T, (x A^T) B^T for the forward; G B, (G B)^T x, G^T (x A^T) for
              the gradients (G the loss gradient, given)

Each contender runs in blocks of repeated calls after a warm-up, three block cycles (the floor
and minilora taking turns of a few calls in shared blocks, torch and JAX each in blocks of their
own); medians are reported, and the ratios minilora/floor, minilora/torch and minilora/jax are
measured in the same run. The threads are the defaults of the libraries (all cores). The first
shape of both lists, (32, 100, 100, 4), is the seed experiment's step (bench_seed.py). Usage:

    python benchmarks/bench_step.py [--quick] [--json PATH] [--repeat N] [--shapes NxDINxDOUTxR ...]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time
from types import SimpleNamespace
from typing import Any

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import minilora as ml  # noqa: E402
from minilora.formats.fileio import atomic_open  # noqa: E402
from minilora.study.plots import pyplot, save_png  # noqa: E402

SHAPES = [(32, 100, 100, 4), (256, 1024, 1024, 8), (2048, 1024, 1024, 8), (512, 4096, 4096, 16)]
QUICK_SHAPES = [(32, 100, 100, 4), (256, 1024, 1024, 8)]
DTYPES = ("float64", "float32")
LOSSES = ("mse", "l1")


# Worker threads (torch's OpenMP threads, OpenBLAS's) keep spinning for a while after each
# parallel region, taking the cores from whatever the other library runs next. torch therefore
# runs in blocks of its own, separated from the others by a pause longer than that spin (JAX too:
# XLA's CPU thread pool is Eigen's, whose idle workers also spin before they sleep), and the
# block cycle repeats so that slow drifts of the machine's load hit every contender alike. The floor and
# minilora, both NumPy, share their blocks in short runs (RUN calls of one after an untimed call
# that leaves the caches as a training loop would, then RUN of the other, ...), so the ratio
# minilora/floor compares calls made moments apart. torch keeps its default settings.
PAUSE_S = 0.3
CYCLES = 3
BLOCK_S = 0.5  # each block runs about this long, so a short hiccup is one sample among many
RUN = 3  # timed calls in a row of one function inside a shared block


def median_times(groups: list[dict], repeat: int, warmup: int = 2) -> dict:
    """Median seconds per call of each function. ``groups`` is a list of {name: function}; the
    functions of a group take turns in one block, each turn one untimed call and RUN timed ones
    (so a call finds the caches as its own previous call left them, as in a training loop);
    each group gets CYCLES blocks of at least ``repeat`` rounds, more to fill BLOCK_S."""
    times: dict = {k: [] for group in groups for k in group}
    rounds: dict = {}
    for cycle in range(CYCLES):
        for gi, group in enumerate(groups):
            time.sleep(PAUSE_S)
            warm = 0.0
            for _ in range(warmup if cycle == 0 else 1):
                t = time.perf_counter()
                for fn in group.values():
                    fn()
                warm = time.perf_counter() - t
            per_round = warm * ((RUN + 1) if len(group) > 1 else 1)
            rounds.setdefault(gi, max(repeat, min(500, int(BLOCK_S / max(per_round, 1e-9)))))
            for _ in range(rounds[gi]):
                for k, fn in group.items():
                    if len(group) > 1:
                        fn()
                    for _ in range(RUN if len(group) > 1 else 1):
                        t = time.perf_counter()
                        fn()
                        times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def make_case(n: int, d_in: int, d_out: int, r: int, dtype: str) -> dict:
    rng = np.random.default_rng(0)
    return {
        "W": (rng.standard_normal((d_out, d_in)) / np.sqrt(d_in)).astype(dtype),
        "A": (rng.standard_normal((r, d_in)) / np.sqrt(d_in)).astype(dtype),
        "B": (rng.standard_normal((d_out, r)) * 0.01).astype(dtype),
        "x": rng.standard_normal((n, d_in)).astype(dtype),
        "y": rng.standard_normal((n, d_out)).astype(dtype),
        "G": (rng.standard_normal((n, d_out)) / (n * d_out)).astype(dtype),
        "scale": 2.0,
    }


def minilora_step(c: dict, loss: str) -> Any:
    loss_fn = ml.mse_loss if loss == "mse" else ml.l1_loss
    frozen = {"W": c["W"]}
    scale = c["scale"]

    def objective(lora: dict, frozen: dict, x: Any, y: Any) -> Any:
        return loss_fn(ml.lora_dense(frozen, lora, x, scale=scale), y)

    vg = ml.value_and_grad(objective)
    box = {"lora": {"A": c["A"].copy(), "B": c["B"].copy()}}
    box["state"] = ml.adam_init(box["lora"])

    def step() -> None:
        box["loss"], g = vg(box["lora"], frozen, c["x"], c["y"])
        box["lora"], box["state"] = ml.adam_step(box["lora"], g, box["state"], lr=1e-4)

    step.box = box  # type: ignore[attr-defined]  # the adapter, state and loss, for the checks
    return step


def floor_step(c: dict) -> Any:
    W, A, B, x, G = c["W"], c["A"], c["B"], c["x"], c["G"]

    def step() -> None:
        h = x @ A.T
        _ = x @ W.T
        _ = h @ B.T
        gB = G @ B
        _ = gB.T @ x
        _ = G.T @ h

    return step


def torch_step(c: dict, loss: str, torch: Any) -> Any:
    F = torch.nn.functional
    W = torch.from_numpy(c["W"])
    A = torch.nn.Parameter(torch.from_numpy(c["A"].copy()))
    B = torch.nn.Parameter(torch.from_numpy(c["B"].copy()))
    x, y = torch.from_numpy(c["x"]), torch.from_numpy(c["y"])
    scale = c["scale"]
    loss_fn = F.mse_loss if loss == "mse" else F.l1_loss
    opt = torch.optim.Adam([A, B], lr=1e-4)

    def step() -> None:
        opt.zero_grad()
        out = F.linear(x, W) + F.linear(F.linear(x, A), B) * scale
        loss_fn(out, y).backward()
        opt.step()

    return step


def import_jax() -> Any:
    """JAX and optax (as .jax, .jnp, .optax) with float64 enabled, or None when either is missing.
    Imported here, never at module level: minilora and these scripts do not need JAX."""
    try:
        import jax
    except ImportError:
        return None
    jax.config.update("jax_enable_x64", True)  # before any JAX array exists: float64 stays float64
    try:
        import optax
    except ImportError:
        return None
    return SimpleNamespace(jax=jax, jnp=jax.numpy, optax=optax)


JAX_NOTE = ("note: jax (or optax) is not installed; the jax columns are skipped "
            "(pip install jax optax; JAX is not a dependency of minilora or of its tests)")


@functools.cache
def jax_train_step(loss: str, lr: float, scale: float, fan_in_fan_out: bool = False) -> tuple[Any, Any]:
    """(optax.adam(lr), step): ``step(lora, opt_state, W, x, y) -> (lora, opt_state, loss)``, one
    jax.jit of the whole step: the loss of y = x W^T + s (x A^T) B^T (x W + ... with
    ``fan_in_fan_out``, W stored (d_in, d_out)), its gradient for lora = {"A", "B"}, and optax's
    Adam update. The data are arguments, so XLA compiles once per shape and dtype; cached, so
    every caller with the same settings shares the compiled steps."""
    jx = import_jax()
    jax, jnp, optax = jx.jax, jx.jnp, jx.optax
    opt = optax.adam(lr, b1=0.9, b2=0.999, eps=1e-8)  # torch.optim.Adam's and minilora's defaults

    def objective(lora: dict, W: Any, x: Any, y: Any) -> Any:
        base = x @ W if fan_in_fan_out else x @ W.T
        d = base + scale * ((x @ lora["A"].T) @ lora["B"].T) - y
        return jnp.mean(d * d) if loss == "mse" else jnp.mean(jnp.abs(d))

    def step(lora: dict, state: Any, W: Any, x: Any, y: Any) -> tuple[Any, Any, Any]:
        value, grads = jax.value_and_grad(objective)(lora, W, x, y)
        updates, state = opt.update(grads, state, lora)
        return optax.apply_updates(lora, updates), state, value

    return opt, jax.jit(step)


def jax_step(c: dict, loss: str, jx: Any) -> Any:
    """One JAX training step as a function of no arguments, like minilora_step; the arrays are
    moved to JAX once, here, and each call waits for its results (block_until_ready)."""
    opt, train = jax_train_step(loss, 1e-4, c["scale"])
    W, x, y = (jx.jnp.asarray(c[k]) for k in ("W", "x", "y"))
    lora = {"A": jx.jnp.array(c["A"], copy=True), "B": jx.jnp.array(c["B"], copy=True)}
    box = {"lora": lora, "state": opt.init(lora), "loss": None}
    ready = jx.jax.block_until_ready

    def step() -> None:
        box["lora"], box["state"], box["loss"] = ready(train(box["lora"], box["state"], W, x, y))

    step.box = box  # type: ignore[attr-defined]
    return step


def rel_diff(actual: Any, expected: Any) -> float:
    """||actual - expected|| / ||expected|| in float64 (0 when both are zero)."""
    a, b = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} and {b.shape}")
    return float(np.linalg.norm(a - b) / max(float(np.linalg.norm(b)), np.finfo(np.float64).tiny))


def step_rel_diff(expected: dict, actual: dict) -> float:
    """The largest relative difference of the loss, A and B between two steps' boxes."""
    return max([rel_diff(actual["loss"], expected["loss"])]
               + [rel_diff(actual["lora"][k], expected["lora"][k]) for k in ("A", "B")])


# Two Adam steps from the same arrays, computed in a different order of operations (XLA fuses and
# reorders; optax divides m and v by their bias corrections where torch and minilora fold them
# into lr and the denominator): measured below 1e-15 (float64) and 2e-7 (float32) relative on
# this project's cases, a few roundings; the tolerance leaves a factor of about 100.
JAX_CHECK_TOL = {"float64": 1e-13, "float32": 2e-5}


def away_from_the_kink(c: dict, margin: float = 1e-2) -> np.ndarray:
    """The targets moved so that no entry of pred - y lies within ``margin`` of zero, for the L1
    check only. L1's gradient is sign(pred - y): where |pred - y| is a few float32 roundings, two
    correct implementations (another BLAS order) can disagree on the sign, and one flipped sign
    moves Adam's update of the factors by up to lr, far above any rounding bound (seen at
    (256, 1024, 1024, 8) float32: 9e-5 relative after a NumPy upgrade). Two steps at lr 1e-4 move
    pred by about 1e-3 at most here, so a margin of 1e-2 keeps every sign fixed and the check
    compares the arithmetic, not a coin toss. The timed steps use the unmoved targets."""
    x, W, A, B = (c[k].astype(np.float64) for k in ("x", "W", "A", "B"))
    pred = x @ W.T + c["scale"] * (x @ A.T) @ B.T
    d = pred - c["y"].astype(np.float64)
    near = np.abs(d) < margin
    y = np.where(near, pred - np.where(d < 0, -margin, margin), c["y"].astype(np.float64))
    return y.astype(c["y"].dtype)


def check_jax(c: dict, loss: str, jx: Any, steps: int = 2) -> float:
    """Run minilora's and JAX's step ``steps`` times from the same arrays; the step_rel_diff.
    Also compiles JAX's step for this case, outside any timed call."""
    if loss == "l1":
        c = dict(c, y=away_from_the_kink(c))
    mini, other = minilora_step(c, loss), jax_step(c, loss, jx)
    for _ in range(steps):
        mini()
        other()
    return step_rel_diff(mini.box, other.box)  # type: ignore[attr-defined]


def run(shapes: list, repeat: int, torch: Any, jx: Any = None) -> list[dict]:
    records = []
    jax_xW = None if jx is None else jx.jax.jit(lambda a, b: a @ b.T)  # the frozen product alone
    for n, d_in, d_out, r in shapes:
        for dtype in DTYPES:
            c = make_case(n, d_in, d_out, r, dtype)
            reps = repeat
            for loss in LOSSES:
                x, W = c["x"], c["W"]
                groups = [{"floor": floor_step(c), "minilora": minilora_step(c, loss), "xW": lambda x=x, W=W: x @ W.T}]
                if torch is not None:
                    tx, tW = torch.from_numpy(x), torch.from_numpy(W)
                    groups.append({"torch": torch_step(c, loss, torch),
                                   "torch_xW": lambda tx=tx, tW=tW: torch.nn.functional.linear(tx, tW)})
                check = None
                if jx is not None:
                    check = check_jax(c, loss, jx)  # compiles the step, before the timing
                    jW, jxx = jx.jnp.asarray(W), jx.jnp.asarray(x)
                    groups.append({"jax": jax_step(c, loss, jx),
                                   "jax_xW": lambda a=jxx, b=jW: jax_xW(a, b).block_until_ready()})
                    groups[-1]["jax_xW"]()  # compile
                med = median_times(groups, reps)
                floor_s, mini_s, torch_s, jax_s = med["floor"], med["minilora"], med.get("torch"), med.get("jax")
                records.append({
                    "name": f"n{n}_in{d_in}_out{d_out}_r{r}_{dtype}_{loss}",
                    "dtype": dtype, "n": n, "d_in": d_in, "d_out": d_out, "r": r, "loss": loss,
                    "minilora_s": mini_s, "torch_s": torch_s, "floor_s": floor_s,
                    # the frozen product alone, NumPy's BLAS and torch's: how much of the two
                    # steps' difference is their BLAS libraries rather than their step code
                    "numpy_xW_s": med["xW"], "torch_xW_s": med.get("torch_xW"),
                    "jax_s": jax_s, "minilora_over_jax": None if jax_s is None else mini_s / jax_s,
                    "jax_xW_s": med.get("jax_xW"),
                    # loss, A and B after two steps of each from the same arrays (check_jax)
                    "jax_check_rel_diff": check,
                    "jax_check_ok": None if check is None else check <= JAX_CHECK_TOL[dtype],
                })
                print_row(records[-1])
    return records


def print_header() -> None:
    print(f"{'n':>5} {'d_in':>5} {'d_out':>5} {'r':>3} {'dtype':>8} {'loss':>4} "
          f"{'minilora ms':>12} {'torch ms':>10} {'jax ms':>9} {'floor ms':>9} {'mini/floor':>10} "
          f"{'mini/torch':>10} {'mini/jax':>8} {'xW^T torch/numpy':>16} {'xW^T jax/numpy':>14} "
          f"{'jax check':>9}")


def print_row(rec: dict) -> None:
    def ms(key: str) -> str:
        return "-" if rec.get(key) is None else f"{rec[key] * 1e3:.3f}"

    def ratio(num: str, den: str) -> str:
        return "-" if rec.get(num) is None or rec.get(den) is None else f"{rec[num] / rec[den]:.2f}"

    check = "-" if rec.get("jax_check_rel_diff") is None else (
        f"{rec['jax_check_rel_diff']:.0e}" + ("" if rec["jax_check_ok"] else " FAIL"))
    print(f"{rec['n']:>5} {rec['d_in']:>5} {rec['d_out']:>5} {rec['r']:>3} {rec['dtype']:>8} {rec['loss']:>4} "
          f"{rec['minilora_s'] * 1e3:>12.3f} {ms('torch_s'):>10} {ms('jax_s'):>9} {rec['floor_s'] * 1e3:>9.3f} "
          f"{rec['minilora_s'] / rec['floor_s']:>10.2f} {ratio('minilora_s', 'torch_s'):>10} "
          f"{ratio('minilora_s', 'jax_s'):>8} {ratio('torch_xW_s', 'numpy_xW_s'):>16} "
          f"{ratio('jax_xW_s', 'numpy_xW_s'):>14} {check:>9}", flush=True)


def environment(torch: Any, jx: Any = None) -> dict:
    env = {
        "python": platform.python_version(), "numpy": np.__version__, "minilora": ml.__version__,
        "torch": getattr(torch, "__version__", None),
        "jax": None if jx is None else jx.jax.__version__, "optax": None if jx is None else jx.optax.__version__,
        "machine": platform.machine(),
        "cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
    }
    try:
        from threadpoolctl import threadpool_info

        env["blas"] = [{k: i.get(k) for k in ("internal_api", "version", "num_threads", "architecture")}
                       for i in threadpool_info()]
    except ImportError:
        pass
    if torch is not None:
        env["torch_threads"] = torch.get_num_threads()
    return env


def parse_shapes(p: argparse.ArgumentParser, values: list[str]) -> list[tuple[int, ...]]:
    """--shapes NxDINxDOUTxR ... as tuples of four positive integers, or the parser's error."""
    try:
        shapes = [tuple(int(v) for v in s.split("x")) for s in values]
        if all(len(s) == 4 and min(s) > 0 for s in shapes):
            return shapes
    except ValueError:
        pass
    p.error(f"--shapes takes N x D_IN x D_OUT x R with positive integers, e.g. 256x1024x1024x8; "
            f"got {' '.join(values)}")
    raise AssertionError("unreachable: p.error exits")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="two shapes, shorter blocks (under a minute)")
    p.add_argument("--json", metavar="PATH", help="write one record per case")
    p.add_argument("--repeat", type=int, default=3, help="at least this many calls per block (default 3)")
    p.add_argument("--plot", metavar="PATH", help="also draw step time against case as a PNG (matplotlib)")
    p.add_argument("--plot-from", metavar="JSON", help="only draw --plot from a JSON this script wrote")
    p.add_argument("--shapes", nargs="+", metavar="NxDINxDOUTxR",
                   help="run these shapes instead, e.g. 256x1024x1024x8")
    args = p.parse_args(argv)
    try:
        import torch

        torch.set_num_threads(os.cpu_count() or 1)  # the same threads as NumPy's BLAS
    except ImportError:
        torch = None
        print("note: torch is not installed; the torch column is skipped (pip install -e '.[compare]')")
    jx = None if args.plot_from else import_jax()
    if jx is None and not args.plot_from:
        print(JAX_NOTE)
    if args.plot_from:
        if not args.plot:
            p.error("--plot-from needs --plot PATH")
        with open(args.plot_from) as fh:
            plot(json.load(fh), args.plot)
        return 0
    shapes = QUICK_SHAPES if args.quick else SHAPES
    if args.shapes:
        shapes = parse_shapes(p, args.shapes)
    global CYCLES, BLOCK_S
    if args.quick:
        CYCLES, BLOCK_S = 2, 0.2
    repeat = args.repeat
    print_header()
    records = run(shapes, repeat, torch, jx)
    if args.json:
        env = environment(torch, jx)
        with atomic_open(args.json, "w") as fh:
            json.dump([{**rec, "environment": env} for rec in records], fh, indent=1)
        print(f"wrote {args.json}")
    if args.plot:
        plot(records, args.plot)
    if any(r["jax_check_ok"] is False for r in records):
        print("FAIL: JAX's step disagrees with minilora's beyond JAX_CHECK_TOL (the jax check column)")
        return 1
    return 0


def plot(records: list[dict], path: str) -> None:
    """Step time per case for the contenders, log scale, written atomically."""
    labels = [f"{r['n']}x{r['d_in']}x{r['d_out']}x{r['r']} f{r['dtype'][5:]} {r['loss']}" for r in records]
    xs = np.arange(len(records))
    fig, ax = pyplot().subplots(figsize=(max(8, 0.7 * len(records)), 5))
    series = [("floor_s", "BLAS floor"), ("minilora_s", "minilora"), ("torch_s", "torch"), ("jax_s", "jax (jit)")]
    series = [s for s in series if any(r.get(s[0]) for r in records)]
    width = 0.8 / len(series)
    for i, (key, name) in enumerate(series):
        vals = [r[key] * 1e3 if r.get(key) else np.nan for r in records]
        ax.bar(xs + (i - (len(series) - 1) / 2) * width, vals, width=width, label=name)
    ax.set_yscale("log")
    ax.set_ylabel("one training step (ms)")
    ax.set_xticks(xs, labels, fontsize=7, rotation=35, ha="right")
    ax.legend()
    ax.set_title("LoRA training step: minilora, PyTorch eager, JAX jit (CPU) and the matrix products alone")
    fig.tight_layout()
    save_png(fig, path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    raise SystemExit(main())
