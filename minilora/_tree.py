"""The one walker over parameter trees: nested dicts, lists and tuples whose leaves are arrays.

Every module that visits a tree (Adam's state, the backend's moves, LoRA+ groups, fit's checks)
does it here, in one order: dict insertion order, then list/tuple index order.

A path is the tuple of keys and indices from the root to a leaf; ``path_str`` writes it as
``['layer'][0]`` for messages.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from minilora.errors import MiniLoraTypeError, MiniLoraValueError

__all__ = ["tree_map", "tree_paths", "tree_leaves", "path_str", "labelled_leaves", "tree_flatten",
           "tree_unflatten", "check_same_structure"]


def tree_map(f: Callable[..., Any], tree: Any, *rest: Any) -> Any:
    """Apply ``f`` to the leaves of nested dicts/lists/tuples (all trees the same structure)."""
    if isinstance(tree, dict):
        return {k: tree_map(f, v, *(r[k] for r in rest)) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return type(tree)(tree_map(f, v, *(r[i] for r in rest)) for i, v in enumerate(tree))
    return f(tree, *rest)


def tree_paths(tree: Any, prefix: tuple = ()) -> list[tuple[tuple, Any]]:
    """[(path, leaf)] in walking order; a path is a tuple of dict keys and list indices."""
    if isinstance(tree, dict):
        return [p for k, v in tree.items() for p in tree_paths(v, (*prefix, k))]
    if isinstance(tree, list | tuple):
        return [p for i, v in enumerate(tree) for p in tree_paths(v, (*prefix, i))]
    return [(prefix, tree)]


def tree_leaves(tree: Any) -> list[Any]:
    """The leaves in walking order."""
    return [leaf for _, leaf in tree_paths(tree)]


def path_str(path: tuple) -> str:
    """``("layer", 0)`` -> ``"['layer'][0]"``, as a message names a leaf."""
    return "".join(f"[{k!r}]" for k in path)


def labelled_leaves(tree: Any) -> list[tuple[str, Any]]:
    """[(path_str(path), leaf)] in walking order."""
    return [(path_str(p), leaf) for p, leaf in tree_paths(tree)]


def tree_flatten(tree: Any) -> tuple[list, Callable[[Any], Any]]:
    """(leaves, rebuild): the leaves in walking order and a function making a tree like ``tree``
    from new leaves. A flat dict of arrays, the usual adapter, takes a fast path."""
    if type(tree) is dict and not any(isinstance(v, dict | list | tuple) for v in tree.values()):
        keys = list(tree)
        return list(tree.values()), lambda values: dict(zip(keys, values, strict=False))
    return tree_leaves(tree), lambda values: tree_unflatten(tree, values)


def tree_unflatten(tree: Any, values: Any) -> Any:
    """A tree shaped like ``tree`` whose leaves are ``values`` in walking order."""
    it = iter(values)
    return tree_map(lambda _leaf: next(it), tree)


def _same_flat_dicts(params: Any, other: Any, same_dtype: bool) -> bool:
    """True when both are flat dicts of NumPy arrays with the same keys in the same order and
    the same shapes (and dtypes): the usual adapter, checked at every step without walking a tree."""
    if type(params) is not dict or type(other) is not dict or len(params) != len(other):
        return False
    for (k, p), (ko, o) in zip(params.items(), other.items(), strict=True):
        if k != ko or type(p) is not np.ndarray or type(o) is not np.ndarray or p.shape != o.shape or (
                same_dtype and p.dtype != o.dtype):
            return False
    return True


def check_same_structure(params: Any, other: Any, name: str, *, same_dtype: bool = False) -> None:
    """Refuse ``other`` unless it has the paths and leaf shapes (with ``same_dtype``: and dtypes)
    of ``params``, naming the first difference (with ``same_dtype`` every leaf must be an array)."""
    if _same_flat_dicts(params, other, same_dtype):
        return
    p_leaves, o_leaves = labelled_leaves(params), labelled_leaves(other)
    p_paths, o_paths = [p for p, _ in p_leaves], [p for p, _ in o_leaves]
    if p_paths != o_paths:
        raise MiniLoraValueError(
            f"{name} must have the same structure as params; params has {p_paths}, {name} has {o_paths}"
        )
    for (path, p), (_, o) in zip(p_leaves, o_leaves, strict=True):
        if same_dtype and not (hasattr(o, "shape") and hasattr(o, "dtype")):
            raise MiniLoraTypeError(f"{name}{path} must be an array; got {type(o).__name__}")
        ps, os_ = tuple(getattr(p, "shape", ())), tuple(getattr(o, "shape", ()))
        if ps != os_:
            raise MiniLoraValueError(f"{name}{path} has shape {os_} but params{path} has shape {ps}")
        if same_dtype and getattr(p, "dtype", None) != o.dtype:
            if getattr(o.dtype, "isnative", True) is False:
                raise MiniLoraTypeError(f"{name}{path} has non-native byte order ({o.dtype.str}); convert it first, "
                                        "e.g. a.astype(a.dtype.newbyteorder('='))")
            raise MiniLoraTypeError(
                f"{name}{path} has dtype {o.dtype} but params{path} has dtype {getattr(p, 'dtype', None)}; "
                "mixed dtypes are refused, not promoted (cast explicitly)"
            )
