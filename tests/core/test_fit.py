"""``fit``'s one-array Adam (``train._FlatAdam``) is the leaf-by-leaf update, bit for bit, and
hands out nothing it writes again; gradients keep their adapter's key order.

The one-array path lays params, m and v end to end so that each of Adam's elementwise passes runs
once per step (issue 11's small-step speed); the tree path is ``optim.adam_apply`` leaf by leaf.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from autograd.tracer import getval

import minilora as ml
import minilora.train as train

RNG = np.random.default_rng(7)
D_IN, D_OUT, R = 6, 5, 3
FROZEN = {"W": RNG.standard_normal((D_OUT, D_IN))}
X, Y = RNG.standard_normal((9, D_IN)), RNG.standard_normal((9, D_OUT))


def objective(lora: dict, x: Any, y: Any) -> Any:
    frozen = {"W": FROZEN["W"].astype(x.dtype)}
    return ml.mse_loss(ml.lora_dense(frozen, lora, x, scale=1.7), y)


def lora_of(dtype: str = "float64") -> dict:
    rng = np.random.default_rng(1)
    return {"A": rng.standard_normal((R, D_IN)).astype(dtype), "B": rng.standard_normal((D_OUT, R)).astype(dtype)}


def tree_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(train._FlatAdam, "usable", staticmethod(lambda params, state: False))


def same(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(u, v) for u, v in zip(a, b, strict=True))
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and bool(np.array_equal(a, b))
    return bool(a == b)


OPTIONS = [{}, {"amsgrad": True}, {"weight_decay": 0.1}, {"weight_decay": 0.1, "decoupled": True},
           {"betas": (0.3, 0.5), "eps": 1e-3}]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(o) or "plain")
def test_the_one_array_path_is_the_leaf_path_bit_for_bit(monkeypatch: pytest.MonkeyPatch, opts: dict,
                                                          dtype: str) -> None:
    x, y = X.astype(dtype), Y.astype(dtype)
    fast = ml.fit(objective, lora_of(dtype), (x, y), steps=30, lr=1e-2, return_state=True, **opts)
    with monkeypatch.context() as m:
        tree_path(m)
        slow = ml.fit(objective, lora_of(dtype), (x, y), steps=30, lr=1e-2, return_state=True, **opts)
    assert same(fast[0], slow[0]) and fast[1] == slow[1] and same(fast[2], slow[2])
    # resuming from the returned state continues the same trajectory on both paths
    again = ml.fit(objective, fast[0], (x, y), steps=5, lr=1e-2, state=fast[2], return_state=True, **opts)
    with monkeypatch.context() as m:
        tree_path(m)
        again_slow = ml.fit(objective, slow[0], (x, y), steps=5, lr=1e-2, state=slow[2], return_state=True, **opts)
    assert same(again[0], again_slow[0]) and same(again[2], again_slow[2])


def test_what_a_callback_was_given_is_never_written_again() -> None:
    kept: list = []

    def callback(step: int, loss: float, params: dict, state: dict) -> None:
        kept.append((params, state, {k: v.copy() for k, v in params.items()},
                     {k: v.copy() for k, v in state["m"].items()}))

    lora = lora_of()
    before = {k: v.copy() for k, v in lora.items()}
    ml.fit(objective, lora, (X, Y), steps=10, lr=1e-2, callback=callback)
    assert same(lora, before), "fit wrote into the caller's params"
    for params, state, params_then, m_then in kept:
        assert same(params, params_then) and same(state["m"], m_then)
    assert not np.array_equal(kept[0][0]["A"], kept[-1][0]["A"])


def test_leaves_the_path_does_not_handle_take_the_tree_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nested trees, 0-d leaves and mixed dtypes: the same answer as the leaf-by-leaf update."""
    def nested(p: dict) -> Any:
        return objective(p["lora"], X, Y) + ml.mse_loss(p["scale"] * X[:, :1], Y[:, :1])

    start = {"lora": lora_of(), "scale": np.asarray(0.5)}
    fast = ml.fit(nested, start, (), steps=8, lr=1e-2, return_state=True)
    with monkeypatch.context() as m:
        tree_path(m)
        slow = ml.fit(nested, start, (), steps=8, lr=1e-2, return_state=True)
    assert same(fast, slow)
    assert fast[0]["scale"].shape == ()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the overflow is the point
def test_a_non_finite_loss_reports_the_last_finite_state_on_both_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    def blows_up(lora: dict, x: Any, y: Any) -> Any:
        return objective(lora, x, y) * 1e300 * 1e300 if np.any(np.abs(getval(lora["B"])) > 1.5) else \
            objective(lora, x, y)

    errors = []
    for flat in (True, False):
        with monkeypatch.context() as m:
            if not flat:
                tree_path(m)
            with pytest.raises(ml.NonFiniteError) as e:
                ml.fit(blows_up, lora_of(), (X, Y), steps=500, lr=0.2)
            errors.append(e.value.partial)
    assert same(errors[0][0], errors[1][0]) and errors[0][1] == errors[1][1] and same(errors[0][2], errors[1][2])
    assert errors[0][2]["step"] == len(errors[0][1])


@pytest.mark.parametrize("flat", [True, False])
def test_an_adapter_written_b_first_trains_each_factor_on_its_own_gradient(monkeypatch: pytest.MonkeyPatch,
                                                                          flat: bool) -> None:
    """A square layer with r = d: A and B have one shape, so pairing A's update with B's gradient
    raised nothing. The gradient dict now keeps the adapter's key order, and fit checks it."""
    rng = np.random.default_rng(3)
    d = 4
    W, x, y = rng.standard_normal((d, d)), rng.standard_normal((8, d)), rng.standard_normal((8, d))
    a_first = {"A": rng.standard_normal((d, d)), "B": rng.standard_normal((d, d))}
    b_first = {"B": a_first["B"], "A": a_first["A"]}

    def loss(lora: dict) -> Any:
        return ml.mse_loss(ml.lora_dense({"W": W}, lora, x), y)

    assert list(ml.grad(loss)(b_first)) == ["B", "A"]
    with monkeypatch.context() as m:
        if not flat:
            tree_path(m)
        got, _ = ml.fit(loss, b_first, (), steps=5, lr=1e-2)
        want, _ = ml.fit(loss, a_first, (), steps=5, lr=1e-2)
    assert list(got) == ["B", "A"]
    for k in "AB":
        assert np.array_equal(got[k], want[k]), k
