"""Small models as flat dicts of named layers, with LoRA put on layers chosen by PEFT's rules.

A model is ``{module name: layer}``, names as Hugging Face modules are named, in forward order:

    MLP        {"layers.0", ..., "layers.{n-1}", "head"}:  h = tanh(layer(h)) ..., y = head(h)
    attention  {"attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.fc1", "mlp.fc2", "head"}:
               h = x + o(softmax(q k^T / sqrt(d_h)) v)   (per head),
               h = h + fc2(tanh(fc1(h))),   y = head(h)

A layer is {"W": (d_out, d_in), "b": (d_out,) optional}; ``add_lora`` adds
``"lora": {adapter name: {"A": (r, d_in), "B": (d_out, r)}}`` and ``"scale": {adapter name: s}``
(a Python float, ``alpha / r`` or ``alpha / sqrt(r)``), the per-adapter state of PEFT's
``LoraLayer`` (``lora_A[name]``, ``lora_B[name]``, ``scaling[name]``). ``merge_all`` moves merged
adapters from "lora" to "merged" (PEFT ``merge``; ``unload=True``: ``merge_and_unload``).

Target selection (``minilora.peft.targets``; PEFT 0.21 ``check_target_module_exists``, ``_maybe_include_all_linear_layers``;
``get_pattern_key`` for ``rank_pattern``/``alpha_pattern``):

    targets a str       "all-linear" (any case): every layer but the output layer; otherwise the
                        name must ``re.fullmatch`` the string
    targets a list/set  the name is an entry, or ends with "." + an entry
    exclude             the same two rules; an excluded name is never a target

PEFT excludes the output layer from "all-linear" only for a ``transformers.PreTrainedModel``
(its ``get_output_embeddings()``); here ``output_layer="auto"`` is the model's last layer.

Training: ``split_trainable`` gives (trainable, frozen) as PEFT's
``_mark_only_adapters_as_trainable`` with ``bias="none"|"all"|"lora_only"``; differentiate the
trainable part only, ``join`` puts the two back together inside the loss.
"""

from __future__ import annotations

import math
from typing import Any

import autograd.numpy as anp
import numpy as np
from autograd.tracer import getval

from minilora._checks import check_bool, check_choice, check_dim, check_rank, check_real, check_rng, get_key
from minilora.errors import MiniLoraTypeError, MiniLoraValueError, ShapeError
from minilora.layers import LORA_INITS, dense, dense_init, lora_dense, lora_init, merge, unmerge
from minilora.ops import tanh
from minilora.peft.targets import is_linear, pattern_value, target_matches, targeted_modules

__all__ = [
    "BIAS_MODES",
    "adapter_names",
    "add_lora",
    "attach_peft_adapter",
    "attention_forward",
    "attention_init",
    "join",
    "layer_forward",
    "lora_state",
    "merge_all",
    "mlp_forward",
    "mlp_init",
    "peft_modules",
    "split_trainable",
    "tanh",
    "target_matches",
    "targeted_modules",
    "unmerge_all",
]

BIAS_MODES = ("none", "all", "lora_only")
INITS = (*LORA_INITS, "pissa", "olora")


# ---------------------------------------------------------------- models


def _model(params: Any, name: str = "params") -> dict:
    """``params`` as a model: a dict of named layers (a list or an array here was an
    AttributeError from ``.items()``)."""
    pv = getval(params)
    if not isinstance(pv, dict):
        raise MiniLoraTypeError(f"{name} must be a model: a dict of named layers; got {type(pv).__name__}")
    return pv


def _layer(layer: Any, name: str = "layer") -> dict:
    lv = getval(layer)
    if not isinstance(lv, dict):
        raise MiniLoraTypeError(f"{name} must be a layer: a dict with 'W' (and 'b', 'lora', ...); got {type(lv).__name__}")
    get_key(lv, "W", name)
    return lv


def mlp_init(rng: Any, sizes: tuple[int, ...] | list[int], *, bias: bool = True, dtype: Any = "float64") -> dict:
    """An MLP with layers "layers.0" ... "layers.{n-2}" and the output layer "head", each like
    ``torch.nn.Linear``. sizes (d_in, hidden..., d_out), at least two entries."""
    rng = check_rng(rng)
    if not isinstance(sizes, list | tuple):
        raise MiniLoraTypeError(f"sizes must be a list of layer widths (d_in, hidden..., d_out); got {type(sizes).__name__}")
    sizes = [check_dim(s, f"sizes[{i}]") for i, s in enumerate(sizes)]
    if len(sizes) < 2:
        raise MiniLoraValueError(f"sizes must have at least two entries (d_in, d_out); got {sizes}")
    names = [f"layers.{i}" for i in range(len(sizes) - 2)] + ["head"]
    return {n: dense_init(rng, sizes[i], sizes[i + 1], bias=bias, dtype=dtype) for i, n in enumerate(names)}


def attention_init(rng: Any, d_model: int, d_out: int, *, d_ff: int | None = None, dtype: Any = "float64") -> dict:
    """One pre-norm-free transformer block and an output layer: q/k/v/o projections (k without bias,
    as many HF models), a two-layer MLP, and "head" (d_model -> d_out)."""
    rng = check_rng(rng)
    d_model, d_out = check_dim(d_model, "d_model"), check_dim(d_out, "d_out")
    d_ff = 2 * d_model if d_ff is None else check_dim(d_ff, "d_ff")
    spec = [("attn.q_proj", d_model, d_model, True), ("attn.k_proj", d_model, d_model, False),
            ("attn.v_proj", d_model, d_model, True), ("attn.o_proj", d_model, d_model, True),
            ("mlp.fc1", d_model, d_ff, True), ("mlp.fc2", d_ff, d_model, True), ("head", d_model, d_out, True)]
    return {n: dense_init(rng, i, o, bias=b, dtype=dtype) for n, i, o, b in spec}


def _active(layer: Any, adapters: Any) -> list[tuple[str, float]]:
    """[(adapter name, weight)] of the unmerged adapters of ``layer`` that ``adapters`` selects."""
    present = list(getval(layer).get("lora", {}))
    if adapters is None:
        return [(n, 1.0) for n in present]
    if isinstance(adapters, str):
        adapters = [adapters]
    weights = dict(adapters) if isinstance(adapters, dict) else {n: 1.0 for n in adapters}
    return [(n, float(weights[n])) for n in present if n in weights]


def layer_forward(layer: dict, x: Any, adapters: Any = None) -> Any:
    """y = x W^T + b + sum_a w_a s_a (x A_a^T) B_a^T over the active adapters (PEFT
    ``lora.Linear.forward`` with several active adapters; w_a = 1 unless weighted).

    adapters: None (every unmerged adapter of the layer), a name, a list of names, or
    {name: weight}. One adapter runs on any backend; several use autograd.numpy (NumPy only).
    """
    _layer(layer)
    base = {"W": layer["W"]}
    if getval(layer).get("b") is not None:
        base["b"] = layer["b"]
    active = _active(layer, adapters)
    if not active:
        return dense(base, x)
    name, w = active[0]
    y = lora_dense(base, layer["lora"][name], x, scale=w * _scale(layer, name))
    for name, w in active[1:]:
        lora = layer["lora"][name]
        y = y + anp.matmul(anp.matmul(x, anp.transpose(lora["A"])), anp.transpose(lora["B"])) * (w * _scale(layer, name))
    return y


def _scale(layer: Any, name: str) -> float:
    s = getval(layer)["scale"][name]
    return float(s) if isinstance(s, int | float) else float(np.asarray(getval(s)))


def mlp_forward(params: dict, x: Any, adapters: Any = None) -> Any:
    """The MLP of ``mlp_init``: tanh between layers, none after the last. x (..., d_in)."""
    names = list(_model(params))
    h = x
    for i, name in enumerate(names):
        h = layer_forward(params[name], h, adapters)
        if i < len(names) - 1:
            h = tanh(h)
    return h


def attention_forward(params: dict, x: Any, adapters: Any = None, *, n_heads: int = 2) -> Any:
    """The block of ``attention_init`` on x (batch, seq, d_model) -> (batch, seq, d_out);
    non-causal softmax attention with ``n_heads`` heads. NumPy only (autograd.numpy)."""
    def proj(name: str, h: Any) -> Any:
        return layer_forward(params[name], h, adapters)

    for name in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.fc1", "mlp.fc2", "head"):
        get_key(_model(params), name, "params")
    if getattr(getval(x), "ndim", None) != 3:
        raise ShapeError(f"x must have shape (batch, seq, d_model); got {getattr(getval(x), 'shape', type(x).__name__)}")
    n_heads = check_rank(n_heads, "n_heads")
    n, t, d = getval(x).shape
    if d % n_heads:
        raise ShapeError(f"d_model = {d} must be divisible by n_heads = {n_heads}")
    dh = d // n_heads

    def heads(h: Any) -> Any:  # (n, t, d) -> (n, H, t, dh)
        return anp.transpose(anp.reshape(h, (n, t, n_heads, dh)), (0, 2, 1, 3))

    q, k, v = heads(proj("attn.q_proj", x)), heads(proj("attn.k_proj", x)), heads(proj("attn.v_proj", x))
    scores = anp.matmul(q, anp.transpose(k, (0, 1, 3, 2))) / math.sqrt(dh)  # (n, H, t, t)
    e = anp.exp(scores - anp.max(scores, axis=-1, keepdims=True))
    att = anp.matmul(e / anp.sum(e, axis=-1, keepdims=True), v)  # (n, H, t, dh)
    h = x + proj("attn.o_proj", anp.reshape(anp.transpose(att, (0, 2, 1, 3)), (n, t, d)))
    h = h + proj("mlp.fc2", tanh(proj("mlp.fc1", h)))
    return proj("head", h)


# ---------------------------------------------------------------- adding, merging, splitting


def add_lora(params: dict, targets: Any, rank: int, alpha: float, *, rng: Any, rank_pattern: dict | None = None,
             alpha_pattern: dict | None = None, init: str = "kaiming", use_rslora: bool = False,
             adapter: str = "default", exclude: Any = None, output_layer: str | None = "auto") -> dict:
    """New params with a LoRA adapter named ``adapter`` on the layers ``targets`` selects
    (PEFT ``get_peft_model(model, LoraConfig(...))``, ``add_adapter`` for a second name).

    Per layer: r = rank_pattern match or ``rank``, alpha = alpha_pattern match or ``alpha``,
    s = alpha / r (``use_rslora``: alpha / sqrt(r)). init: "kaiming" (PEFT's default), "gaussian",
    "normal" (B = 0, ``layers.lora_init``), "pissa" or "olora" (``variants``; these also replace
    the layer's W by the residual). Layers are initialised in model order from ``rng``.
    """
    rng = check_rng(rng)
    check_choice(init, "init", INITS)
    use_rslora = check_bool(use_rslora, "use_rslora")
    chosen = targeted_modules(params, targets, exclude=exclude, output_layer=output_layer)
    out = dict(params)
    for name in chosen:
        layer = dict(params[name])
        if adapter in layer.get("lora", {}) or adapter in layer.get("merged", {}):
            raise MiniLoraValueError(f"layer {name!r} already has an adapter named {adapter!r}")
        r = check_rank(pattern_value(rank_pattern, name, rank), f"rank for {name!r}")
        a = check_real(pattern_value(alpha_pattern, name, alpha), f"alpha for {name!r}")
        s = a / math.sqrt(r) if use_rslora else a / r
        W = layer["W"]
        d_out, d_in = W.shape
        if init in LORA_INITS:
            factors = lora_init(rng, d_in, d_out, r, init=init, dtype=W.dtype)
        else:
            from minilora import variants

            factors, layer["W"] = (variants.pissa_init(W, r, scale=s) if init == "pissa"
                                   else variants.olora_init(W, r, scale=s))
        layer["lora"] = {**layer.get("lora", {}), adapter: factors}
        layer["scale"] = {**layer.get("scale", {}), adapter: s}
        out[name] = layer
    return out


def adapter_names(params: dict) -> list[str]:
    """Every adapter name in the model (unmerged or merged), in order of first appearance."""
    _model(params)
    names: dict[str, None] = {}
    for layer in params.values():
        if isinstance(layer, dict):
            names.update(dict.fromkeys(layer.get("lora", {})))
            names.update(dict.fromkeys(layer.get("merged", {})))
    return list(names)


def _select(adapters: Any, present: Any) -> list[str]:
    if adapters is None:
        return list(present)
    return [a for a in ([adapters] if isinstance(adapters, str) else adapters) if a in present]


def merge_all(params: dict, adapters: Any = None, *, unload: bool = False) -> dict:
    """W' = W + sum_a s_a B_a A_a over the selected unmerged adapters (default all) of every
    layer (PEFT ``merge_adapter``); merged adapters move to "merged", so ``unmerge_all`` can
    undo it. ``unload=True`` drops every adapter afterwards (``merge_and_unload``)."""
    unload = check_bool(unload, "unload")
    out = {}
    for name, layer in _model(params).items():
        if not (isinstance(layer, dict) and layer.get("lora")):
            out[name] = layer
            continue
        layer = dict(layer)
        lora, merged = dict(layer["lora"]), dict(layer.get("merged", {}))
        for a in _select(adapters, layer["lora"]):
            layer = {**layer, **merge(layer, lora[a], scale=layer["scale"][a])}
            merged[a] = lora.pop(a)
        layer["lora"], layer["merged"] = lora, merged
        if unload:
            layer = {k: v for k, v in layer.items() if k not in ("lora", "merged", "scale")}
        out[name] = layer
    return out


def unmerge_all(params: dict, adapters: Any = None) -> dict:
    """The inverse of ``merge_all`` (to rounding): W = W' - s B A for the selected merged adapters."""
    out = {}
    for name, layer in _model(params).items():
        if not (isinstance(layer, dict) and layer.get("merged")):
            out[name] = layer
            continue
        layer = dict(layer)
        lora, merged = dict(layer.get("lora", {})), dict(layer["merged"])
        for a in _select(adapters, layer["merged"]):
            layer = {**layer, **unmerge(layer, merged[a], scale=layer["scale"][a])}
            lora[a] = merged.pop(a)
        layer["lora"], layer["merged"] = lora, merged
        out[name] = layer
    return out


def lora_state(params: dict, adapters: Any = None) -> dict:
    """Only the (unmerged) adapter factors: {layer: {"lora": {adapter: {"A", "B"}}}}, the
    tree ``split_trainable`` trains with bias="none" (PEFT ``get_peft_model_state_dict``)."""
    out = {}
    for name, layer in _model(params).items():
        if isinstance(layer, dict) and layer.get("lora"):
            sel = {a: layer["lora"][a] for a in _select(adapters, layer["lora"])}
            if sel:
                out[name] = {"lora": sel}
    return out


def split_trainable(params: dict, *, bias: str = "none", adapters: Any = None) -> tuple[dict, dict]:
    """(trainable, frozen) as PEFT's ``_mark_only_adapters_as_trainable``: the adapter factors,
    plus every layer's "b" (bias="all") or the "b" of layers that carry an adapter
    (bias="lora_only"). adapters: which adapters train (default all unmerged ones)."""
    check_choice(bias, "bias", BIAS_MODES)
    trainable: dict = {}
    frozen: dict = {}
    for name, layer in _model(params).items():
        _layer(layer, f"params[{name!r}]")
        t, f = {}, {}
        has_lora = isinstance(layer, dict) and bool(layer.get("lora"))
        for key, value in layer.items():
            if key == "lora":
                sel = _select(adapters, value)
                t_l = {a: v for a, v in value.items() if a in sel}
                f_l = {a: v for a, v in value.items() if a not in sel}
                if t_l:
                    t["lora"] = t_l
                if f_l:
                    f["lora"] = f_l
            elif key == "b" and (bias == "all" or (bias == "lora_only" and has_lora)):
                t["b"] = value
            else:
                f[key] = value
        if t:
            trainable[name] = t
        if f:
            frozen[name] = f
    return trainable, frozen


def join(trainable: Any, frozen: Any) -> Any:
    """The union of two disjoint trees of dicts (the inverse of ``split_trainable``); works
    inside a differentiated function (``trainable`` may be an autograd box)."""
    tv, fv = getval(trainable), getval(frozen)
    if not isinstance(tv, dict) or not isinstance(fv, dict):
        raise MiniLoraValueError("join: both trees must be dicts at every shared key")
    out = {k: frozen[k] for k in fv}
    for k in tv:
        out[k] = join(trainable[k], frozen[k]) if k in fv else trainable[k]
    return out


# ---------------------------------------------------------------- PEFT adapter files


def peft_modules(params: dict, adapter: str = "default") -> dict:
    """{module: {"A", "B"}} of one adapter, for ``peft_files.save_peft_adapter``."""
    out = {}
    for name, layer in _model(params).items():
        if isinstance(layer, dict):
            lora = layer.get("lora", {}).get(adapter, layer.get("merged", {}).get(adapter))
            if lora is not None:
                out[name] = {"A": lora["A"], "B": lora["B"]}
    return out


def attach_peft_adapter(params: dict, adapter: Any, name: str = "default") -> dict:
    """New params with a ``peft_files.PeftAdapter`` (plain LoRA on dense layers) attached as
    adapter ``name``: factors, each module's scale (r/alpha patterns, rsLoRA), and the base biases
    saved with bias="all"/"lora_only". Raises for a module the model lacks, a shape mismatch,
    DoRA, lora_bias, embedding adapters or fan_in_fan_out (not supported by these models)."""
    _model(params)
    from minilora.peft.files import PeftAdapter

    if not isinstance(adapter, PeftAdapter):
        raise MiniLoraTypeError(f"adapter must be a PeftAdapter (from load_peft_adapter); got {type(adapter).__name__}")
    if adapter.use_dora or adapter.fan_in_fan_out or adapter.config.get("lora_bias"):
        raise MiniLoraValueError("attach_peft_adapter supports plain LoRA only (no use_dora, fan_in_fan_out, "
                                 "lora_bias)")
    out = dict(params)
    for module, t in adapter.modules.items():
        if module not in params or not is_linear(params[module]) or adapter.kinds.get(module) == "embedding":
            raise MiniLoraValueError(f"adapter module {module!r} is not a dense layer of the model "
                                     f"(layers: {list(params)})")
        layer = dict(out[module])
        d_out, d_in = layer["W"].shape
        A, B = t["A"], t["B"]
        if A.shape[1] != d_in or B.shape[0] != d_out:
            raise ShapeError(f"adapter module {module!r}: A {A.shape} / B {B.shape} do not fit W {layer['W'].shape}")
        dt = layer["W"].dtype
        layer["lora"] = {**layer.get("lora", {}), name: {"A": np.asarray(A, dt), "B": np.asarray(B, dt)}}
        layer["scale"] = {**layer.get("scale", {}), name: adapter.scale(module)}
        out[module] = layer
    for key, value in adapter.extra.items():
        module, _, leaf = key.rpartition(".")
        if leaf != "bias" or module not in out:
            raise MiniLoraValueError(f"adapter tensor {key!r} matches no bias of the model")
        out[module] = {**out[module], "b": np.asarray(value, out[module]["W"].dtype)}
    return out
