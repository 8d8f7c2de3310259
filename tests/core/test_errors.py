"""Bad input gets a clear error: the right exception type (always a ``MiniLoraError`` and a
``ValueError`` or ``TypeError``), and a message that names the argument and shows what was
expected next to what was given. Shape and dtype cases run on both backends."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import minilora as ml

D_IN, D_OUT, RANK = 16, 8, 4


def expect(fn: Callable[[], Any], kind: type[BaseException], *fragments: str) -> BaseException:
    """``fn()`` raises ``kind``, which is a MiniLoraError, with every fragment in its message."""
    with pytest.raises(kind) as info:
        fn()
    err = info.value
    assert isinstance(err, ml.MiniLoraError), f"{type(err).__name__} is not a MiniLoraError: {err}"
    assert isinstance(err, ValueError | TypeError), f"{type(err).__name__} is neither ValueError nor TypeError"
    message = str(err)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in error message {message!r}"
    return err


def host_layer(dtype: str = "float64") -> tuple[dict, dict, np.ndarray]:
    """Valid host params (W (8, 16), b (8,)), lora (A (4, 16), B (8, 4)) and x (3, 16)."""
    rng = np.random.default_rng(0)
    params = {"W": rng.standard_normal((D_OUT, D_IN)), "b": rng.standard_normal(D_OUT)}
    lora = {"A": rng.standard_normal((RANK, D_IN)), "B": rng.standard_normal((D_OUT, RANK))}
    x = rng.standard_normal((3, D_IN))
    cast = lambda t: {k: v.astype(dtype) for k, v in t.items()}  # noqa: E731
    return cast(params), cast(lora), x.astype(dtype)


def layer_on(backend: Any, dtype: str = "float64") -> tuple[dict, dict, Any]:
    params, lora, x = host_layer()
    return backend.tree(params, dtype), backend.tree(lora, dtype), backend.put(x, dtype)


# ---------------------------------------------------------------- rank and other integers

BAD_RANKS = [
    (0, ValueError, "got 0"),
    (-3, ValueError, "got -3"),
    (4.0, TypeError, "got 4.0 (float)"),
    ("4", TypeError, "got '4' (str)"),
    (True, TypeError, "got True (bool)"),
    (None, TypeError, "got None"),
    (np.float64(4.0), TypeError, "float64"),
]


@pytest.mark.parametrize(("rank", "kind", "fragment"), BAD_RANKS)
def test_lora_init_rejects_bad_rank(rank: Any, kind: type, fragment: str) -> None:
    err = expect(lambda: ml.lora_init(0, D_IN, D_OUT, rank), kind, "rank must be a positive integer", fragment)
    assert isinstance(err, ml.MiniLoraValueError if kind is ValueError else ml.MiniLoraTypeError)


@pytest.mark.parametrize(("rank", "kind", "fragment"), BAD_RANKS)
def test_lora_scale_rejects_bad_rank(rank: Any, kind: type, fragment: str) -> None:
    expect(lambda: ml.lora_scale(8.0, rank), kind, "rank must be a positive integer", fragment)


@pytest.mark.parametrize("rank", [np.int64(4), np.int32(4)])
def test_numpy_integer_rank_is_accepted(rank: Any) -> None:
    """The integer check is by ``numbers.Integral``, so NumPy integers are ranks too."""
    assert ml.lora_init(0, D_IN, D_OUT, rank)["A"].shape == (4, D_IN)
    assert ml.lora_scale(8.0, rank) == 2.0


@pytest.mark.parametrize("which", ["d_in", "d_out"])
@pytest.mark.parametrize(("value", "kind"), [(0, ValueError), (-1, ValueError), (2.0, TypeError), (True, TypeError)])
def test_init_rejects_bad_dimensions(which: str, value: Any, kind: type) -> None:
    dims = {"d_in": D_IN, "d_out": D_OUT, which: value}
    expect(lambda: ml.lora_init(0, dims["d_in"], dims["d_out"], RANK), kind, f"{which} must be a positive integer")
    expect(lambda: ml.dense_init(0, dims["d_in"], dims["d_out"]), kind, f"{which} must be a positive integer")


@pytest.mark.parametrize(("alpha", "kind", "fragment"), [
    (float("nan"), ValueError, "alpha must be finite"),
    (float("inf"), ValueError, "alpha must be finite"),
    ("8", TypeError, "alpha must be a real number"),
    (None, TypeError, "alpha must be a real number"),
])
def test_lora_scale_rejects_bad_alpha(alpha: Any, kind: type, fragment: str) -> None:
    expect(lambda: ml.lora_scale(alpha, 4), kind, fragment)


@pytest.mark.parametrize(("scale", "kind", "fragment"), [
    (float("nan"), ValueError, "scale must be finite"),
    (float("-inf"), ValueError, "scale must be finite"),
    ("2", TypeError, "scale must be a real number"),
])
def test_bad_scale(backend: Any, scale: Any, kind: type, fragment: str) -> None:
    params, lora, x = layer_on(backend)
    expect(lambda: ml.lora_dense(params, lora, x, scale=scale), kind, fragment)
    expect(lambda: ml.merge(params, lora, scale=scale), kind, fragment)
    expect(lambda: ml.delta_weight(lora, scale=scale), kind, fragment)


# ---------------------------------------------------------------- shapes

@pytest.mark.parametrize("x_shape", [(3, 12), (3, 8), (16, 3), (2, 3, 15), ()])
@pytest.mark.parametrize("op", ["dense", "lora_dense"])
def test_x_last_dim_must_be_d_in(backend: Any, op: str, x_shape: tuple) -> None:
    params, lora, _ = layer_on(backend)
    x = backend.put(np.ones(x_shape))
    call = (lambda: ml.dense(params, x)) if op == "dense" else (lambda: ml.lora_dense(params, lora, x))
    expect(call, ml.ShapeError, f"x must have shape (..., d_in) = (..., {D_IN})", f"got {x_shape}")


def test_x_last_dim_with_fan_in_fan_out(backend: Any) -> None:
    """With fan_in_fan_out W is (d_in, d_out): d_in is read from W's first axis."""
    W = backend.put(np.ones((D_IN, D_OUT)))
    x = backend.put(np.ones((3, D_OUT)))
    expect(lambda: ml.dense({"W": W}, x, fan_in_fan_out=True), ml.ShapeError,
           f"(..., {D_IN})", f"got (3, {D_OUT})")


@pytest.mark.parametrize(("A_shape", "B_shape", "fragment"), [
    ((4, 12), (8, 4), 'lora["A"] must have shape (r, d_in) = (4, 16); got (4, 12)'),
    ((4, 8), (8, 4), 'lora["A"] must have shape (r, d_in) = (4, 16); got (4, 8)'),
    ((4, 16), (8, 3), 'lora["B"] must have shape (d_out, r) = (8, 4); got (8, 3)'),
    ((4, 16), (7, 4), 'lora["B"] must have shape (d_out, r) = (8, 4); got (7, 4)'),
    ((4, 16), (4, 8), 'lora["B"] must have shape (d_out, r) = (8, 4); got (4, 8)'),
    ((16,), (8, 4), 'lora["A"] must be 2-D with shape (r, d_in); got shape (16,)'),
    ((1, 4, 16), (8, 4), 'lora["A"] must be 2-D with shape (r, d_in); got shape (1, 4, 16)'),
])
@pytest.mark.parametrize("op", ["lora_dense", "merge", "unmerge"])
def test_lora_factor_shapes(backend: Any, op: str, A_shape: tuple, B_shape: tuple, fragment: str) -> None:
    params, _, x = layer_on(backend)
    lora = {"A": backend.put(np.ones(A_shape)), "B": backend.put(np.ones(B_shape))}
    calls = {
        "lora_dense": lambda: ml.lora_dense(params, lora, x),
        "merge": lambda: ml.merge(params, lora),
        "unmerge": lambda: ml.unmerge(params, lora),
    }
    expect(calls[op], ml.ShapeError, fragment)


@pytest.mark.parametrize(("A_shape", "B_shape", "fragment"), [
    ((4, 16), (8, 3), 'lora["B"] must have shape (d_out, r) = (8, 4); got (8, 3)'),
    ((4, 16), (8,), 'lora["B"] must be 2-D with shape (d_out, r); got shape (8,)'),
    ((4,), (8, 4), 'lora["A"] must be 2-D with shape (r, d_in); got shape (4,)'),
])
def test_delta_weight_shapes(backend: Any, A_shape: tuple, B_shape: tuple, fragment: str) -> None:
    lora = {"A": backend.put(np.ones(A_shape)), "B": backend.put(np.ones(B_shape))}
    expect(lambda: ml.delta_weight(lora), ml.ShapeError, fragment)


@pytest.mark.parametrize("b_shape", [(7,), (16,), (1, 8), ()])
@pytest.mark.parametrize("op", ["dense", "lora_dense"])
def test_bias_shape(backend: Any, op: str, b_shape: tuple) -> None:
    params, lora, x = layer_on(backend)
    params["b"] = backend.put(np.ones(b_shape))
    call = (lambda: ml.dense(params, x)) if op == "dense" else (lambda: ml.lora_dense(params, lora, x))
    expect(call, ml.ShapeError, 'params["b"] must have shape (d_out,) = (8,)', f"got {b_shape}")


@pytest.mark.parametrize("W_shape", [(16,), (2, 8, 16), ()])
@pytest.mark.parametrize("op", ["dense", "lora_dense", "merge"])
def test_W_must_be_2d(backend: Any, op: str, W_shape: tuple) -> None:
    _, lora, x = layer_on(backend)
    params = {"W": backend.put(np.ones(W_shape))}
    calls = {
        "dense": lambda: ml.dense(params, x),
        "lora_dense": lambda: ml.lora_dense(params, lora, x),
        "merge": lambda: ml.merge(params, lora),
    }
    expect(calls[op], ml.ShapeError, 'params["W"] must be 2-D', f"got shape {W_shape}")


def test_dropout_mask_shape_must_match_x(backend: Any) -> None:
    params, lora, x = layer_on(backend)
    mask = backend.put(np.ones((3, D_IN - 1)))
    expect(lambda: ml.lora_dense(params, lora, x, dropout_mask=mask), ml.ShapeError,
           "dropout_mask must have shape x.shape = (3, 16); got (3, 15)")


@pytest.mark.parametrize("loss", [ml.l1_loss, ml.mse_loss])
@pytest.mark.parametrize(("p_shape", "t_shape"), [((3, 4), (3, 5)), ((3, 4), (4, 3)), ((4,), (1, 4))])
def test_loss_shapes_must_match(backend: Any, loss: Callable, p_shape: tuple, t_shape: tuple) -> None:
    """No broadcasting: (4,) against (1, 4) is refused too."""
    pred, target = backend.put(np.zeros(p_shape)), backend.put(np.zeros(t_shape))
    expect(lambda: loss(pred, target), ml.ShapeError,
           f"got pred {p_shape} and target {t_shape}")


# ---------------------------------------------------------------- dtypes and non-arrays

def _calls(params: dict, lora: dict, x: Any, pred: Any, target: Any) -> dict[str, Callable[[], Any]]:
    return {
        "dense": lambda: ml.dense(params, x),
        "lora_dense": lambda: ml.lora_dense(params, lora, x),
        "merge": lambda: ml.merge(params, lora),
        "unmerge": lambda: ml.unmerge(params, lora),
        "delta_weight": lambda: ml.delta_weight(lora),
        "l1_loss": lambda: ml.l1_loss(pred, target),
        "mse_loss": lambda: ml.mse_loss(pred, target),
    }


# (operation, operand): every operand an operation validates
OPERANDS = [
    ("dense", "x"), ("dense", "W"), ("dense", "b"),
    ("lora_dense", "x"), ("lora_dense", "W"), ("lora_dense", "b"), ("lora_dense", "A"), ("lora_dense", "B"),
    ("merge", "W"), ("merge", "A"), ("merge", "B"),
    ("unmerge", "W"), ("unmerge", "A"), ("unmerge", "B"),
    ("delta_weight", "A"), ("delta_weight", "B"),
    ("l1_loss", "pred"), ("l1_loss", "target"),
    ("mse_loss", "pred"), ("mse_loss", "target"),
]


def _build(backend: Any, op: str, operand: str, make_odd: Callable[[np.ndarray], Any]) -> Callable[[], Any]:
    """All arrays valid float64 on the backend except ``operand``, which is ``make_odd(host)``."""
    params, lora, x = host_layer()
    pred, target = x[:, :D_OUT].copy(), x[:, D_OUT:].copy()
    arrays = {"x": x, "W": params["W"], "b": params["b"], "A": lora["A"], "B": lora["B"],
              "pred": pred, "target": target}
    moved = {k: (make_odd(v) if k == operand else backend.put(v)) for k, v in arrays.items()}
    return _calls({"W": moved["W"], "b": moved["b"]}, {"A": moved["A"], "B": moved["B"]},
                  moved["x"], moved["pred"], moved["target"])[op]


@pytest.mark.parametrize("int_dtype", ["int64", "int32"])
@pytest.mark.parametrize(("op", "operand"), OPERANDS)
def test_integer_arrays_are_refused(backend: Any, op: str, operand: str, int_dtype: str) -> None:
    call = _build(backend, op, operand, lambda a: backend.put(np.round(a), int_dtype))
    err = expect(call, TypeError, f"{operand} must have a real floating dtype", "int")
    assert isinstance(err, ml.MiniLoraTypeError)


@pytest.mark.parametrize(("op", "operand"), OPERANDS)
def test_object_arrays_are_refused(op: str, operand: str) -> None:
    """NumPy only: array-API namespaces have no object dtype."""
    params, lora, x = host_layer()
    pred, target = x[:, :D_OUT].copy(), x[:, D_OUT:].copy()
    arrays = {"x": x, "W": params["W"], "b": params["b"], "A": lora["A"], "B": lora["B"],
              "pred": pred, "target": target}
    arrays[operand] = arrays[operand].astype(object)
    call = _calls({"W": arrays["W"], "b": arrays["b"]}, {"A": arrays["A"], "B": arrays["B"]},
                  arrays["x"], arrays["pred"], arrays["target"])[op]
    expect(call, TypeError, f"{operand} must have a real floating dtype", "object")


@pytest.mark.parametrize(("op", "operand"), OPERANDS)
def test_python_lists_are_refused(op: str, operand: str) -> None:
    """A nested list is not an array: a MiniLoraTypeError that names the operand, never an
    AttributeError from deep inside."""
    params, lora, x = host_layer()
    pred, target = x[:, :D_OUT].copy(), x[:, D_OUT:].copy()
    arrays: dict[str, Any] = {"x": x, "W": params["W"], "b": params["b"], "A": lora["A"], "B": lora["B"],
                              "pred": pred, "target": target}
    arrays[operand] = arrays[operand].tolist()
    call = _calls({"W": arrays["W"], "b": arrays["b"]}, {"A": arrays["A"], "B": arrays["B"]},
                  arrays["x"], arrays["pred"], arrays["target"])[op]
    expect(call, TypeError, operand, "list")


@pytest.mark.parametrize(("op", "operand"), OPERANDS)
def test_mixed_float_widths_are_refused(backend: Any, op: str, operand: str) -> None:
    """One operand float32, the rest float64: refused (no silent promotion), naming both."""
    call = _build(backend, op, operand, lambda a: backend.put(a, "float32"))
    err = expect(call, TypeError, "mixed float widths", f"{operand} is ")
    others = {"x", "W", "b", "A", "B", "pred", "target"} - {operand}
    named = re.findall(r"(\w+) is (?:\w+\.)?float(32|64)", str(err))
    assert (operand, "32") in named, str(err)
    assert any(name in others and width == "64" for name, width in named), str(err)


def test_mixed_dropout_mask_width(backend: Any) -> None:
    params, lora, x = layer_on(backend)
    mask = backend.put(np.ones((3, D_IN)), "float32")
    expect(lambda: ml.lora_dense(params, lora, x, dropout_mask=mask), TypeError,
           "mixed float widths", "dropout_mask is ")


def test_all_float32_is_fine(backend: Any) -> None:
    """The refusal is about mixing, not about float32 itself."""
    params, lora, x = layer_on(backend, "float32")
    y = ml.lora_dense(params, lora, x)
    assert backend.get(y).dtype == np.float32


def test_arrays_from_two_backends_are_refused() -> None:
    xps = pytest.importorskip("array_api_strict")
    device = xps.Device("device1")
    with ml.use_backend(xps, device=device):
        params = ml.dense_init(0, D_IN, D_OUT)
    expect(lambda: ml.dense(params, np.ones((3, D_IN))), TypeError,
           "two backends cannot be combined", "numpy", "array_api_strict")


# ---------------------------------------------------------------- unknown names

@pytest.mark.parametrize("init", ["xavier", "Kaiming", "", None])
def test_unknown_init(init: Any) -> None:
    expect(lambda: ml.lora_init(0, D_IN, D_OUT, RANK, init=init), ValueError,
           "init must be one of 'kaiming', 'gaussian', 'normal'", f"got {init!r}")


@pytest.mark.parametrize("reduction", ["none", "MEAN", "avg", None])
@pytest.mark.parametrize("loss", [ml.l1_loss, ml.mse_loss])
def test_unknown_reduction(loss: Callable, reduction: Any) -> None:
    a = np.zeros(3)
    expect(lambda: loss(a, a, reduction=reduction), ValueError,
           "reduction must be one of 'mean', 'sum'", f"got {reduction!r}")


@pytest.mark.parametrize("name", ["torch", "jax", "NumPy", ""])
@pytest.mark.parametrize("how", ["set_backend", "use_backend"])
def test_unknown_backend_name(name: str, how: str) -> None:
    before = ml.get_backend()

    def call() -> None:
        if how == "set_backend":
            ml.set_backend(name)
        else:
            with ml.use_backend(name):
                pass

    expect(call, ValueError, "'numpy'", "'cupy'", "'array_api_strict'", f"got {name!r}")
    assert ml.get_backend() == before, "a refused backend must leave the current one in place"


def test_backend_that_is_not_a_namespace() -> None:
    import math

    expect(lambda: ml.set_backend(math), ValueError, "'math' is not an array-API namespace", "missing")
    expect(lambda: ml.set_backend(42), TypeError, "backend must be a name", "got int")


def test_missing_cupy_is_an_import_error() -> None:
    import importlib.util

    if importlib.util.find_spec("cupy") is not None:
        with ml.use_backend("cupy") as be:  # installed: selecting it works
            assert be.name == "cupy"
        return
    with pytest.raises(ml.BackendUnavailableError) as info:
        ml.set_backend("cupy")
    assert isinstance(info.value, ImportError) and isinstance(info.value, ml.MiniLoraError)
    assert "pip install" in str(info.value) and "cupy" in str(info.value)
    assert ml.get_backend().name == "numpy"


# ---------------------------------------------------------------- optimizer options

def _opt_problem(backend: Any) -> tuple[dict, dict, dict]:
    rng = np.random.default_rng(1)
    params = {"A": backend.put(rng.standard_normal((RANK, D_IN))), "B": backend.put(rng.standard_normal((D_OUT, RANK)))}
    grads = {"A": backend.put(rng.standard_normal((RANK, D_IN))), "B": backend.put(rng.standard_normal((D_OUT, RANK)))}
    return params, grads, ml.adam_init(params)


@pytest.mark.parametrize(("options", "kind", "fragments"), [
    ({"lr": -1e-3}, ValueError, ("lr must be >= 0.0", "-0.001")),
    ({"lr": float("nan")}, ValueError, ("lr must be finite",)),
    ({"lr": "1e-3"}, TypeError, ("lr must be a real number",)),
    ({"betas": (1.0, 0.999)}, ValueError, ("betas[0] must be < 1.0", "got 1.0")),
    ({"betas": (-0.1, 0.999)}, ValueError, ("betas[0] must be >= 0.0", "got -0.1")),
    ({"betas": (1.5, 0.999)}, ValueError, ("betas[0] must be < 1.0", "got 1.5")),
    ({"betas": (0.9, 1.0)}, ValueError, ("betas[1] must be < 1.0", "got 1.0")),
    ({"betas": (0.9, -0.1)}, ValueError, ("betas[1] must be >= 0.0", "got -0.1")),
    ({"betas": (0.9, 1.5)}, ValueError, ("betas[1] must be < 1.0", "got 1.5")),
    ({"betas": 0.9}, ValueError, ("betas must be a pair", "0.9")),
    ({"betas": (0.9,)}, ValueError, ("betas must be a pair", "(0.9,)")),
    ({"betas": (0.9, 0.99, 0.999)}, ValueError, ("betas must be a pair",)),
    ({"betas": "ab"}, ValueError, ("betas must be a pair", "'ab'")),
    ({"eps": -1e-8}, ValueError, ("eps must be >= 0.0", "-1e-08")),
    ({"weight_decay": -0.01}, ValueError, ("weight_decay must be >= 0.0", "-0.01")),
    ({"weight_decay": -0.01, "decoupled": True}, ValueError, ("weight_decay must be >= 0.0",)),
])
def test_adam_options(options: dict, kind: type, fragments: tuple[str, ...]) -> None:
    params, grads, state = _opt_problem(_HostPut())
    expect(lambda: ml.adam_step(params, grads, state, **options), kind, *fragments)


class _HostPut:
    """A minimal stand-in for the backend fixture (host NumPy), for tests that need no second backend."""

    @staticmethod
    def put(a: Any, dtype: str = "float64") -> np.ndarray:
        return np.asarray(a, dtype=dtype)

    @staticmethod
    def tree(t: dict, dtype: str = "float64") -> dict:
        return {k: np.asarray(v, dtype=dtype) for k, v in t.items()}


@pytest.mark.parametrize("case", ["missing key", "extra key", "list", "shape A", "shape B", "transposed"])
def test_adam_grads_must_match_params(backend: Any, case: str) -> None:
    params, grads, state = _opt_problem(backend)
    if case == "missing key":
        grads = {"A": grads["A"]}
        fragments: tuple[str, ...] = ("grads must have the same structure as params", "['B']")
    elif case == "extra key":
        grads = {**grads, "C": grads["A"]}
        fragments = ("grads must have the same structure as params", "['C']")
    elif case == "list":
        grads = [grads["A"], grads["B"]]
        fragments = ("grads must have the same structure as params", "[0]")
    elif case == "shape A":
        grads = {"A": backend.put(np.ones((RANK, D_IN - 1))), "B": grads["B"]}
        fragments = ("grads['A'] has shape (4, 15) but params['A'] has shape (4, 16)",)
    elif case == "shape B":
        grads = {"A": grads["A"], "B": backend.put(np.ones((D_OUT,)))}
        fragments = ("grads['B'] has shape (8,) but params['B'] has shape (8, 4)",)
    else:
        grads = {"A": grads["A"], "B": backend.put(np.ones((RANK, D_OUT)))}
        fragments = ("grads['B'] has shape (4, 8) but params['B'] has shape (8, 4)",)
    expect(lambda: ml.adam_step(params, grads, state), ValueError, *fragments)


@pytest.mark.parametrize("case", ["empty", "no moments", "None", "string", "tuple", "other params"])
def test_adam_state_must_come_from_adam_init(case: str) -> None:
    params, grads, good = _opt_problem(_HostPut())
    states = {
        "empty": {},
        "no moments": {"step": 0},
        "None": None,
        "string": "state",
        "tuple": (0, good["m"], good["v"]),
        "other params": ml.adam_init({"W": np.zeros((2, 2))}),
    }
    fragment = ("state['m'] must have the same structure" if case == "other params"
                else "state must be the dict returned by adam_init")
    expect(lambda: ml.adam_step(params, grads, states[case]), ValueError, fragment)


def test_amsgrad_needs_amsgrad_state() -> None:
    params, grads, state = _opt_problem(_HostPut())
    expect(lambda: ml.adam_step(params, grads, state, amsgrad=True), ValueError,
           "amsgrad=True needs a state from adam_init(params, amsgrad=True)")


def test_adam_init_refuses_non_arrays() -> None:
    """Lists are subtrees (like dicts); a bare Python number as a leaf is refused."""
    expect(lambda: ml.adam_init({"A": np.zeros(3), "B": 3.0}), TypeError, "params['B'] must be an array", "float")
    expect(lambda: ml.adam_init({"A": [np.zeros(3), "x"]}), TypeError, "params['A'][1] must be an array", "str")


# ---------------------------------------------------------------- non-finite results

def _finite_layer(backend: Any) -> tuple[dict, dict, dict, dict]:
    params, lora, _ = host_layer()
    return backend.tree(params), backend.tree(lora), params, lora


@pytest.mark.parametrize("how", ["inf in B", "nan in A", "overflow", "huge scale"])
@pytest.mark.parametrize("op", [ml.merge, ml.unmerge])
def test_non_finite_merge_raises_and_leaves_inputs(backend: Any, op: Callable, how: str) -> None:
    params, lora, host_params, host_lora = _finite_layer(backend)
    host_lora = {k: v.copy() for k, v in host_lora.items()}
    scale = 1.0
    if how == "inf in B":
        host_lora["B"][2, 1] = np.inf
    elif how == "nan in A":
        host_lora["A"][0, 5] = np.nan
    elif how == "overflow":  # each product is finite-looking input, the sum overflows
        host_lora["A"][:] = 1e200
        host_lora["B"][:] = 1e200
    else:
        scale = 1e308
        host_lora["B"][:] = 10.0
    lora = backend.tree(host_lora)
    before_params = {k: backend.get(v).copy() for k, v in params.items()}
    before_lora = {k: backend.get(v).copy() for k, v in lora.items()}
    keys_params, keys_lora = list(params), list(lora)
    with np.errstate(all="ignore"):
        err = expect(lambda: op(params, lora, scale=scale), ml.NonFiniteError, "non-finite", "W", "unchanged")
    assert isinstance(err, ValueError)
    assert list(params) == keys_params and list(lora) == keys_lora
    for k in params:
        np.testing.assert_array_equal(backend.get(params[k]), before_params[k])
    for k in lora:
        np.testing.assert_array_equal(backend.get(lora[k]), before_lora[k])


def test_non_finite_merge_counts_bad_entries(backend: Any) -> None:
    params, _, _, host_lora = _finite_layer(backend)
    host_lora = {k: v.copy() for k, v in host_lora.items()}
    host_lora["A"][:] = 1.0
    host_lora["B"][:] = 0.0
    host_lora["B"][3, 0] = np.inf  # row 3 of B A becomes inf everywhere: d_in bad entries
    lora = backend.tree(host_lora)
    expect(lambda: ml.merge(params, lora), ml.NonFiniteError, f"({D_IN} of {D_IN * D_OUT} entries)")


# ---------------------------------------------------------------- fit

def _regression(backend: Any, steps_until_nan: int | None = None) -> tuple[Callable, dict, Callable]:
    """A small mse regression; the target becomes NaN from step ``steps_until_nan + 1`` on."""
    rng = np.random.default_rng(2)
    x_host = rng.standard_normal((10, 5))
    y_host = x_host @ rng.standard_normal((5, 3))
    x, y = backend.put(x_host), backend.put(y_host)
    y_nan = backend.put(np.full_like(y_host, np.nan))
    params = backend.tree({"W": rng.standard_normal((3, 5)) * 0.1, "b": np.zeros(3)})

    def loss(p: dict, xb: Any, yb: Any) -> Any:
        return ml.mse_loss(ml.dense(p, xb), yb)

    def data(step: int) -> tuple:
        bad = steps_until_nan is not None and step > steps_until_nan
        return (x, y_nan if bad else y)

    return loss, params, data


@pytest.mark.parametrize("bad_step", [1, 6])
def test_fit_non_finite_loss_names_step_and_keeps_partial(backend: Any, bad_step: int) -> None:
    loss, params, data = _regression(backend, steps_until_nan=bad_step - 1)
    err = expect(lambda: ml.fit(loss, params, data, steps=20, lr=0.05), ml.NonFiniteError,
                 f"at step {bad_step}", "nan")
    p_partial, losses_partial, state_partial = err.partial
    assert len(losses_partial) == bad_step - 1
    assert all(np.isfinite(losses_partial))
    assert state_partial["step"] == bad_step - 1
    # the partial result is exactly an uninterrupted run of the finite steps
    _, clean_params, clean_data = _regression(backend)
    p_ref, losses_ref, state_ref = ml.fit(loss, clean_params, clean_data, steps=bad_step - 1, lr=0.05,
                                          return_state=True)
    assert losses_partial == losses_ref
    for k in p_ref:
        np.testing.assert_array_equal(backend.get(p_partial[k]), backend.get(p_ref[k]))
        np.testing.assert_array_equal(backend.get(state_partial["m"][k]), backend.get(state_ref["m"][k]))


def test_fit_huge_lr_goes_non_finite() -> None:
    """lr = 1e300 moves every weight by ~1e300 in step 1, so the squared error overflows at step 2."""
    loss, params, data = _regression(_HostPut())
    with np.errstate(all="ignore"):
        err = expect(lambda: ml.fit(loss, params, data(1), steps=10, lr=1e300), ml.NonFiniteError,
                     "at step 2", "inf")
    p_partial, losses_partial, state_partial = err.partial
    assert len(losses_partial) == 1 and state_partial["step"] == 1
    assert np.all(np.isfinite(p_partial["W"]))


@pytest.mark.parametrize(("steps", "fragment"), [
    (-1, "got -1"), (True, "got True"), (False, "got False"), (2.0, "got 2.0"), ("10", "got '10'"), (None, "got None"),
])
def test_fit_rejects_bad_steps(steps: Any, fragment: str) -> None:
    loss, params, data = _regression(_HostPut())
    expect(lambda: ml.fit(loss, params, data(1), steps=steps, lr=0.1), ValueError,
           "steps must be a non-negative integer", fragment)


@pytest.mark.parametrize("args", [[1, 2], "xy", 3])
def test_fit_rejects_bad_data_or_args(args: Any) -> None:
    loss, params, _ = _regression(_HostPut())
    expect(lambda: ml.fit(loss, params, args, steps=1, lr=0.1), TypeError,
           "data_or_args must be a tuple of arguments or a callable", type(args).__name__)


def test_fit_rejects_a_loss_that_is_not_a_scalar() -> None:
    params = {"W": np.ones((2, 3))}
    expect(lambda: ml.fit(lambda p: p["W"] * 2.0, params, (), steps=1, lr=0.1), TypeError,
           "the loss must be a scalar", "shape (2, 3)")
    assert np.array_equal(params["W"], np.ones((2, 3)))  # nothing was updated


@pytest.mark.parametrize("make", [ml.grad, ml.value_and_grad], ids=["grad", "value_and_grad"])
def test_grad_names_an_argnum_out_of_range(make: Callable) -> None:
    f = make(lambda a, b: (a * b).sum(), argnum=2)
    expect(lambda: f(np.ones(3), np.ones(3)), ValueError, "argnum 2 is out of range for 2 positional arguments")
    out = make(lambda a, b: (a * b).sum(), argnum=-1)(np.ones(3), np.full(3, 2.0))  # from the end
    np.testing.assert_array_equal(out if make is ml.grad else out[1], np.ones(3))  # d/db = a


def test_fit_passes_option_errors_through() -> None:
    loss, params, data = _regression(_HostPut())
    expect(lambda: ml.fit(loss, params, data(1), steps=3, lr=-0.1), ValueError, "lr must be >= 0.0")
    expect(lambda: ml.fit(loss, params, data(1), steps=3, lr=0.1, betas=(0.9, 1.0)), ValueError, "betas[1]")


# ---------------------------------------------------------------- dropout, rng, keys, dtype names

@pytest.mark.parametrize(("p", "kind", "fragment"), [
    (-0.1, ValueError, "p must be >= 0.0; got -0.1"),
    (1.01, ValueError, "p must be <= 1.0; got 1.01"),
    (2, ValueError, "p must be <= 1.0; got 2.0"),
    (float("nan"), ValueError, "p must be finite"),
    (True, TypeError, "p must be a real number"),
    ("0.5", TypeError, "p must be a real number"),
])
def test_dropout_p_outside_unit_interval(p: Any, kind: type, fragment: str) -> None:
    expect(lambda: ml.dropout_mask(0, (3, 4), p), kind, fragment)


@pytest.mark.parametrize("shape", [(3, 0), (-1, 4), (2.0, 3)])
def test_dropout_bad_shape(shape: tuple) -> None:
    with pytest.raises(ml.MiniLoraError, match=r"shape\[[01]\] must be a positive integer"):
        ml.dropout_mask(0, shape, 0.5)


RNG_CALLS = {
    "dense_init": lambda rng: ml.dense_init(rng, D_IN, D_OUT),
    "lora_init": lambda rng: ml.lora_init(rng, D_IN, D_OUT, RANK),
    "dropout_mask": lambda rng: ml.dropout_mask(rng, (3, 4), 0.5),
}


@pytest.mark.parametrize("rng", [None, "0", 1.5, True, np.random.RandomState(0), [0]], ids=repr)
@pytest.mark.parametrize("fn", list(RNG_CALLS))
def test_rng_must_be_generator_or_int(fn: str, rng: Any) -> None:
    expect(lambda: RNG_CALLS[fn](rng), TypeError, "rng must be a numpy.random.Generator or an int seed",
           type(rng).__name__)


_KEY_CASES = {  # which dict each case breaks
    "no W": "params", "params not a dict": "params",
    "no A": "lora", "no B": "lora", "lora not a dict": "lora",
}
_OP_READS = {"dense": {"params"}, "lora_dense": {"params", "lora"}, "merge": {"params", "lora"},
             "delta_weight": {"lora"}}


@pytest.mark.parametrize(("op", "case"), [
    (op, case) for op, reads in _OP_READS.items() for case, where in _KEY_CASES.items() if where in reads
])
def test_missing_keys(backend: Any, op: str, case: str) -> None:
    params, lora, x = layer_on(backend)
    if case == "no W":
        params = {"w": params["W"], "b": params["b"]}
        kind, fragments = ValueError, ("params must contain 'W'", "['b', 'w']")
    elif case == "no A":
        lora = {"B": lora["B"]}
        kind, fragments = ValueError, ("lora must contain 'A'", "['B']")
    elif case == "no B":
        lora = {"A": lora["A"], "b": lora["B"]}
        kind, fragments = ValueError, ("lora must contain 'B'", "['A', 'b']")
    elif case == "params not a dict":
        params = params["W"]
        kind, fragments = TypeError, ("params must be a dict of arrays",)
    else:
        lora = (lora["A"], lora["B"])
        kind, fragments = TypeError, ("lora must be a dict of arrays", "tuple")
    calls = {
        "dense": lambda: ml.dense(params, x),
        "lora_dense": lambda: ml.lora_dense(params, lora, x),
        "merge": lambda: ml.merge(params, lora),
        "delta_weight": lambda: ml.delta_weight(lora),
    }
    expect(calls[op], kind, *fragments)


@pytest.mark.parametrize("dtype", ["int32", "int64", "bool", np.int32, "bfloat16", "complex128", "float"])
@pytest.mark.parametrize("fn", ["dense_init", "lora_init", "dropout_mask"])
def test_non_float_dtype_names(backend: Any, fn: str, dtype: Any) -> None:
    calls = {
        "dense_init": lambda: ml.dense_init(0, D_IN, D_OUT, dtype=dtype),
        "lora_init": lambda: ml.lora_init(0, D_IN, D_OUT, RANK, dtype=dtype),
        "dropout_mask": lambda: ml.dropout_mask(0, (3, 4), 0.5, dtype=dtype),
    }
    expect(calls[fn], TypeError, "dtype must be one of float16, float32, float64")


def test_count_params_refuses_non_arrays() -> None:
    expect(lambda: ml.count_params({"A": np.zeros(3), "n": 3}), TypeError, "tree['n'] must be an array", "int")
