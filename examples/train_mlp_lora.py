"""Fine-tune a small MLP with LoRA on every hidden layer ("all-linear"), NumPy only.

The task: a "pretrained" MLP (random weights) must learn to imitate a "fine-tuned" teacher whose
hidden weights differ from it by rank-2 updates. LoRA (rank 2, alpha 4) trains only the
adapter factors and the adapted layers' biases (PEFT's bias="lora_only"); the base weights stay
frozen. At the end the adapters are merged and the merged model gives the same outputs.

    python examples/train_mlp_lora.py [--steps 600] [--seed 0]
"""

from __future__ import annotations

import argparse

import numpy as np

import minilora as ml
from minilora.peft import models as M


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)

    sizes = (16, 32, 32, 4)
    base = M.mlp_init(rng, sizes)
    teacher = {name: dict(layer) for name, layer in base.items()}
    for name in ("layers.0", "layers.1"):  # the teacher's hidden layers differ by rank-2 updates
        d_out, d_in = base[name]["W"].shape
        teacher[name]["W"] = base[name]["W"] + 0.3 * rng.standard_normal((d_out, 2)) @ rng.standard_normal((2, d_in)) / np.sqrt(d_in)
    x = rng.standard_normal((256, sizes[0]))
    y = M.mlp_forward(teacher, x)

    params = M.add_lora(base, "all-linear", 2, 4, rng=rng)  # "head", the output layer, is left out
    trainable, frozen = M.split_trainable(params, bias="lora_only")
    print(f"targets {sorted(M.lora_state(params))}; trainable {ml.count_params(trainable)} of "
          f"{ml.count_params(base) + ml.count_params(M.lora_state(params))} parameters")

    def loss(t: dict, f: dict) -> float:
        return ml.mse_loss(M.mlp_forward(M.join(t, f), x), y)

    trainable, losses = ml.fit(loss, trainable, (frozen,), steps=args.steps, lr=1e-2)
    print(f"loss {losses[0]:.4g} -> {losses[-1]:.4g} after {args.steps} Adam steps")
    tuned = M.join(trainable, frozen)
    merged = M.merge_all(tuned, unload=True)
    same = np.allclose(M.mlp_forward(merged, x), M.mlp_forward(tuned, x), rtol=0, atol=1e-12)
    print(f"merged forward == LoRA forward: {same}")


if __name__ == "__main__":
    main()
