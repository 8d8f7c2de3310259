"""minilora: a reference implementation of LoRA in NumPy, with autograd gradients.

    y = x W^T + b + s * (x A^T) B^T,    s = alpha / r   (Hu et al. 2021, arXiv 2106.09685)

Parameters are plain dicts of arrays; freezing is choosing which argument to differentiate.
"""

from __future__ import annotations

from .backend import Backend, get_backend, set_backend, to_backend, to_numpy, use_backend
from .errors import (
    BackendUnavailableError,
    MiniLoraError,
    MiniLoraTypeError,
    MiniLoraValueError,
    NonFiniteError,
    ShapeError,
)
from .layers import (
    delta_weight,
    dense,
    dense_init,
    dropout_mask,
    lora_dense,
    lora_init,
    lora_scale,
    merge,
    unmerge,
)
from .losses import l1_loss, mse_loss
from .optim import adam_init, adam_step
from .train import count_params, fit, grad, value_and_grad

# study tools (scipy, matplotlib and dask are imported inside the functions that need them)
from .nf4 import nf4_code, nf4_dequantize, nf4_quantize, qlora_dense, qlora_quantize
from .param_calc import lora_param_count, memory_estimate, transformer_param_count
from .subspace import subspace_similarity, subspace_similarity_grid

__version__ = "0.1.0"

__all__ = [
    "__version__",
    # backend
    "Backend",
    "get_backend",
    "set_backend",
    "use_backend",
    "to_backend",
    "to_numpy",
    # layers
    "dense_init",
    "dense",
    "lora_init",
    "lora_scale",
    "lora_dense",
    "dropout_mask",
    "delta_weight",
    "merge",
    "unmerge",
    # losses and optimizer
    "l1_loss",
    "mse_loss",
    "adam_init",
    "adam_step",
    # training
    "grad",
    "value_and_grad",
    "count_params",
    "fit",
    # study tools: QLoRA's NF4, subspace similarity, parameter and memory counts
    "nf4_code",
    "nf4_quantize",
    "nf4_dequantize",
    "qlora_quantize",
    "qlora_dense",
    "subspace_similarity",
    "subspace_similarity_grid",
    "lora_param_count",
    "transformer_param_count",
    "memory_estimate",
    # errors
    "MiniLoraError",
    "MiniLoraValueError",
    "MiniLoraTypeError",
    "ShapeError",
    "NonFiniteError",
    "BackendUnavailableError",
]
