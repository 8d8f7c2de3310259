"""LoRA variants that PEFT ships, as pure functions over the core's layers and primitives.

    dora        DoRA: y = x W^T + b + (c - 1)(dropout(x) W^T) + c s (dropout(x) A^T) B^T,
                c = m / ||W + s B A||_row (detached)      (Liu et al. 2024; PEFT tuners/lora/dora.py)
    embedding   y = W[ids] + s A^T[ids] B^T, A (r, num), B (dim, r)   (PEFT lora.Embedding, loralib)
    lora_bias   y = lora_dense(...) + s b_B                            (PEFT ``lora_bias=True``)
    inits       PiSSA (SVD), OLoRA (QR), "orthogonal"; each returns (lora, adjusted base W)
    loraplus    LoRA+ learning rates (B's larger than A's) and Adam with per-leaf rates
    primitives  the DoRA and embedding autograd primitives with their VJPs and JVPs

Shapes as in ``minilora.layers``: W (d_out, d_in) [fan_in_fan_out: (d_in, d_out)], A (r, d_in),
B (d_out, r), m (d_out,). Float64 throughout unless the inputs are float32.
"""

from __future__ import annotations

from minilora.variants.dora import dora_dense, dora_magnitude, dora_merge, dora_unmerge
from minilora.variants.embedding import (
    embedding_delta,
    embedding_lora_init,
    embedding_merge,
    embedding_unmerge,
    lora_embedding,
)
from minilora.variants.inits import olora_init, orthogonal_init, pissa_init, randomized_svd
from minilora.variants.lora_bias import lora_bias_dense, lora_bias_merge
from minilora.variants.loraplus import adam_step_lrs, loraplus_lrs

__all__ = [
    "dora_magnitude",
    "dora_dense",
    "dora_merge",
    "dora_unmerge",
    "lora_bias_dense",
    "lora_bias_merge",
    "embedding_lora_init",
    "lora_embedding",
    "embedding_delta",
    "embedding_merge",
    "embedding_unmerge",
    "pissa_init",
    "olora_init",
    "orthogonal_init",
    "randomized_svd",
    "loraplus_lrs",
    "adam_step_lrs",
]
