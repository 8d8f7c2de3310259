"""A flag is a bool (or a NumPy bool): a truthy string such as "no" is refused, never read as
True. Every public function that takes a flag is listed here, with the name its error must give."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from helpers import expect_error

import minilora as ml
from minilora import variants
from minilora.errors import MiniLoraTypeError
from minilora.peft import models
from minilora.testing import adam_bounds, lora_bounds
from minilora.testing.problems import make_adam_problem, make_problem

RNG = np.random.default_rng(0)
W = RNG.standard_normal((3, 4))
LORA = {"A": RNG.standard_normal((2, 4)), "B": RNG.standard_normal((3, 2))}
X = RNG.standard_normal((5, 4))
P = {"A": np.ones((2, 2))}
G = {"A": np.ones((2, 2))}


def _calls(flag: Any) -> list[tuple[str, str, Callable[[], Any]]]:
    """(function, flag name, the call with ``flag`` as that flag's value)."""
    s = ml.adam_init(P, amsgrad=True)
    net = models.mlp_init(0, [4, 3])
    return [
        ("dense_init", "bias", lambda: ml.dense_init(0, 4, 3, bias=flag)),
        ("dense", "fan_in_fan_out", lambda: ml.dense({"W": W}, X, fan_in_fan_out=flag)),
        ("lora_dense", "fan_in_fan_out", lambda: ml.lora_dense({"W": W}, LORA, X, fan_in_fan_out=flag)),
        ("lora_scale", "rslora", lambda: ml.lora_scale(8.0, 4, rslora=flag)),
        ("delta_weight", "fan_in_fan_out", lambda: ml.delta_weight(LORA, fan_in_fan_out=flag)),
        ("merge", "fan_in_fan_out", lambda: ml.merge({"W": W}, LORA, fan_in_fan_out=flag)),
        ("unmerge", "fan_in_fan_out", lambda: ml.unmerge({"W": W}, LORA, fan_in_fan_out=flag)),
        ("adam_init", "amsgrad", lambda: ml.adam_init(P, amsgrad=flag)),
        ("adam_step", "decoupled", lambda: ml.adam_step(P, G, s, decoupled=flag)),
        ("adam_step", "amsgrad", lambda: ml.adam_step(P, G, s, amsgrad=flag)),
        ("adam_step", "maximize", lambda: ml.adam_step(P, G, s, maximize=flag)),
        ("fit", "decoupled", lambda: ml.fit(lambda p: (p["A"] ** 2).sum(), P, steps=1, lr=0.1, decoupled=flag)),
        ("fit", "amsgrad", lambda: ml.fit(lambda p: (p["A"] ** 2).sum(), P, steps=1, lr=0.1, amsgrad=flag)),
        ("fit", "return_state", lambda: ml.fit(lambda p: (p["A"] ** 2).sum(), P, steps=1, lr=0.1, return_state=flag)),
        ("dora_magnitude", "fan_in_fan_out", lambda: variants.dora_magnitude({"W": W}, LORA, fan_in_fan_out=flag)),
        ("dora_dense", "fan_in_fan_out",
         lambda: variants.dora_dense({"W": W}, LORA, np.ones(3), X, fan_in_fan_out=flag)),
        ("dora_merge", "fan_in_fan_out", lambda: variants.dora_merge({"W": W}, LORA, np.ones(3), fan_in_fan_out=flag)),
        ("dora_unmerge", "fan_in_fan_out",
         lambda: variants.dora_unmerge({"W": W}, LORA, np.ones(3), np.ones(3), fan_in_fan_out=flag)),
        ("lora_bias_dense", "fan_in_fan_out",
         lambda: variants.lora_bias_dense({"W": W, "b": np.zeros(3)}, {**LORA, "bias": np.zeros(3)}, X,
                                          fan_in_fan_out=flag)),
        ("lora_bias_merge", "fan_in_fan_out",
         lambda: variants.lora_bias_merge({"W": W, "b": np.zeros(3)}, {**LORA, "bias": np.zeros(3)},
                                          fan_in_fan_out=flag)),
        ("pissa_init", "fan_in_fan_out", lambda: variants.pissa_init(W, 2, fan_in_fan_out=flag)),
        ("orthogonal_init", "fan_in_fan_out", lambda: variants.orthogonal_init(W, 2, 0, fan_in_fan_out=flag)),
        ("adam_step_lrs", "amsgrad", lambda: variants.adam_step_lrs(P, G, s, lrs={"A": 0.1}, amsgrad=flag)),
        ("adam_step_lrs", "decoupled", lambda: variants.adam_step_lrs(P, G, s, lrs={"A": 0.1}, decoupled=flag)),
        ("mlp_init", "bias", lambda: models.mlp_init(0, [4, 3], bias=flag)),
        ("add_lora", "use_rslora", lambda: models.add_lora(net, "all-linear", 2, 4.0, rng=0, use_rslora=flag,
                                                           output_layer=None)),
        ("merge_all", "unload", lambda: models.merge_all(net, unload=flag)),
        ("make_problem", "rslora", lambda: make_problem(lead=(2,), d_in=4, d_out=3, rank=2, rslora=flag)),
        ("make_problem", "fan_in_fan_out",
         lambda: make_problem(lead=(2,), d_in=4, d_out=3, rank=2, fan_in_fan_out=flag)),
        ("make_problem", "bias", lambda: make_problem(lead=(2,), d_in=4, d_out=3, rank=2, bias=flag)),
        ("make_adam_problem", "decoupled", lambda: make_adam_problem(d_in=4, d_out=3, rank=2, decoupled=flag)),
        ("make_adam_problem", "amsgrad", lambda: make_adam_problem(d_in=4, d_out=3, rank=2, amsgrad=flag)),
        ("lora_bounds", "fan_in_fan_out",
         lambda: lora_bounds({"W": W}, LORA, X, scale=1.0, dtype="float32", fan_in_fan_out=flag)),
        ("adam_bounds", "amsgrad", lambda: adam_bounds(P, [G], dtype="float32", amsgrad=flag)),
        ("adam_bounds", "decoupled", lambda: adam_bounds(P, [G], dtype="float32", decoupled=flag)),
        ("adam_bounds", "maximize", lambda: adam_bounds(P, [G], dtype="float32", maximize=flag)),
    ]


CASES = [(fn, name, i) for i, (fn, name, _) in enumerate(_calls(False))]


@pytest.mark.parametrize("bad", ["no", "False", "", 1, 0, None, 1.0, [True]])
@pytest.mark.parametrize(("fn", "name", "i"), CASES)
def test_a_flag_that_is_not_a_bool_is_refused(fn: str, name: str, i: int, bad: Any) -> None:
    expect_error(_calls(bad)[i][2], MiniLoraTypeError, name, "must be a bool", repr(bad))


@pytest.mark.parametrize(("fn", "name", "i"), CASES)
def test_a_numpy_bool_is_the_same_as_a_bool(fn: str, name: str, i: int) -> None:
    """np.False_ (and, where the call works with it, np.True_) behave as their Python bools."""
    for py, npy in ((False, np.False_), (True, np.True_)):
        try:
            want = _calls(py)[i][2]()
        except Exception as exc:  # e.g. fan_in_fan_out=True does not fit these shapes
            with pytest.raises(type(exc)):
                _calls(npy)[i][2]()
            continue
        got = _calls(npy)[i][2]()
        assert _same(got, want), f"{fn}({name}={npy!r}) differs from {name}={py!r}"


def _same(a: Any, b: Any) -> bool:
    if hasattr(a, "__dataclass_fields__"):
        return type(a) is type(b) and _same(vars(a), vars(b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if hasattr(a, "shape") or isinstance(a, float | int | np.number):
        return bool(np.array_equal(np.asarray(a), np.asarray(b)))
    return bool(a == b)


def test_the_string_no_used_to_mean_true_for_fan_in_fan_out() -> None:
    """The motivating case: fan_in_fan_out="no" computed x @ W (True) without a word."""
    Wt = np.ascontiguousarray(W.T)  # (4, 3): valid only as fan_in_fan_out=True
    expect_error(lambda: ml.lora_dense({"W": Wt}, LORA, X, fan_in_fan_out="no"), MiniLoraTypeError,
                 "fan_in_fan_out", "'no'")
