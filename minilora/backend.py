"""Which array namespace runs: NumPy (default), CuPy, or any array-API namespace.

The backend decides where *new* arrays are made (``dense_init``, ``lora_init``, ``dropout_mask``,
``to_backend``). The primitives in ``ops`` never consult it: they compute in the namespace of
their inputs, so arrays that already live somewhere keep living there.

Random numbers are always drawn on the host with a NumPy ``Generator`` and then moved, so the
same seed gives the same initial values on every backend (what an oracle needs).

A non-NumPy array type gets its own autograd ``Box`` and ``VSpace`` (see ``register_array_type``),
which allocate with that type's namespace and never convert to host NumPy.
"""

from __future__ import annotations

import contextlib
import importlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
from autograd.extend import Box, VSpace
from autograd.tracer import getval

from minilora._tree import tree_map
from minilora.errors import BackendUnavailableError, MiniLoraTypeError, MiniLoraValueError

__all__ = [
    "Backend",
    "get_backend",
    "set_backend",
    "use_backend",
    "namespace_of",
    "register_array_type",
    "to_backend",
    "to_numpy",
]

KNOWN_BACKENDS = ("numpy", "cupy", "array_api_strict")


@dataclass(frozen=True)
class Backend:
    """The active array namespace ``xp`` and the ``device`` new arrays are placed on."""

    name: str
    xp: Any
    device: Any = None

    def asarray(self, host: Any, dtype: Any = None) -> Any:
        """Move a host NumPy array (or Python number) onto this backend, as ``dtype``."""
        if self.xp is np:
            return np.asarray(host, dtype=dtype)
        if self.device is None:
            return self.xp.asarray(np.asarray(host), dtype=dtype)
        return self.xp.asarray(np.asarray(host), dtype=dtype, device=self.device)

    def dtype(self, name: Any) -> Any:
        """The backend's dtype object for a name such as ``"float64"`` (floats only)."""
        return float_dtype(self.xp, name)


_NUMPY = Backend("numpy", np, None)
_current: Backend = _NUMPY

_FLOAT_NAMES = ("float16", "float32", "float64")


def float_dtype(xp: Any, name: Any) -> Any:
    """Resolve ``name`` (a string or a dtype object) to a real floating dtype of namespace ``xp``."""
    if isinstance(name, str):
        key = name
    else:
        try:
            key = np.dtype(name).name
        except (TypeError, ValueError):  # another namespace's dtype object, e.g. array_api_strict.float64
            key = str(name).rsplit(".", 1)[-1]
    if key not in _FLOAT_NAMES:
        raise MiniLoraTypeError(f"dtype must be one of {', '.join(_FLOAT_NAMES)}; got {name!r}")
    dt = getattr(xp, key, None)
    if dt is None:
        raise MiniLoraTypeError(f"dtype {key} is not available on backend {_ns_name(xp)}")
    return dt


def _resolve(backend: str | ModuleType) -> tuple[str, Any]:
    if isinstance(backend, str):
        if backend == "numpy":
            return "numpy", np
        if backend not in KNOWN_BACKENDS:
            raise MiniLoraValueError(
                f"backend must be one of {', '.join(repr(b) for b in KNOWN_BACKENDS)} "
                f"or an array-API namespace module; got {backend!r}"
            )
        try:
            module = importlib.import_module(backend)
        except ImportError as exc:
            extra = "cupy" if backend == "cupy" else "test"
            raise BackendUnavailableError(
                f"backend {backend!r} is not installed ({exc}); install it, e.g. "
                f"pip install 'minilora[{extra}]'"
            ) from None
        return backend, _array_api_namespace(module)
    if isinstance(backend, ModuleType):
        if backend is np:
            return "numpy", np
        missing = [f for f in ("asarray", "matmul", "zeros", "sum") if not hasattr(backend, f)]
        if missing:
            raise MiniLoraValueError(
                f"backend module {backend.__name__!r} is not an array-API namespace "
                f"(missing {', '.join(missing)})"
            )
        return backend.__name__, _array_api_namespace(backend)
    raise MiniLoraTypeError(
        f"backend must be a name ({', '.join(KNOWN_BACKENDS)}) or a namespace module; "
        f"got {type(backend).__name__}"
    )


def _array_api_namespace(module: Any) -> Any:
    """The array-API namespace for ``module`` (CuPy needs array_api_compat's wrapper)."""
    if hasattr(module.asarray(0.0), "__array_namespace__"):
        return module.asarray(0.0).__array_namespace__()
    try:
        import array_api_compat
    except ImportError:
        raise BackendUnavailableError(
            f"backend {module.__name__!r} needs array-api-compat: pip install 'minilora[cupy]'"
        ) from None
    return array_api_compat.array_namespace(module.asarray(0.0))


def set_backend(backend: str | ModuleType = "numpy", *, device: Any = None) -> Backend:
    """Select where new arrays are made: ``"numpy"``, ``"cupy"``, or a namespace module.

    ``device`` is passed to ``xp.asarray(..., device=device)`` (e.g. an
    ``array_api_strict.Device``). Returns the previous backend, for restoring.
    """
    global _current
    name, xp = _resolve(backend)
    previous = _current
    new = Backend(name, xp, device)
    if xp is not np:
        register_array_type(type(new.asarray(np.zeros(1))))
    _current = new
    return previous


def get_backend() -> Backend:
    """The active backend (``Backend(name, xp, device)``); NumPy unless changed."""
    return _current


@contextlib.contextmanager
def use_backend(backend: str | ModuleType, *, device: Any = None) -> Iterator[Backend]:
    """Context manager: run a block on ``backend``, restoring the previous one afterwards."""
    global _current
    previous = set_backend(backend, device=device)
    try:
        yield _current
    finally:
        _current = previous


def to_backend(tree: Any, dtype: Any = None) -> Any:
    """Move every array of a pytree (dict/list/tuple of arrays) onto the active backend."""
    return tree_map(lambda a: _current.asarray(a, None if dtype is None else _current.dtype(dtype)), tree)


def to_numpy(tree: Any) -> Any:
    """Copy every array of a pytree to host NumPy (for reporting; CuPy via ``.get()``)."""

    def one(a: Any) -> np.ndarray:
        if isinstance(a, np.ndarray | np.generic | float | int):
            return np.asarray(a)
        if hasattr(a, "get"):  # CuPy
            return np.asarray(a.get())
        if not hasattr(a, "to_device"):
            raise MiniLoraTypeError(f"to_numpy takes arrays, numbers or trees of them; got a leaf of type "
                                    f"{type(a).__name__}")
        return np.asarray(a.to_device(_cpu_device(namespace_of(a))))

    return tree_map(one, tree)


def _cpu_device(xp: Any) -> Any:
    info = getattr(xp, "__array_namespace_info__", None)
    return info().default_device() if info else None


# ---------------------------------------------------------------- namespace lookup


def namespace_of(*arrays: Any) -> Any:
    """The array namespace shared by ``arrays``; ``None`` and Python numbers are ignored.

    NumPy arrays and scalars give ``numpy``; other array types give their
    ``__array_namespace__()`` (CuPy via array_api_compat). Mixing two is a ``MiniLoraTypeError``.
    """
    found = None
    for a in arrays:
        t = type(a)
        if t is np.ndarray:  # the common case first: this runs several times per primitive
            xp = np
        elif a is None or t is float or t is int:
            continue
        else:
            if isinstance(a, Box):
                a = getval(a)
            if isinstance(a, np.ndarray | np.generic):
                xp = np
            elif hasattr(a, "__array_namespace__"):
                xp = a.__array_namespace__()
                register_array_type(type(a))
            else:
                try:
                    import array_api_compat

                    xp = array_api_compat.array_namespace(a)
                except (ImportError, TypeError):
                    raise MiniLoraTypeError(f"expected an array; got {type(a).__name__}") from None
                register_array_type(type(a))
        if found is None:
            found = xp
        elif xp is not found:
            raise MiniLoraTypeError(
                f"arrays from two backends cannot be combined: {_ns_name(found)} and {_ns_name(xp)}"
            )
    return np if found is None else found


def _ns_name(xp: Any) -> str:
    return getattr(xp, "__name__", repr(xp))


# ---------------------------------------------------------------- autograd integration


class ForeignArrayBox(Box):
    """Autograd box for a non-NumPy array: passes attributes through; math goes via ``ops``."""

    __slots__ = []
    shape = property(lambda self: self._value.shape)
    dtype = property(lambda self: self._value.dtype)
    ndim = property(lambda self: self._value.ndim)
    size = property(lambda self: math.prod(self._value.shape))
    device = property(lambda self: self._value.device)

    def __array_namespace__(self, *, api_version: str | None = None) -> Any:
        return self._value.__array_namespace__()

    def __len__(self) -> int:
        return self._value.shape[0]


class ForeignArrayVSpace(VSpace):
    """Vector space of a non-NumPy array: allocates with the array's own namespace and device."""

    def __init__(self, value: Any) -> None:
        self.shape = tuple(value.shape)
        self.dtype = value.dtype
        self.device = value.device
        self.xp = namespace_of(value)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def _from_host(self, host: np.ndarray) -> Any:
        return self.xp.asarray(host, dtype=self.dtype, device=self.device)

    def zeros(self) -> Any:
        return self.xp.zeros(self.shape, dtype=self.dtype, device=self.device)

    def ones(self) -> Any:
        return self.xp.ones(self.shape, dtype=self.dtype, device=self.device)

    def standard_basis(self) -> Iterator[Any]:
        for idx in np.ndindex(*self.shape):
            e = np.zeros(self.shape)
            e[idx] = 1.0
            yield self._from_host(e)

    def randn(self) -> Any:
        return self._from_host(np.random.randn(*self.shape))

    def _add(self, x: Any, y: Any) -> Any:
        if isinstance(x, Box) or isinstance(y, Box):  # a derivative being differentiated again
            from minilora.array_ops import add

            return add(x, y)
        return x + y

    def _mut_add(self, x: Any, y: Any) -> Any:
        return self._add(x, y)  # not in place: some namespaces have read-only or immutable arrays

    def _inner_prod(self, x: Any, y: Any) -> Any:
        return self.xp.sum(self.xp.reshape(x, (-1,)) * self.xp.reshape(y, (-1,)))


def register_array_type(array_type: type) -> None:
    """Teach autograd to trace and differentiate arrays of ``array_type`` (idempotent)."""
    if array_type in Box.type_mappings or array_type is np.ndarray:
        return
    ForeignArrayBox.register(array_type)
    ForeignArrayVSpace.register(array_type)
