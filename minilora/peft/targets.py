"""PEFT's target rules, in one place (PEFT 0.21 ``check_target_module_exists``,
``_maybe_include_all_linear_layers`` and ``get_pattern_key``):

    targets a str       "all-linear" (any case): every linear layer but the output layer;
                        otherwise the module name must ``re.fullmatch`` the string
    targets a list/set  the name is an entry, or ends with "." + an entry
    exclude             the same two rules; an excluded name is never a target
    rank_pattern, alpha_pattern   the first key k (in order) with
                        ``re.match(rf"(.*\\.)?({k})$", name)`` gives the value

``minilora.peft.models`` chooses layers with these; ``minilora.peft.files`` reads an adapter's
per-module rank and alpha with ``pattern_value``.
"""

from __future__ import annotations

import re
from typing import Any

from minilora.errors import MiniLoraValueError

__all__ = ["is_linear", "pattern_value", "target_matches", "targeted_modules"]


def is_linear(layer: Any) -> bool:
    """A layer LoRA can target: a dict whose "W" is a 2-D weight."""
    return isinstance(layer, dict) and getattr(layer.get("W"), "ndim", 0) == 2


def _name_matches(name: str, targets: Any) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return name in targets or any(name.endswith(f".{t}") for t in targets)


def target_matches(name: str, targets: Any, *, exclude: Any = None) -> bool:
    """Whether PEFT would put LoRA on module ``name`` (rules in the module docstring; the
    "all-linear" shorthand is resolved by ``targeted_modules``, which knows the model)."""
    if exclude and _name_matches(name, exclude):
        return False
    return _name_matches(name, targets)


def targeted_modules(params: dict, targets: Any, *, exclude: Any = None, output_layer: str | None = "auto") -> list[str]:
    """Names of the layers of ``params`` that ``targets`` selects, in model order.

    output_layer: the layer "all-linear" leaves out ("auto": the last layer; None: none).
    Raises MiniLoraValueError when nothing matches (as PEFT does)."""
    linear = [n for n, layer in params.items() if is_linear(layer)]
    if isinstance(targets, str) and targets.lower() == "all-linear":
        out = linear[-1] if output_layer == "auto" and linear else output_layer
        targets = [n for n in linear if n != out]  # exact names now
        chosen = [n for n in linear if n in targets and not (exclude and _name_matches(n, exclude))]
    else:
        if not isinstance(targets, str | list | tuple | set | frozenset):
            raise MiniLoraValueError(f"targets must be a str or a list of names; got {type(targets).__name__}")
        chosen = [n for n in linear if target_matches(n, targets, exclude=exclude)]
    if not chosen:
        raise MiniLoraValueError(f"targets {targets!r} match no layer of the model; layers are {linear}")
    return chosen


def pattern_value(patterns: dict | None, module: str, default: Any) -> Any:
    """PEFT ``get_pattern_key`` for ``rank_pattern``/``alpha_pattern``: the value of the first key
    k of ``patterns``, in the dict's order, with ``re.match(rf"(.*\\.)?({k})$", module)``; else
    ``default``."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default
