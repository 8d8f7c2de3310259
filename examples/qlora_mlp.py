"""QLoRA on a small MLP: NF4 base weights (double-quantized), LoRA on top, trained with ``fit``.

    python examples/qlora_mlp.py [--steps 400] [--plot qlora.png]

A "pretrained" two-layer MLP (64 -> 128 -> 8, tanh) is stored in NF4. The new task is the same
network with a rank-2 change in its first layer. LoRA (rank 4) is trained on top of the NF4
weights and, for comparison, on top of the float64 originals.
"""

from __future__ import annotations

import argparse
import sys

import autograd.numpy as anp
import numpy as np

import minilora as ml
from minilora.study.nf4 import nf4_bits_per_param, nf4_dequantize, nf4_nbytes
from minilora.study.plots import pyplot, save_png  # matplotlib on Agg; atomic PNG writes
from minilora.study.qlora import qlora_dense, qlora_quantize

D_IN, HIDDEN, D_OUT, RANK = 64, 128, 8, 4


def mlp(base: dict, lora: dict, x: np.ndarray, quantized: bool) -> np.ndarray:
    layer = qlora_dense if quantized else ml.lora_dense
    h = anp.tanh(layer(base["l1"], lora["l1"], x))
    return layer(base["l2"], lora["l2"], h)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--plot", metavar="PATH", help="loss curves as a PNG (needs matplotlib)")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    base = {"l1": ml.dense_init(rng, D_IN, HIDDEN), "l2": ml.dense_init(rng, HIDDEN, D_OUT)}
    change = 0.3 * rng.standard_normal((HIDDEN, 2)) @ rng.standard_normal((2, D_IN)) / np.sqrt(D_IN)
    target_net = {"l1": {**base["l1"], "W": base["l1"]["W"] + change}, "l2": base["l2"]}
    x = rng.standard_normal((512, D_IN))
    zero = {k: {"A": np.zeros((1, p["W"].shape[1])), "B": np.zeros((p["W"].shape[0], 1))} for k, p in base.items()}
    y = mlp(target_net, zero, x, quantized=False)

    qbase = {k: qlora_quantize(p, blocksize=64, double_quant=True) for k, p in base.items()}
    for k in base:
        W, Wq = base[k]["W"], nf4_dequantize(qbase[k]["W"], dtype="float64")
        rel = np.linalg.norm(Wq - W) / np.linalg.norm(W)
        print(f"layer {k}: W {W.shape} in NF4, relative error {rel:.4f}; "
              f"{W.size * 8} bytes as float64 -> {nf4_nbytes(qbase[k]['W'])} bytes")
    print(f"NF4 with double quantization stores {nf4_bits_per_param(64, double_quant=True):.3f} bits per weight")

    lora0 = {k: ml.lora_init(rng, p["W"].shape[1], p["W"].shape[0], RANK) for k, p in base.items()}
    curves = {}
    for quantized, frozen in ((True, qbase), (False, base)):
        def loss(lora: dict, frozen: dict, x: np.ndarray, y: np.ndarray, quantized: bool = quantized) -> np.ndarray:
            return ml.mse_loss(mlp(frozen, lora, x, quantized), y)

        lora, losses = ml.fit(loss, lora0, (frozen, x, y), steps=args.steps, lr=1e-2)
        name = "QLoRA (NF4 base)" if quantized else "LoRA (float64 base)"
        curves[name] = losses
        print(f"{name:<20} loss {losses[0]:.4g} -> {losses[-1]:.4g} after {args.steps} steps, "
              f"{ml.count_params(lora)} trainable parameters")

    if args.plot:
        try:
            plt = pyplot()
        except ImportError:
            print("--plot needs matplotlib: pip install 'minilora[plot]'", file=sys.stderr)
            return 1
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, losses in curves.items():
            ax.semilogy(np.arange(1, len(losses) + 1), losses, label=f"{name}: final {losses[-1]:.2g}")
        ax.set_xlabel("Adam step")
        ax.set_ylabel("mean squared error")
        ax.set_title("rank-4 LoRA on an NF4 vs a float64 MLP")
        ax.legend()
        fig.tight_layout()
        save_png(fig, args.plot)
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
