"""Several named LoRA adapters on one model (``models``), and combining them into one, as PEFT's
``LoraModel.add_weighted_adapter`` defines it (PEFT ``tuners/lora/model.py``).

Adapters live side by side in each layer: ``layer["lora"][name] = {"A", "B"}``,
``layer["scale"][name] = s``. ``models.layer_forward(..., adapters=["a", "b"])`` runs several at
once (PEFT ``set_adapter([...])``: the outputs add), ``{"a": 0.7, "b": 0.3}`` weights them.

``combine_adapters`` builds a new adapter with scale 1 (PEFT sets r = lora_alpha = new rank), per
layer, from the adapters i present there, with c_i = w_i s_i:

    cat     A = [c_1 A_1; c_2 A_2; ...] (sum r_i, d_in),  B = [B_1, B_2, ...]:  Delta = sum c_i B_i A_i
            exactly
    linear  A = sum sign(c_i) sqrt|c_i| A_i,  B = sum sqrt|c_i| B_i (equal ranks): the factors are
            averaged, so Delta has cross terms B_i A_j; PEFT's definition, kept as is
    svd     Delta = sum c_i B_i A_i, truncated to rank k by the SVD U S V^T: B = U_k S_k, A = V_k^T
            (k = svd_rank, default the largest source rank); optional ``svd_clamp`` quantile clamp

Where PEFT differs (``peft_weighted_delta`` reproduces each, ``tests/peft/test_multi_adapter.py``
pins it against the installed PEFT):

- svd in PEFT <= 0.20.0 multiplied each weight by the adapter scale *and* used
  ``get_delta_weight``, which already carries it: Delta = sum w_i s_i^2 B_i A_i. Fixed in 0.21.0
  (huggingface/peft#3111).
- With ``use_rslora`` on the first source adapter, every release up to 0.21.2 gives the new
  adapter the scale alpha / sqrt(r) = sqrt(k) instead of 1 (the config is copied with
  ``use_rslora`` left on), so Delta is sqrt(k) times too large for all three methods (k = the new
  rank: sum of ranks for cat). Fixed after 0.21.2 (huggingface/peft#3449).

- In every release the linear coefficients sqrt|w_i s_i| and the svd weights w_i pass through
  a float32 ``torch.tensor``: float64 adapters combine with float32-rounded coefficients
  (relative differences ~1e-8 unless the numbers are exact in float32).

minilora computes the intended result: Delta = sum w_i s_i B_i A_i (cat, svd) with scale 1.
Host NumPy only (the SVD runs there).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from minilora._checks import check_choice, check_floats, check_real, get_key
from minilora.errors import MiniLoraTypeError, MiniLoraValueError
from minilora.layers import lora_factors
from minilora.peft.models import adapter_names, add_lora

__all__ = ["METHODS", "add_adapter", "combine_adapters", "combine_factors", "delete_adapter", "peft_weighted_delta"]

METHODS = ("cat", "linear", "svd")


def add_adapter(params: dict, name: str, targets: Any, rank: int, alpha: float, **options: Any) -> dict:
    """A further adapter ``name`` (PEFT ``add_adapter``): ``models.add_lora`` with adapter=name."""
    return add_lora(params, targets, rank, alpha, adapter=name, **options)


def delete_adapter(params: dict, name: str) -> dict:
    """New params without adapter ``name`` (PEFT ``delete_adapter``); merged copies are refused."""
    if name not in adapter_names(params):
        raise MiniLoraValueError(f"no adapter named {name!r}; adapters are {adapter_names(params)}")
    out = {}
    for module, layer in params.items():
        if isinstance(layer, dict) and name in layer.get("merged", {}):
            raise MiniLoraValueError(f"adapter {name!r} is merged into {module!r}: unmerge it first")
        if isinstance(layer, dict) and name in layer.get("lora", {}):
            layer = {**layer, "lora": {k: v for k, v in layer["lora"].items() if k != name},
                     "scale": {k: v for k, v in layer["scale"].items() if k != name}}
        out[module] = layer
    return out


def combine_factors(factors: list[dict], scales: list[float], weights: list[float], method: str = "svd", *,
                    svd_rank: int | None = None, svd_clamp: float | None = None, _round: Any = float) -> dict:
    """One layer's combined adapter {"A", "B"} (scale 1) from source factors [{"A": (r_i, d_in),
    "B": (d_out, r_i)}], their scales s_i and weights w_i (equations in the module docstring)."""
    check_choice(method, "method", METHODS)
    for what, seq in (("factors", factors), ("scales", scales), ("weights", weights)):
        if not isinstance(seq, list | tuple):
            raise MiniLoraTypeError(f"{what} must be a list; got {type(seq).__name__}")
    if not factors or not (len(factors) == len(scales) == len(weights)):
        raise MiniLoraValueError(f"need as many scales and weights as factors (>= 1); got "
                                 f"{len(factors)}, {len(scales)}, {len(weights)}")
    scales = [check_real(s, f"scales[{i}]") for i, s in enumerate(scales)]
    weights = [check_real(w, f"weights[{i}]") for i, w in enumerate(weights)]
    for i, f in enumerate(factors):
        A, B = lora_factors(f, getattr(get_key(f, "A", f"factors[{i}]"), "shape", (0, 0))[-1],
                            getattr(get_key(f, "B", f"factors[{i}]"), "shape", (0, 0))[0])
        check_floats(A=A, B=B)
    As = [np.asarray(f["A"], dtype=np.float64) for f in factors]
    Bs = [np.asarray(f["B"], dtype=np.float64) for f in factors]
    c = [float(w) * float(s) for w, s in zip(weights, scales, strict=True)]
    if method == "cat":
        return {"A": np.concatenate([ci * A for ci, A in zip(c, As, strict=True)], axis=0), "B": np.concatenate(Bs, axis=1)}
    if method == "linear":
        ranks = {A.shape[0] for A in As}
        if len(ranks) != 1:
            raise MiniLoraValueError(f"method='linear' needs adapters of equal rank; got ranks {sorted(ranks)}")
        root = [_round(math.sqrt(abs(ci))) for ci in c]
        return {"A": sum(math.copysign(r, ci) * A for r, ci, A in zip(root, c, As, strict=True)),
                "B": sum(r * B for r, B in zip(root, Bs, strict=True))}
    c = [_round(float(w)) * float(s) for w, s in zip(weights, scales, strict=True)]  # s: in get_delta_weight
    delta = sum(ci * (B @ A) for ci, A, B in zip(c, As, Bs, strict=True))  # (d_out, d_in)
    k = max(A.shape[0] for A in As) if svd_rank is None else int(svd_rank)
    U, S, Vh = np.linalg.svd(delta, full_matrices=False)
    B, A = U[:, :k] * S[:k], Vh[:k]
    if svd_clamp is not None:
        hi = np.quantile(np.concatenate([B.ravel(), A.ravel()]), svd_clamp)
        B, A = np.clip(B, -hi, hi), np.clip(A, -hi, hi)
    return {"A": A, "B": B}


def combine_adapters(params: dict, adapters: list[str], weights: list[float], new_name: str, method: str = "svd",
                     *, svd_rank: int | None = None, svd_clamp: float | None = None) -> dict:
    """New params with adapter ``new_name`` = the weighted combination of ``adapters`` in every
    layer that has at least one of them (PEFT ``add_weighted_adapter(adapters, weights,
    new_name, combination_type=method)``), scale 1. With one source adapter every method is
    "linear" (as in PEFT). svd_rank defaults to the largest rank of any source adapter."""
    check_choice(method, "method", METHODS)
    for what, seq in (("adapters", adapters), ("weights", weights)):
        if not isinstance(seq, list | tuple):
            raise MiniLoraTypeError(f"{what} must be a list; got {type(seq).__name__}")
    weights = [check_real(w, f"weights[{i}]") for i, w in enumerate(weights)]
    if not isinstance(new_name, str) or not new_name:
        raise MiniLoraTypeError(f"new_name must be a non-empty str; got {new_name!r}")
    if len(adapters) != len(weights) or not adapters:
        raise MiniLoraValueError(f"adapters and weights must be non-empty and of equal length; got "
                                 f"{len(adapters)} and {len(weights)}")
    known = adapter_names(params)
    missing = [a for a in adapters if a not in known]
    if missing:
        raise MiniLoraValueError(f"adapters {missing} do not exist; adapters are {known}")
    if new_name in known:
        raise MiniLoraValueError(f"an adapter named {new_name!r} exists already")
    method = "linear" if len(adapters) == 1 else method
    ranks = {layer["lora"][a]["A"].shape[0] for layer in params.values() if isinstance(layer, dict)
             for a in adapters if a in layer.get("lora", {})}
    if method == "linear" and len(ranks) > 1:  # PEFT checks this across the adapters' configs
        raise MiniLoraValueError(f"method='linear' needs adapters of equal rank; got ranks {sorted(ranks)}")
    if method == "svd" and svd_rank is None:
        svd_rank = max(ranks)
    out = {}
    for module, layer in params.items():
        present = [(a, w) for a, w in zip(adapters, weights, strict=True) if isinstance(layer, dict) and a in layer.get("lora", {})]
        if not present:
            out[module] = layer
            continue
        new = combine_factors([layer["lora"][a] for a, _ in present], [layer["scale"][a] for a, _ in present],
                              [w for _, w in present], method, svd_rank=svd_rank, svd_clamp=svd_clamp)
        dt = layer["W"].dtype
        out[module] = {**layer, "lora": {**layer["lora"], new_name: {k: v.astype(dt) for k, v in new.items()}},
                       "scale": {**layer["scale"], new_name: 1.0}}
    return out


def _version(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in v.split("+")[0].split(".")[:3] if p.isdigit())


def peft_weighted_delta(factors: list[dict], scales: list[float], weights: list[float], method: str, *,
                        new_rank: int, use_rslora: bool, peft_version: str) -> np.ndarray:
    """The Delta W (d_out, d_in) that PEFT ``peft_version``'s ``add_weighted_adapter`` produces for
    one layer (defects included, see the module docstring); ``new_rank``: PEFT's rank of the new
    adapter (sum of config ranks for cat, svd_rank or the largest config rank for svd).
    Only for pinning PEFT's behaviour in tests; use ``combine_adapters`` for the intended result."""
    v = _version(peft_version)
    k = new_rank if method == "svd" else None
    if method == "svd" and v < (0, 21, 0):  # the scale entered twice: float32(w s) times s
        weights = [float(np.float32(w * s)) for w, s in zip(weights, scales, strict=True)]
    # PEFT holds the linear coefficients sqrt|w s| and the svd weights w in ``torch.tensor(...)``,
    # float32 by default, so they are rounded to float32 even for float64 adapters
    combined = combine_factors(factors, scales, weights, method, svd_rank=k,
                               _round=lambda v: float(np.float32(v)))
    out_scale = math.sqrt(new_rank) if use_rslora and v <= (0, 21, 2) else 1.0
    return out_scale * (combined["B"] @ combined["A"])
