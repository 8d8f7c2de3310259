"""Input validation shared by the public functions: clear errors before any arithmetic.

Checks look through autograd boxes at the values inside, so they work under ``grad`` too.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np
from autograd.numpy.numpy_boxes import ArrayBox
from autograd.tracer import getval

from minilora.backend import namespace_of
from minilora.errors import MiniLoraTypeError, MiniLoraValueError, ShapeError


def check_rank(rank: Any, name: str = "rank") -> int:
    """A positive integer (``bool`` refused: ``True`` is not a rank)."""
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral):
        raise MiniLoraTypeError(f"{name} must be a positive integer; got {rank!r} ({type(rank).__name__})")
    if rank <= 0:
        raise MiniLoraValueError(f"{name} must be a positive integer; got {rank}")
    return int(rank)


def check_bool(value: Any, name: str) -> bool:
    """A flag: ``True``/``False`` or a NumPy bool. A truthy string such as ``"no"`` is refused,
    never read as ``True``."""
    if value is True or value is False:  # fast path, run at every step
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    raise MiniLoraTypeError(f"{name} must be a bool (True or False); got {value!r} ({type(value).__name__})")


def check_count(value: Any, name: str) -> int:
    """A non-negative integer such as a step count (``bool`` refused; NumPy integers accepted).
    Anything else is a bad value (``MiniLoraValueError``), as ``fit``'s steps always were."""
    if type(value) is int and value >= 0:  # fast path, run at every adam_step
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise MiniLoraValueError(f"{name} must be a non-negative integer; got {value!r} ({type(value).__name__})")
    if value < 0:
        raise MiniLoraValueError(f"{name} must be a non-negative integer; got {value}")
    return int(value)


def check_dim(value: Any, name: str) -> int:
    """A positive integer dimension such as d_in or d_out."""
    return check_rank(value, name)


def check_real(value: Any, name: str, *, low: float | None = None, high: float | None = None,
               low_open: bool = False, high_open: bool = False) -> float:
    """A finite real number within the given bounds; returned as ``float``."""
    if type(value) is float and math.isfinite(value) and (low is None or value > low) and (
            high is None or value < high):  # fast path, run at every step: strictly inside
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise MiniLoraTypeError(f"{name} must be a real number; got {value!r} ({type(value).__name__})")
    v = float(value)
    if not math.isfinite(v):
        raise MiniLoraValueError(f"{name} must be finite; got {v}")
    if low is not None and (v < low or (low_open and v == low)):
        raise MiniLoraValueError(f"{name} must be {'>' if low_open else '>='} {low}; got {v}")
    if high is not None and (v > high or (high_open and v == high)):
        raise MiniLoraValueError(f"{name} must be {'<' if high_open else '<='} {high}; got {v}")
    return v


def check_choice(value: Any, name: str, choices: tuple[str, ...]) -> str:
    if not (isinstance(value, str) and value in choices):  # (an array's ``in`` is ambiguous)
        raise MiniLoraValueError(
            f"{name} must be one of {', '.join(repr(c) for c in choices)}; got {value!r}"
        )
    return value


def _is_real_float(xp: Any, dtype: Any) -> bool:
    if xp is np:
        return isinstance(dtype, np.dtype) and dtype.kind == "f"
    try:
        return bool(xp.isdtype(dtype, "real floating"))
    except Exception:
        return False


def check_floats(**arrays: Any) -> Any:
    """Every given array is a real-float array, all of one dtype and one backend.

    ``None`` entries are skipped. Returns the shared namespace. Mixed float widths are refused
    rather than promoted: an oracle must not hide a precision bug.
    """
    first = None
    for v in arrays.values():  # fast path, run at every step: all NumPy arrays of one float dtype
        if v is None:
            continue
        if type(v) is ArrayBox:  # a traced value (the loss's pred): check what it holds
            v = v._value
        if type(v) is not np.ndarray or (first is not None and v.dtype != first):
            break
        first = v.dtype
    else:
        if first is None or (first.kind == "f" and first.isnative):
            return np
    present = {k: check_array(v, k) for k, v in arrays.items() if v is not None}
    xp = namespace_of(*present.values())
    first = None
    for name, a in present.items():
        if xp is np and not a.dtype.isnative:
            raise MiniLoraTypeError(
                f"{name} has non-native byte order ({a.dtype.str}); convert it first, e.g. "
                f"{name}.astype({name}.dtype.newbyteorder('='))"
            )
        if not _is_real_float(xp, a.dtype):
            raise MiniLoraTypeError(
                f"{name} must have a real floating dtype (float16/float32/float64); got {a.dtype}"
            )
        if first is None:
            first = (name, a.dtype)
        elif a.dtype != first[1]:
            raise MiniLoraTypeError(
                f"mixed float widths: {first[0]} is {first[1]} but {name} is {a.dtype}; "
                "cast explicitly (minilora never promotes silently)"
            )
    return xp


def check_array(a: Any, name: str) -> Any:
    """The value inside ``a`` if it is an array (has shape and dtype); else MiniLoraTypeError."""
    value = getval(a)
    if type(value) is np.ndarray:  # fast path, run at every step
        return value
    if not (hasattr(value, "shape") and hasattr(value, "dtype")):
        raise MiniLoraTypeError(f"{name} must be an array; got {type(value).__name__}")
    if isinstance(value, np.matrix | np.ma.MaskedArray):
        raise MiniLoraTypeError(
            f"{name} must be a plain array; got {type(value).__module__}.{type(value).__name__}, whose "
            f"{'mask' if isinstance(value, np.ma.MaskedArray) else '* and shapes'} minilora would not honour "
            f"(pass np.asarray({name}){' or its .filled() values' if isinstance(value, np.ma.MaskedArray) else ''})"
        )
    return value


def check_ndim(a: Any, name: str, ndim: int, what: str) -> None:
    if len(check_array(a, name).shape) != ndim:
        raise ShapeError(f"{name} must be {ndim}-D with shape {what}; got shape {tuple(getval(a).shape)}")


def check_shape(a: Any, name: str, expected: tuple[int, ...], what: str) -> None:
    """Exact shape check with the message style ``A must have shape (r, d_in) = (4, 16); got (4, 12)``."""
    got = tuple(check_array(a, name).shape)
    if got != tuple(expected):
        raise ShapeError(f"{name} must have shape {what} = {tuple(expected)}; got {got}")


def get_key(tree: Any, key: str, name: str) -> Any:
    """``tree[key]`` with a clear error when ``tree`` is not a dict or lacks ``key``."""
    value = getval(tree)
    if not isinstance(value, dict):
        raise MiniLoraTypeError(f"{name} must be a dict of arrays; got {type(value).__name__}")
    if key not in value:
        raise MiniLoraValueError(f"{name} must contain {key!r}; it has keys {sorted(value)}")
    return tree[key]


def check_rng(rng: Any) -> np.random.Generator:
    """A NumPy ``Generator``, or an int seed for one. Randomness is always explicit."""
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, numbers.Integral) and not isinstance(rng, bool):
        if rng < 0:  # NumPy's own refusal names no argument
            raise MiniLoraValueError(f"rng as an int seed must be >= 0; got {rng}")
        return np.random.default_rng(int(rng))
    raise MiniLoraTypeError(
        f"rng must be a numpy.random.Generator or an int seed; got {type(rng).__name__}"
    )
