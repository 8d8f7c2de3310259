"""Trainable parameters and training memory of LoRA on a transformer (Hu et al. 2021, section 4.2).

    LoRA on a projection W (d_out, d_in) at rank r adds A (r, d_in) and B (d_out, r):
        r * (d_in + d_out) parameters; summed over the chosen projections and the layers.

Projections of one layer with model width d and feed-forward width d_ff (default 4 d):
    q, k, v, o (attention): (d, d);   up (d_ff, d);   down (d, d_ff)

The paper's figures follow from it: RoBERTa-base r=8 on Wq, Wv: 12 * 2 * 8 * (768 + 768) = 294,912
(Table 2, "0.3M"); DeBERTa-XXL r=16: 48 * 2 * 16 * (1536 + 1536) = 4,718,592 ("4.7M"); GPT-3 r=1
on Wq, Wv: 96 * 2 * 1 * (12288 + 12288) = 4,718,592 ("4.7M", Table 4). The GPT-2 rows do not:
Table 3 gives 0.35M (GPT-2 M) and 0.77M (GPT-2 L) for r=4 on Wq, Wv (Appendix D), but the
formula gives 24 * 2 * 4 * 2048 = 393,216 and 36 * 2 * 4 * 2560 = 737,280.

Memory counts bytes of weights, gradients and Adam's two moments (activations, buffers and
framework overhead are not counted): full fine-tuning keeps all three for every parameter; LoRA
keeps the frozen weights (optionally in NF4, QLoRA) and all three for the LoRA parameters only.
"""

from __future__ import annotations

import numbers
from typing import Any

from minilora._checks import check_choice, check_rank
from minilora.errors import MiniLoraTypeError, MiniLoraValueError

__all__ = [
    "MODELS",
    "PROJECTIONS",
    "projection_shapes",
    "lora_param_count",
    "transformer_param_count",
    "memory_estimate",
]

PROJECTIONS = ("q", "k", "v", "o", "up", "down")

# Published sizes (d_model, layers, d_ff, vocabulary, positions) of the models in the paper's tables.
MODELS: dict[str, dict[str, int]] = {
    "roberta-base": {"d_model": 768, "n_layers": 12, "d_ff": 3072, "vocab": 50265, "positions": 514},
    "roberta-large": {"d_model": 1024, "n_layers": 24, "d_ff": 4096, "vocab": 50265, "positions": 514},
    "deberta-xxlarge": {"d_model": 1536, "n_layers": 48, "d_ff": 6144, "vocab": 128100, "positions": 512},
    "gpt2-medium": {"d_model": 1024, "n_layers": 24, "d_ff": 4096, "vocab": 50257, "positions": 1024},
    "gpt2-large": {"d_model": 1280, "n_layers": 36, "d_ff": 5120, "vocab": 50257, "positions": 1024},
    "gpt3-175b": {"d_model": 12288, "n_layers": 96, "d_ff": 49152, "vocab": 50257, "positions": 2048},
}

DTYPE_BYTES = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}
FROZEN_FORMATS = ("same", "nf4", "nf4-dq")


def projection_shapes(d_model: int, d_ff: int | None = None) -> dict[str, tuple[int, int]]:
    """{name: (d_out, d_in)} for the projections of one layer."""
    d = check_rank(d_model, "d_model")
    f = 4 * d if d_ff is None else check_rank(d_ff, "d_ff")
    return {"q": (d, d), "k": (d, d), "v": (d, d), "o": (d, d), "up": (f, d), "down": (d, f)}


def _targets(targets: Any, rank: int | None) -> dict[str, int]:
    """{projection: rank} from a dict, or from a list of names and one ``rank``."""
    if isinstance(targets, dict):
        items = list(targets.items())
    elif isinstance(targets, (list, tuple)):
        if rank is None:
            raise MiniLoraValueError("rank is required when targets is a list of projection names")
        items = [(t, rank) for t in targets]
    else:
        raise MiniLoraTypeError(f"targets must be a dict {{projection: rank}} or a list of names; got {type(targets).__name__}")
    if not items:
        raise MiniLoraValueError(f"targets must name at least one projection of {', '.join(PROJECTIONS)}")
    out: dict[str, int] = {}
    for name, r in items:
        check_choice(name, "target projection", PROJECTIONS)
        if name in out:
            raise MiniLoraValueError(f"target projection {name!r} is given twice")
        if isinstance(r, bool) or not isinstance(r, numbers.Integral) or r <= 0:
            raise MiniLoraValueError(f"the rank of {name!r} must be a positive integer; got {r!r}")
        out[name] = int(r)
    return out


def lora_param_count(d_model: int, n_layers: int, targets: Any, *, rank: int | None = None,
                     d_ff: int | None = None) -> int:
    """sum over layers and target projections of r * (d_in + d_out).

    targets: {"q": 8, "v": 8}, or ["q", "v"] with ``rank=8``.
    """
    n_layers = check_rank(n_layers, "n_layers")
    shapes = projection_shapes(d_model, d_ff)
    per_layer = sum(r * sum(shapes[name]) for name, r in _targets(targets, rank).items())
    return n_layers * per_layer


def transformer_param_count(d_model: int, n_layers: int, *, d_ff: int | None = None, vocab: int = 0,
                            positions: int = 0) -> int:
    """Parameters of a GPT-2/BERT-style transformer: per layer 4 (d^2 + d) attention weights
    and biases, 2 d d_ff + d_ff + d for the feed-forward block, 4 d for two layer norms; plus
    token and position embeddings (vocab + positions) d and a final layer norm 2 d. An estimate
    for architectures that differ in detail (DeBERTa's relative-position weights, tied heads)."""
    d = check_rank(d_model, "d_model")
    n_layers = check_rank(n_layers, "n_layers")
    f = 4 * d if d_ff is None else check_rank(d_ff, "d_ff")
    for value, name in ((vocab, "vocab"), (positions, "positions")):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
            raise MiniLoraValueError(f"{name} must be an integer >= 0; got {value!r}")
    per_layer = 4 * (d * d + d) + (2 * d * f + f + d) + 4 * d
    return n_layers * per_layer + (vocab + positions) * d + 2 * d


def memory_estimate(total_params: int, lora_params: int, *, dtype: str = "float32",
                    optimizer_dtype: str = "float32", frozen: str = "same",
                    nf4_blocksize: int = 64) -> dict:
    """Bytes for full fine-tuning vs LoRA with Adam.

    full: weights + gradients at ``dtype``, two Adam moments at ``optimizer_dtype``, for all
    ``total_params``. lora: the frozen weights (``frozen``: "same" = ``dtype``, "nf4" = 4 +
    32/blocksize bits, "nf4-dq" = with double quantization), plus weights, gradients and moments
    of the ``lora_params``. Returns {"full": {...}, "lora": {...}} with keys weights, gradients,
    adam, total (bytes).
    """
    for value, name in ((total_params, "total_params"), (lora_params, "lora_params")):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
            raise MiniLoraValueError(f"{name} must be an integer >= 0; got {value!r}")
    check_choice(dtype, "dtype", tuple(DTYPE_BYTES))
    check_choice(optimizer_dtype, "optimizer_dtype", tuple(DTYPE_BYTES))
    check_choice(frozen, "frozen", FROZEN_FORMATS)
    b, ob = DTYPE_BYTES[dtype], DTYPE_BYTES[optimizer_dtype]
    frozen_bytes: float
    if frozen == "same":
        frozen_bytes = total_params * b
    else:
        from minilora.study.nf4 import nf4_bits_per_param

        bits = nf4_bits_per_param(nf4_blocksize, double_quant=frozen == "nf4-dq")
        frozen_bytes = total_params * bits / 8
    full: dict[str, float] = {"weights": total_params * b, "gradients": total_params * b, "adam": 2 * total_params * ob}
    lora = {"weights": frozen_bytes + lora_params * b, "gradients": lora_params * b, "adam": 2 * lora_params * ob}
    for part in (full, lora):
        part["total"] = part["weights"] + part["gradients"] + part["adam"]
    return {"full": full, "lora": lora}
