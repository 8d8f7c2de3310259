"""minilora: a reference implementation of LoRA in NumPy, with autograd gradients.

    y = x W^T + b + s * (x A^T) B^T,    s = alpha / r   (Hu et al. 2021, arXiv 2106.09685)

Parameters are plain dicts of arrays; freezing is choosing which argument to differentiate.
"""

from __future__ import annotations

from types import MappingProxyType

from minilora.backend import Backend, get_backend, set_backend, to_backend, to_numpy, use_backend
from minilora.errors import (
    BackendUnavailableError,
    MiniLoraError,
    MiniLoraTypeError,
    MiniLoraValueError,
    NonFiniteError,
    ShapeError,
)
from minilora.layers import (
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
from minilora.losses import l1_loss, mse_loss
from minilora.optim import adam_init, adam_step
from minilora.train import count_params, fit, grad, hvp, value_and_grad

__version__ = "0.1.0"

# The study tools live in minilora.study and are not imported by `import minilora` (which loads the
# core only). Their names stay reachable here, as before, and are imported on first use.
_STUDY_NAMES = MappingProxyType({
    "nf4_code": "minilora.study.nf4",
    "nf4_quantize": "minilora.study.nf4",
    "nf4_dequantize": "minilora.study.nf4",
    "qlora_quantize": "minilora.study.qlora",
    "qlora_dense": "minilora.study.qlora",
    "subspace_similarity": "minilora.study.subspace",
    "subspace_similarity_grid": "minilora.study.subspace",
    "lora_param_count": "minilora.study.param_calc",
    "transformer_param_count": "minilora.study.param_calc",
    "memory_estimate": "minilora.study.param_calc",
})


def __getattr__(name: str) -> object:
    module = _STUDY_NAMES.get(name)
    if module is None:
        raise AttributeError(f"module 'minilora' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_STUDY_NAMES))

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
    "hvp",
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
