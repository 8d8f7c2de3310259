"""The seed experiment, step by step: the arrays, one gradient, the Adam loop, the merge.

    python examples/seed_step_by_step.py [--steps 1000] [--plot seed.png]

A frozen W = I(100), a target whose column i is scaled by i, 32 inputs x ~ U(0, 1), rank-4 LoRA,
mean L1 loss, Adam lr 1e-2 (the blog post this project started from; see ``minilora.study.seed``).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

import minilora as ml
from minilora.study.plots import pyplot, save_png  # matplotlib on Agg; atomic PNG writes
from minilora.study.seed import seed_problem


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--plot", metavar="PATH", help="write the loss curve as a PNG (needs matplotlib)")
    args = parser.parse_args(argv)

    # 1. The arrays. The blog stores W as (d_in, d_out) and computes x @ W: fan_in_fan_out=True.
    p = seed_problem(0, d=100, rank=args.rank)
    W, A, B = p["frozen"]["W"], p["lora"]["A"], p["lora"]["B"]
    print(f"1. frozen W {W.shape}: {ml.count_params(p['frozen'])} parameters, not trained")
    print(f"   LoRA A {A.shape} (all zero: the blog's W_B^T), B {B.shape} (N(0, 1): W_A^T): "
          f"{ml.count_params(p['lora'])} trainable parameters")
    print(f"   x {p['x'].shape}, target = x @ W_finetuned {p['target'].shape}")

    scale = ml.lora_scale(alpha=args.rank, rank=args.rank)  # alpha = r, so s = 1

    def loss(lora: dict, frozen: dict, x: np.ndarray, target: np.ndarray) -> np.ndarray:
        y = ml.lora_dense(frozen, lora, x, scale=scale, fan_in_fan_out=True)  # x W + s (x A^T) B^T
        return ml.l1_loss(y, target)

    # 2. One gradient. B multiplies A's output, which is zero: at the start only A gets a gradient.
    value, g = ml.value_and_grad(loss)(p["lora"], p["frozen"], p["x"], p["target"])
    print(f"2. first loss {float(value):.6f}; |dL/dA| = {np.linalg.norm(g['A']):.4f}, "
          f"|dL/dB| = {np.linalg.norm(g['B']):.4f} (zero: A = 0 blocks B's gradient)")

    # 3. The Adam loop, by hand (ml.fit does exactly this).
    lora, state, losses = p["lora"], ml.adam_init(p["lora"]), []
    for step in range(1, args.steps + 1):
        value, g = ml.value_and_grad(loss)(lora, p["frozen"], p["x"], p["target"])
        losses.append(float(value))
        lora, state = ml.adam_step(lora, g, state, lr=1e-2)
        if step in (1, 10, 100) or step % 250 == 0 or step == args.steps:
            print(f"3. step {step:>5}  loss {losses[-1]:12.6f}")

    # 4. Merge: W' = W + s (B A)^T, then a plain dense layer gives the same output.
    merged = ml.merge(p["frozen"], lora, scale=scale, fan_in_fan_out=True)
    same = np.allclose(ml.dense(merged, p["x"], fan_in_fan_out=True),
                       ml.lora_dense(p["frozen"], lora, p["x"], scale=scale, fan_in_fan_out=True))
    err = np.linalg.norm(merged["W"] - p["W_finetuned"]) / np.linalg.norm(p["W_finetuned"])
    print(f"4. merged W vs W_finetuned: relative Frobenius error {err:.6f}; "
          f"merged dense == LoRA forward: {same}")

    if args.plot:
        try:
            plt = pyplot()
        except ImportError:
            print("--plot needs matplotlib: pip install 'minilora[plot]'", file=sys.stderr)
            return 1
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.semilogy(np.arange(1, len(losses) + 1), losses)
        ax.set_xlabel("Adam step")
        ax.set_ylabel("mean L1 loss")
        ax.set_title(f"seed experiment, rank {args.rank}: final loss {losses[-1]:.3g}")
        fig.tight_layout()
        save_png(fig, args.plot)
        print(f"   loss curve: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
