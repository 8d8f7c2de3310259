"""Adapters: the one protocol through which ``minilora check`` drives another LoRA
implementation, the built-in adapters (PyTorch, PEFT, loralib, Flax, Keras, torchtune), and
``load_adapter``.

An adapter is any object with these methods (numbers in, NumPy-convertible arrays out; the
problems come from ``minilora.testing.strategies``, their arrays are float64 NumPy arrays whose
values are exact in ``problem.dtype``, the dtype the adapter must compute in):

    forward(problem)  -> y (*lead, d_out): the LoRA layer on problem.x, with problem.mask (or
                         None) as its dropout mask and scale alpha/r (alpha/sqrt(r) if rslora)
    grads(problem)    -> {"x", "A", "B"}: gradients of sum(y * problem.cotangent)

and, where the implementation has them (a missing one makes its rows "n/a", never a pass):

    merge(problem)    -> {"W": the merged base weight, in problem.W's layout,
                          "y": the merged layer's output on problem.x (no dropout)}
    unmerge(problem)  -> the base weight after merging and then unmerging
    adam(problem)     -> {"A", "B"} after len(problem.grads) optimizer steps fed those
                         gradients (an ``AdamProblem``; options as in ``minilora.adam_step``)

the variant methods (problems from ``minilora.testing.variant_problems``; each optional, a
missing one makes its rows "n/a"):

    dora_forward(problem)    -> y (*lead, d_out): the DoRA layer of a ``DoraProblem`` (a
                                ``LoraProblem`` plus ``magnitude`` m (d_out,)), PEFT's form:
                                y = x W^T + b + (c - 1)(xm W^T) + c s (xm A^T) B^T,
                                c = m / ||W + s B A||_row (the norm detached), xm = x * mask
    dora_grads(problem)      -> {"x", "A", "B", "m"}: gradients of sum(y * problem.cotangent)
    dora_merge(problem)      -> {"W": c * (W + s B A) row by row, in problem.W's layout,
                                 "y": the merged layer's output on problem.x (no dropout)}
    dora_unmerge(problem)    -> the base weight after merging and then unmerging
    embedding_forward(problem) -> y (*lead, dim) = W[ids] + s A^T[ids] B^T (an ``EmbeddingProblem``)
    embedding_grads(problem) -> {"A", "B"}: gradients of sum(y * problem.cotangent)
    embedding_merge(problem) -> {"W": W + s (B A)^T (num, dim), "y": the merged table at ids}
    trainable(problem)       -> the names "<layer>.<kind>" (kind W, b, A, B or m) of the
                                parameters that train for a ``TrainableProblem`` (PEFT's
                                ``bias`` = "none" | "all" | "lora_only", ``use_dora``)

and optionally the attributes ``name``, ``dtypes`` (default float64 and float32),
``features`` (a subset of ``FEATURES``: the layer options it supports; default all; without
"scale" the cases have alpha = r, so s = 1, as for a layer with no alpha),
``dora_features`` (the same for its DoRA layer; default ``features``), ``dora_bias`` (one of
``DORA_BIAS``: "peft", the default, adds b after the DoRA factor; "scaled" computes
c (x W^T + b) + ..., as torchtune's DoRALinear does, whose merge still leaves b unscaled),
``variant_dtypes`` (the dtypes of its DoRA, embedding rows; default its ``dtypes`` that are
float64 or float32; float16 and bfloat16 rows are bounded under its ``precision``, see
``minilora.testing.variant_bounds``),
``optimizer_features`` (a subset of ``OPTIMIZER_FEATURES``; an Adam case that needs a missing
one is reported "not covered"), ``adam_eps`` (one of ``ADAM_EPS``: "torch", the default, adds
eps to sqrt(v / (1 - beta2^t)) as torch.optim does; "hat" adds it to sqrt(v) before the bias
correction, Kingma and Ba's epsilon-hat, as Keras does), ``inits`` (names from ``INITS``) with a method
``init(d_in, d_out, rank, init, seed) -> {"A", "B"}`` (a fresh adapter's factors), ``precision``
(a dict, or a method of the dtype, with keys from ``PRECISION_KEYS``: see ``declared_precision``)
and ``versions() -> {package: version}`` for the report. Unknown names are refused with the list
of valid ones. Write one for your implementation and run ``minilora check yourmodule:YourAdapter``;
nothing in minilora needs to change.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import os
import sys
from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

from minilora.errors import MiniLoraError, MiniLoraValueError, one_line

__all__ = [
    "LoraAdapter",
    "REQUIRED_METHODS",
    "OPTIONAL_METHODS",
    "VARIANT_METHODS",
    "FEATURES",
    "OPTIMIZER_FEATURES",
    "INITS",
    "PRECISION_KEYS",
    "ADAM_EPS",
    "adapter_adam_eps",
    "DORA_BIAS",
    "adapter_dora_bias",
    "declared_precision",
    "adapter_optimizer_features",
    "BUILTIN",
    "TargetError",
    "FrameworkUnavailableError",
    "load_adapter",
    "missing_methods",
    "adapter_dtypes",
    "adapter_features",
    "adapter_dora_features",
    "adapter_variant_dtypes",
    "VARIANT_DTYPES",
]

REQUIRED_METHODS = ("forward", "grads")
OPTIONAL_METHODS = ("merge", "unmerge", "adam")
VARIANT_METHODS = ("dora_forward", "dora_grads", "dora_merge", "dora_unmerge", "embedding_forward",
                   "embedding_grads", "embedding_merge", "trainable")
# scale: the layer multiplies its update by alpha / r (Flax's LoRA has no alpha: scale 1)
FEATURES = frozenset({"fan_in_fan_out", "rslora", "dropout", "no_bias", "scale"})
# Adam options beyond plain Adam: amsgrad, L2 decay (weight_decay with decoupled=False),
# decoupled decay (AdamW), maximize
OPTIMIZER_FEATURES = frozenset({"amsgrad", "l2", "decoupled", "maximize"})
# the distributions of a fresh A: kaiming = U(-1/sqrt(d_in), 1/sqrt(d_in)) (torch's
# kaiming_uniform_(a=sqrt(5)), PEFT/loralib), gaussian = N(0, 1/r^2) (PEFT), normal = N(0, 1)
# (the paper), he_uniform = U(-sqrt(6/d_in), sqrt(6/d_in)) (Keras and Flax)
INITS = ("kaiming", "gaussian", "normal", "he_uniform")
# where Adam's eps goes: "torch" p -= lr/c1 m / (sqrt(v)/sqrt(c2) + eps) (torch.optim, optax);
# "hat" p -= lr sqrt(c2)/c1 m / (sqrt(v) + eps) (Keras; torch's eps / sqrt(c2) at each step)
ADAM_EPS = ("torch", "hat")
# where DoRA's bias goes in the forward: "peft" y = c (x W^T + s (x A^T) B^T) + b (PEFT, the
# paper: the bias is not part of the weight); "scaled" y = c (x W^T + b + s (x A^T) B^T) (torchtune)
DORA_BIAS = ("peft", "scaled")
DTYPE_NAMES = ("float64", "float32", "float16", "bfloat16")
# what an adapter may declare about how it computes in each dtype (all default to that dtype,
# bias_correction to float64): ``adapter`` the dtype its LoRA factors are stored and computed in
# (PEFT keeps them float32 under a float16/bfloat16 base; Keras keeps them float32 under a float64
# layer, which rounds the given A and B), ``accumulate`` the dtype its sums are
# carried in, ``bias_correction`` the dtype of Adam's 1 - beta^t (Keras, MLX and optax without
# x64: float32)
PRECISION_KEYS = ("adapter", "accumulate", "bias_correction")

# target name -> (module:Class, the packages it needs, the extra that installs them)
BUILTIN = {
    "torch": ("minilora.testing.adapters.torch_adapter:TorchAdapter", ("torch",)),
    "peft": ("minilora.testing.adapters.peft_adapter:PeftAdapter", ("torch", "peft", "transformers")),
    "loralib": ("minilora.testing.adapters.loralib_adapter:LoralibAdapter", ("torch", "loralib")),
    "flax": ("minilora.testing.adapters.flax_adapter:FlaxAdapter", ("jax", "flax", "optax")),
    "keras": ("minilora.testing.adapters.keras_adapter:KerasAdapter", ("torch", "keras")),
    "torchtune": ("minilora.testing.adapters.torchtune_adapter:TorchtuneAdapter", ("torch", "torchao", "torchtune")),
}


@runtime_checkable
class LoraAdapter(Protocol):
    """The methods ``minilora check`` calls (see the module docstring for the contract)."""

    def forward(self, problem: Any) -> Any: ...

    def grads(self, problem: Any) -> dict: ...

    def merge(self, problem: Any) -> dict: ...

    def unmerge(self, problem: Any) -> Any: ...

    def adam(self, problem: Any) -> dict: ...


class TargetError(MiniLoraValueError):
    """A ``check`` target that is unknown, does not import, or is not an adapter."""


class FrameworkUnavailableError(MiniLoraError, ImportError):
    """The framework a built-in target drives is not installed."""


def missing_methods(obj: Any) -> list[str]:
    return [m for m in REQUIRED_METHODS if not callable(getattr(obj, m, None))]


def has_method(obj: Any, name: str) -> bool:
    return callable(getattr(obj, name, None))


def adapter_optimizer_features(adapter: Any) -> frozenset:
    return frozenset(getattr(adapter, "optimizer_features", OPTIMIZER_FEATURES))


def adapter_adam_eps(adapter: Any) -> str:
    return str(getattr(adapter, "adam_eps", "torch"))


def declared_precision(adapter: Any, dtype: str) -> dict[str, str]:
    """{"adapter", "accumulate", "bias_correction"}: how the adapter says it computes in
    ``dtype`` (its ``precision`` attribute: a dict {dtype: {key: dtype}}, or a method of the
    dtype), each missing key at its default."""
    out = {"adapter": dtype, "accumulate": dtype, "bias_correction": "float64"}
    declared = getattr(adapter, "precision", None)
    if callable(declared):
        declared = declared(dtype)
    elif isinstance(declared, dict):
        declared = declared.get(dtype, {})
    out.update(declared or {})
    return out


def adapter_dtypes(adapter: Any) -> tuple[str, ...]:
    return tuple(getattr(adapter, "dtypes", ("float64", "float32")))


def adapter_features(adapter: Any) -> frozenset:
    return frozenset(getattr(adapter, "features", FEATURES))


def adapter_dora_bias(adapter: Any) -> str:
    return str(getattr(adapter, "dora_bias", "peft"))


def adapter_dora_features(adapter: Any) -> frozenset:
    return frozenset(getattr(adapter, "dora_features", adapter_features(adapter)))


# the dtypes the variant properties may run in (``variant_bounds``, the mixed-precision model
# included), and those they run in when an adapter does not list its ``variant_dtypes``
VARIANT_DTYPES = DTYPE_NAMES
DEFAULT_VARIANT_DTYPES = ("float64", "float32")


def adapter_variant_dtypes(adapter: Any) -> tuple[str, ...]:
    given = getattr(adapter, "variant_dtypes", None)
    if given is None:
        return tuple(d for d in adapter_dtypes(adapter) if d in DEFAULT_VARIANT_DTYPES)
    return tuple(given)


@contextlib.contextmanager
def _quiet_logs() -> Iterator[None]:
    """Importing peft imports bitsandbytes where installed, which logs a warning about CPU
    kernels, and torchtune imports torchao, which logs the CUDA kernels it cannot load: nothing
    to do with a check."""
    logs = [logging.getLogger(name) for name in ("bitsandbytes", "torchao", "torch.utils._pytree")]
    levels = [log.level for log in logs]
    for log in logs:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for log, level in zip(logs, levels, strict=True):
            log.setLevel(level)


def load_adapter(target: Any) -> Any:
    """An adapter instance for ``target``: a name in ``BUILTIN`` ('torch', 'peft', 'loralib',
    'flax', 'keras', 'torchtune'), 'module:Class' (or
    'module:function' returning an adapter), a class, or an adapter object itself.

    Raises ``TargetError`` (unknown target, a module that does not import, a missing class, an
    object missing protocol methods) or ``FrameworkUnavailableError``, each with a one-line
    message.
    """
    if not isinstance(target, str):
        obj = target() if isinstance(target, type) else target
        return _checked(obj, getattr(target, "__name__", type(target).__name__))
    if target in BUILTIN:
        spec, packages = BUILTIN[target]
        for package in packages:  # a cheap look first: torch takes a second or two to import
            try:
                found = importlib.util.find_spec(package) is not None
            except (ImportError, ValueError, AttributeError):
                found = False
            if not found:
                raise FrameworkUnavailableError(
                    f"target {target!r} needs {package}, which is not installed; pip install 'minilora[compare]'"
                )
        for package in packages:
            try:
                with _quiet_logs():
                    if package == "keras":  # the backend is chosen at its first import: torch here
                        from minilora.testing.adapters.keras_adapter import import_keras

                        import_keras()
                    else:
                        importlib.import_module(package)
            except FrameworkUnavailableError:
                raise
            except ImportError as exc:
                raise FrameworkUnavailableError(
                    f"target {target!r} needs {package}, which is not installed ({one_line(exc)}); "
                    "pip install 'minilora[compare]'"
                ) from None
        return _from_spec(spec, target)
    if ":" not in target:
        raise TargetError(
            f"unknown target {target!r}: use {', '.join(BUILTIN)} or module:Class (a Python class "
            "with the methods " + ", ".join(REQUIRED_METHODS) + ")"
        )
    return _from_spec(target, target)


def _from_spec(spec: str, target: str) -> Any:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise TargetError(f"target {target!r} must look like module:Class")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`: modules in the current folder import
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any failure while importing user code is one line, not a traceback
        raise TargetError(f"cannot import module {module_name!r} for target {target!r}: {one_line(exc)}") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise TargetError(f"module {module_name!r} has no attribute {attr!r} (target {target!r})")
        obj = getattr(obj, part)
    # a class (or a factory function) is called with no arguments; an instance is used as is
    if isinstance(obj, type) or (callable(obj) and missing_methods(obj)):
        try:
            obj = obj()
        except Exception as exc:
            raise TargetError(f"creating the adapter {target!r} failed: {one_line(exc)}") from None
    return _checked(obj, target)


def _checked(obj: Any, target: str) -> Any:
    missing = missing_methods(obj)
    if missing:
        raise TargetError(
            f"{target} is missing the adapter method(s) {', '.join(missing)} (an adapter needs "
            f"{', '.join(REQUIRED_METHODS)}; see minilora.testing.adapters)"
        )
    for attr, valid in (("dtypes", DTYPE_NAMES), ("features", tuple(sorted(FEATURES))),
                        ("dora_features", tuple(sorted(FEATURES))), ("variant_dtypes", VARIANT_DTYPES),
                        ("optimizer_features", tuple(sorted(OPTIMIZER_FEATURES))), ("inits", INITS)):
        given = getattr(obj, attr, ())
        if isinstance(given, str):
            raise TargetError(f"{target}.{attr} must be a list of names, not the string {given!r}; "
                              f"valid: {', '.join(valid)}")
        unknown = [d for d in given if d not in valid]
        if unknown:
            raise TargetError(f"{target}.{attr} lists unknown names {unknown}; valid: {', '.join(valid)}")
    if adapter_adam_eps(obj) not in ADAM_EPS:
        raise TargetError(f"{target}.adam_eps must be one of {', '.join(ADAM_EPS)}; got {obj.adam_eps!r}")
    if adapter_dora_bias(obj) not in DORA_BIAS:
        raise TargetError(f"{target}.dora_bias must be one of {', '.join(DORA_BIAS)}; got {obj.dora_bias!r}")
    for dt in adapter_dtypes(obj):
        try:
            declared = declared_precision(obj, dt)
        except Exception as exc:
            raise TargetError(f"{target}.precision({dt!r}) raised {one_line(exc)}") from None
        bad = [k for k in declared if k not in PRECISION_KEYS]
        if bad:
            raise TargetError(f"{target}.precision for {dt} has unknown keys {bad}; valid: {', '.join(PRECISION_KEYS)}")
        wrong = {k: v for k, v in declared.items() if v not in DTYPE_NAMES}
        if wrong:
            raise TargetError(f"{target}.precision for {dt} names unknown dtypes {wrong}; valid: "
                              f"{', '.join(DTYPE_NAMES)}")
    return obj
