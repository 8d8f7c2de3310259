"""Odd arrays get the right answer or the right refusal: np.matrix and masked arrays (whose
operators and masks minilora would not honour) and non-native byte order are refused with that
reason; dropout_mask's shape and grad's argnum are checked."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from helpers import expect_error

import minilora as ml
from minilora.errors import MiniLoraTypeError, MiniLoraValueError

pytestmark = pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")  # np.matrix's own warning

RNG = np.random.default_rng(0)
W = RNG.standard_normal((3, 4))
LORA = {"A": RNG.standard_normal((2, 4)), "B": RNG.standard_normal((3, 2))}
X = RNG.standard_normal((5, 4))
Y = RNG.standard_normal((5, 3))


def _matrix(a: np.ndarray) -> Any:
    return np.matrix(a)


def _masked(a: np.ndarray) -> Any:
    mask = np.zeros(a.shape, bool)
    mask.flat[0] = True
    return np.ma.masked_array(a, mask=mask)


ODD = [(_matrix, "numpy.matrix"), (_masked, "MaskedArray")]


@pytest.mark.parametrize(("odd", "what"), ODD)
@pytest.mark.parametrize("loss", [ml.mse_loss, ml.l1_loss])
def test_losses_refuse_matrices_and_masked_arrays(odd: Any, what: str, loss: Any) -> None:
    expect_error(lambda: loss(odd(Y), Y), MiniLoraTypeError, "pred", what)
    expect_error(lambda: loss(Y, odd(Y)), MiniLoraTypeError, "target", what)


@pytest.mark.parametrize(("odd", "what"), ODD)
def test_layers_refuse_matrices_and_masked_arrays(odd: Any, what: str) -> None:
    expect_error(lambda: ml.lora_dense({"W": W}, LORA, odd(X)), MiniLoraTypeError, "x", what)
    expect_error(lambda: ml.lora_dense({"W": odd(W)}, LORA, X), MiniLoraTypeError, "W", what)
    expect_error(lambda: ml.lora_dense({"W": W}, {**LORA, "A": odd(LORA["A"])}, X), MiniLoraTypeError, "A", what)
    expect_error(lambda: ml.dense({"W": W}, odd(X)), MiniLoraTypeError, "x", what)
    expect_error(lambda: ml.merge({"W": odd(W)}, LORA), MiniLoraTypeError, "W", what)


@pytest.mark.parametrize(("odd", "what"), ODD)
def test_adam_refuses_matrices_and_masked_arrays(odd: Any, what: str) -> None:
    params = {"A": odd(np.ones((2, 2)))}
    expect_error(lambda: ml.adam_init(params), MiniLoraTypeError, "params['A']", what)


def test_a_masked_loss_would_have_been_wrong() -> None:
    """Why masked arrays are refused: the plain loss of the data differs from the masked mean."""
    pred = _masked(Y + 1.0)
    assert float(np.ma.mean((pred - Y) ** 2)) != float(np.mean((np.asarray(pred) - Y) ** 2))


def test_memmaps_and_other_plain_subclasses_still_work(tmp_path: Any) -> None:
    m = np.lib.format.open_memmap(str(tmp_path / "x.npy"), mode="w+", dtype=np.float64, shape=Y.shape)
    m[:] = Y
    assert float(ml.mse_loss(m, np.zeros_like(Y))) == pytest.approx(float(np.mean(Y ** 2)))


# ---------------------------------------------------------------- byte order


def _big(a: np.ndarray) -> np.ndarray:
    return a.astype(a.dtype.newbyteorder(">"))


@pytest.mark.parametrize("both", [False, True])
def test_big_endian_inputs_are_refused_for_byte_order_not_width(both: bool) -> None:
    err = expect_error(lambda: ml.mse_loss(_big(Y), _big(Y) if both else Y), MiniLoraTypeError,
                       "pred", "byte order", ">f8")
    assert "mixed float widths" not in str(err)


def test_big_endian_layer_inputs_are_refused_naming_the_argument() -> None:
    expect_error(lambda: ml.lora_dense({"W": W}, LORA, _big(X)), MiniLoraTypeError, "x", "byte order")
    expect_error(lambda: ml.lora_dense({"W": _big(W)}, LORA, X), MiniLoraTypeError, "W", "byte order")


def test_big_endian_adam_inputs_are_refused_for_byte_order() -> None:
    params = {"A": np.ones((2, 2))}
    expect_error(lambda: ml.adam_init({"A": _big(params["A"])}), MiniLoraTypeError, "params['A']", "byte order")
    expect_error(lambda: ml.adam_step(params, {"A": _big(np.ones((2, 2)))}, ml.adam_init(params)),
                 MiniLoraTypeError, "grads['A']", "byte order")


def test_converted_big_endian_arrays_give_the_native_answer() -> None:
    native = ml.lora_dense({"W": W}, LORA, X)
    x = _big(X)
    converted = ml.lora_dense({"W": W}, LORA, x.astype(x.dtype.newbyteorder("=")))
    assert np.array_equal(native, converted)


# ---------------------------------------------------------------- dropout_mask's shape


@pytest.mark.parametrize(("shape", "kind", "fragment"), [
    (3, MiniLoraTypeError, "shape"),
    ("3", MiniLoraTypeError, "shape"),
    (None, MiniLoraTypeError, "shape"),
    ((3, 0), MiniLoraValueError, "shape[1]"),
    ((2.0, 3), MiniLoraTypeError, "shape[0]"),
    ((np.int64(2), True), MiniLoraTypeError, "shape[1]"),
])
def test_dropout_mask_checks_its_shape(shape: Any, kind: type, fragment: str) -> None:
    expect_error(lambda: ml.dropout_mask(0, shape, 0.5), kind, fragment)


def test_dropout_mask_takes_a_list_or_numpy_integers() -> None:
    a = ml.dropout_mask(0, (2, 3), 0.5)
    assert np.array_equal(a, ml.dropout_mask(0, [np.int64(2), 3], 0.5))


# ---------------------------------------------------------------- grad's argnum


def _loss(lora: dict, x: Any, y: Any) -> Any:
    return ml.mse_loss(ml.lora_dense({"W": W}, lora, x), y)


@pytest.mark.parametrize("make", [ml.grad, ml.value_and_grad])
@pytest.mark.parametrize("argnum", ["a", 1.0, True, None, (), (0, "x"), [0]])
def test_a_bad_argnum_is_refused_when_the_function_is_made(make: Any, argnum: Any) -> None:
    expect_error(lambda: make(_loss, argnum), MiniLoraTypeError, "argnum", repr(argnum))


@pytest.mark.parametrize("make", [ml.grad, ml.value_and_grad])
@pytest.mark.parametrize("argnum", [(0, 9), 3, -4, (9,)])
def test_an_argnum_out_of_range_is_refused_at_the_call(make: Any, argnum: Any) -> None:
    f = make(_loss, argnum)
    expect_error(lambda: f(LORA, X, Y), MiniLoraValueError, "argnum", "out of range", "3 positional")


@pytest.mark.parametrize("argnum", ["a", 1.0, True, None, (0,), (0, 1), [0]])
def test_hvp_refuses_a_bad_argnum_naming_it(argnum: Any) -> None:
    expect_error(lambda: ml.hvp(_loss, argnum), MiniLoraTypeError, "argnum", repr(argnum))


def test_hvp_takes_a_numpy_integer_argnum_like_grad() -> None:
    """``hvp(f, np.int64(0))`` was refused while ``grad`` took it."""
    v = {k: np.ones_like(a) for k, a in LORA.items()}
    assert all(np.array_equal(a, b) for a, b in zip(ml.hvp(_loss, np.int64(0))(LORA, X, Y, v).values(),
                                                    ml.hvp(_loss, 0)(LORA, X, Y, v).values(), strict=True))


def test_numpy_integer_argnums_work_like_ints() -> None:
    a = ml.grad(_loss, 1)(LORA, X, Y)
    b = ml.grad(_loss, np.int64(1))(LORA, X, Y)
    c = ml.grad(_loss, (np.int64(0), 1))(LORA, X, Y)
    assert np.array_equal(a, b) and np.array_equal(c[1], a) and set(c[0]) == {"A", "B"}
