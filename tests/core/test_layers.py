"""Layer behaviour: initialisers (shapes and statistics), scaling, the LoRA forward against the
dense one, merge/unmerge, dropout masks, parameter counting and the training loop.

Array-producing tests run on NumPy and on array_api_strict (the ``backend`` fixture).

Rounding tolerances use the standard forward-error bound for a dot product of length n,
|fl(u.v) - u.v| <= n * eps * |u|.|v| (Higham, *Accuracy and Stability*, eq. 3.5), evaluated
entry by entry on the host, with a small extra n for the additions around the products.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import minilora as ml

EPS64 = np.finfo(np.float64).eps

# The backend fixture is function-scoped but only selects a backend (the same for every
# example), so reusing it across hypothesis examples is safe. max_examples etc. come from the profile.
with_fixture = settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

dims = st.integers(1, 12)
ranks = st.integers(1, 6)
# LoRA scales are O(1); tiny (subnormal) scales are left out because the relative rounding
# bounds below do not cover underflow.
scales = st.one_of(st.just(0.0), st.floats(1e-6, 4.0), st.floats(-4.0, -1e-6))
seeds = st.integers(0, 2**32 - 1)


def host_layer(seed: int, d_in: int, d_out: int, r: int, n: int = 3, *, fan_in_fan_out: bool = False,
               bias: bool = True) -> tuple[dict, dict, np.ndarray]:
    """Random host params, lora (B non-zero) and x. W is (d_in, d_out) when fan_in_fan_out."""
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((d_in, d_out) if fan_in_fan_out else (d_out, d_in))
    params = {"W": W, "b": rng.standard_normal(d_out)} if bias else {"W": W}
    lora = {"A": rng.standard_normal((r, d_in)), "B": rng.standard_normal((d_out, r))}
    return params, lora, rng.standard_normal((n, d_in))


def kaiming_uniform_bound(fan_in: int, a: float = math.sqrt(5)) -> float:
    """torch.nn.init.kaiming_uniform_(a=sqrt(5)) bound, as nn.Linear and PEFT's LoRA A use:
    gain = sqrt(2 / (1 + a^2)), std = gain / sqrt(fan_in), bound = sqrt(3) * std."""
    gain = math.sqrt(2.0 / (1.0 + a * a))
    return math.sqrt(3.0) * gain / math.sqrt(fan_in)


def kurtosis(a: np.ndarray) -> float:
    """Plain (non-excess) kurtosis: 3 for a normal, 1.8 for a uniform."""
    c = a - a.mean()
    return float(np.mean(c**4) / np.mean(c**2) ** 2)


# ---------------------------------------------------------------- lora_init

@pytest.mark.parametrize("init", ["kaiming", "gaussian", "normal"])
@pytest.mark.parametrize(("d_in", "d_out", "r"), [(16, 8, 4), (1, 1, 1), (5, 30, 7)])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_lora_init_shapes_and_zero_B(backend: Any, init: str, d_in: int, d_out: int, r: int, dtype: str) -> None:
    lora = ml.lora_init(0, d_in, d_out, r, init=init, dtype=dtype)
    assert set(lora) == {"A", "B"}
    A, B = backend.get(lora["A"]), backend.get(lora["B"])
    assert A.shape == (r, d_in) and B.shape == (d_out, r)
    assert A.dtype == np.dtype(dtype) and B.dtype == np.dtype(dtype)
    assert np.all(B == 0), "B starts at zero so the adapter starts as a no-op"
    assert np.any(A != 0), "A must be random, else the adapter can never train"


# Sample sizes: n = 80,000 draws. For a statistic with standard error SE the tolerance is
# 6 SE, so a correct initialiser fails with probability < 1e-8; a wrong distribution
# (another std, or uniform vs normal) is many SE away.
N_DRAWS = 80_000


def test_kaiming_init_statistics() -> None:
    r, d_in = 200, N_DRAWS // 200
    A = ml.lora_init(0, d_in, 3, r, init="kaiming")["A"]
    bound = kaiming_uniform_bound(d_in)
    assert bound == pytest.approx(1 / math.sqrt(d_in), rel=1e-12)
    n = A.size
    assert np.max(np.abs(A)) <= bound
    # P(max |A| < (1 - 1e-3) bound) = (1 - 1e-3)^n ~ e^-80: the draws reach the bound
    assert np.max(A) > (1 - 1e-3) * bound and np.min(A) < -(1 - 1e-3) * bound
    assert abs(A.mean()) < 6 * (bound / math.sqrt(3)) / math.sqrt(n)
    # Var U(-b, b) = b^2/3; relative SE of the sample variance is sqrt(0.8 / n) for a uniform
    assert A.var() / (bound**2 / 3) == pytest.approx(1.0, abs=6 * math.sqrt(0.8 / n))
    assert kurtosis(A) == pytest.approx(1.8, abs=0.1)  # uniform, not normal


@pytest.mark.parametrize(("init", "r", "expected_std"), [("gaussian", 8, 1 / 8), ("gaussian", 2, 1 / 2),
                                                          ("normal", 4, 1.0), ("normal", 16, 1.0)])
def test_normal_init_statistics(init: str, r: int, expected_std: float) -> None:
    """gaussian: A ~ N(0, (1/r)^2) (PEFT); normal: A ~ N(0, 1) (paper, seed blog)."""
    A = ml.lora_init(1, N_DRAWS // r, 3, r, init=init)["A"]
    n = A.size
    # relative SE of a normal sample std is 1/sqrt(2n) (~0.0025 here)
    assert A.std() / expected_std == pytest.approx(1.0, abs=6 / math.sqrt(2 * n))
    assert abs(A.mean()) < 6 * expected_std / math.sqrt(n)
    # SE of the sample kurtosis of a normal is sqrt(24/n) (~0.017): 3 +- 0.12 excludes 1.8
    assert kurtosis(A) == pytest.approx(3.0, abs=7 * math.sqrt(24 / n))


@pytest.mark.parametrize("init", ["kaiming", "gaussian", "normal"])
def test_lora_init_same_seed_same_arrays(backend: Any, init: str) -> None:
    a = ml.lora_init(7, 10, 6, 3, init=init)
    b = ml.lora_init(7, 10, 6, 3, init=init)
    c = ml.lora_init(np.random.default_rng(7), 10, 6, 3, init=init)
    d = ml.lora_init(8, 10, 6, 3, init=init)
    for key in ("A", "B"):
        np.testing.assert_array_equal(backend.get(a[key]), backend.get(b[key]))
        np.testing.assert_array_equal(backend.get(a[key]), backend.get(c[key]))
    assert not np.array_equal(backend.get(a["A"]), backend.get(d["A"]))
    # random numbers are drawn on the host, so every backend gets the same values
    with ml.use_backend("numpy"):
        host = ml.lora_init(7, 10, 6, 3, init=init)
    np.testing.assert_array_equal(backend.get(a["A"]), host["A"])


def test_shared_generator_advances() -> None:
    """Passing one Generator twice gives two different draws (explicit randomness, no reseeding)."""
    rng = np.random.default_rng(3)
    first, second = ml.lora_init(rng, 10, 6, 3), ml.lora_init(rng, 10, 6, 3)
    assert not np.array_equal(first["A"], second["A"])


# ---------------------------------------------------------------- dense_init

@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_dense_init_like_torch_linear(backend: Any, dtype: str) -> None:
    d_in, d_out = 300, 270  # 81,000 weights
    params = ml.dense_init(0, d_in, d_out, dtype=dtype)
    W, b = backend.get(params["W"]), backend.get(params["b"])
    assert W.shape == (d_out, d_in) and b.shape == (d_out,)
    assert W.dtype == np.dtype(dtype) and b.dtype == np.dtype(dtype)
    bound = kaiming_uniform_bound(d_in)  # nn.Linear: W kaiming_uniform_(a=sqrt(5)), b U(+-1/sqrt(fan_in))
    slack = 1 + (np.finfo(dtype).eps if dtype == "float32" else 0.0)
    assert np.max(np.abs(W)) <= bound * slack and np.max(np.abs(b)) <= bound * slack
    assert np.max(W) > (1 - 1e-3) * bound and np.min(W) < -(1 - 1e-3) * bound
    # 270 bias draws: P(max |b| < 0.9 bound) = 0.9^270 ~ 5e-13
    assert np.max(np.abs(b)) > 0.9 * bound
    assert W.var() / (bound**2 / 3) == pytest.approx(1.0, abs=6 * math.sqrt(0.8 / W.size))


def test_dense_init_without_bias_and_seeding(backend: Any) -> None:
    params = ml.dense_init(5, 4, 3, bias=False)
    assert set(params) == {"W"}
    again = ml.dense_init(np.random.default_rng(5), 4, 3, bias=False)
    np.testing.assert_array_equal(backend.get(params["W"]), backend.get(again["W"]))


# ---------------------------------------------------------------- lora_scale

@given(alpha=st.floats(-1e6, 1e6, allow_nan=False), r=st.integers(1, 4096))
def test_lora_scale(alpha: float, r: int) -> None:
    s, s_rs = ml.lora_scale(alpha, r), ml.lora_scale(alpha, r, rslora=True)
    assert isinstance(s, float) and isinstance(s_rs, float)
    assert s * r == pytest.approx(alpha, rel=1e-12, abs=1e-300)
    assert s_rs * math.sqrt(r) == pytest.approx(alpha, rel=1e-12, abs=1e-300)
    assert s_rs == pytest.approx(s * math.sqrt(r), rel=1e-12, abs=1e-300)  # rsLoRA grows with sqrt(r)


def test_lora_scale_examples() -> None:
    assert ml.lora_scale(16, 16) == 1.0
    assert ml.lora_scale(16, 4) == 4.0
    assert ml.lora_scale(16, 4, rslora=True) == 8.0
    assert ml.lora_scale(1, 1, rslora=True) == ml.lora_scale(1, 1) == 1.0


# ---------------------------------------------------------------- lora_dense vs dense

@with_fixture
@given(seed=seeds, d_in=dims, d_out=dims, r=ranks, scale=scales, fif=st.booleans(), bias=st.booleans(),
       batch=st.sampled_from([(3,), (1,), (2, 3)]))
def test_lora_dense_with_zero_B_equals_dense(backend: Any, seed: int, d_in: int, d_out: int, r: int,
                                             scale: float, fif: bool, bias: bool, batch: tuple) -> None:
    params, lora, _ = host_layer(seed, d_in, d_out, r, fan_in_fan_out=fif, bias=bias)
    lora["B"][:] = 0.0
    x = np.random.default_rng(seed + 1).standard_normal((*batch, d_in))
    p, l, xb = backend.tree(params), backend.tree(lora), backend.put(x)
    y = backend.get(ml.lora_dense(p, l, xb, scale=scale, fan_in_fan_out=fif))
    y0 = backend.get(ml.dense(p, xb, fan_in_fan_out=fif))
    assert y.shape == (*batch, d_out)
    np.testing.assert_array_equal(y, y0)


@with_fixture
@given(seed=seeds, d_in=dims, d_out=dims, r=ranks, scale=scales, fif=st.booleans())
def test_lora_dense_with_zero_dropout_mask_equals_dense(backend: Any, seed: int, d_in: int, d_out: int, r: int,
                                                        scale: float, fif: bool) -> None:
    params, lora, x = host_layer(seed, d_in, d_out, r, fan_in_fan_out=fif)
    p, l, xb = backend.tree(params), backend.tree(lora), backend.put(x)
    zero = backend.put(np.zeros_like(x))
    y = backend.get(ml.lora_dense(p, l, xb, scale=scale, fan_in_fan_out=fif, dropout_mask=zero))
    np.testing.assert_array_equal(y, backend.get(ml.dense(p, xb, fan_in_fan_out=fif)))


@with_fixture
@given(seed=seeds, d_in=dims, d_out=dims, r=ranks, scale=scales, fif=st.booleans(), p_drop=st.sampled_from([0.0, 0.3]))
def test_lora_dense_matches_host_formula(backend: Any, seed: int, d_in: int, d_out: int, r: int, scale: float,
                                         fif: bool, p_drop: float) -> None:
    """y = x W^T + b + s ((x * mask) A^T) B^T, computed here with NumPy on the host."""
    params, lora, x = host_layer(seed, d_in, d_out, r, fan_in_fan_out=fif)
    mask = ml.to_numpy(ml.dropout_mask(seed, x.shape, p_drop))
    Wt = params["W"] if fif else params["W"].T  # (d_in, d_out)
    want = x @ Wt + params["b"] + scale * ((x * mask) @ lora["A"].T) @ lora["B"].T
    got = backend.get(ml.lora_dense(backend.tree(params), backend.tree(lora), backend.put(x), scale=scale,
                                    fan_in_fan_out=fif, dropout_mask=backend.put(mask)))
    low_rank = (np.abs(x * mask) @ np.abs(lora["A"]).T) @ np.abs(lora["B"]).T
    size = np.abs(x) @ np.abs(Wt) + np.abs(params["b"]) + abs(scale) * low_rank
    assert np.all(np.abs(got - want) <= 2 * (d_in + r + 3) * EPS64 * size)


def test_lora_dense_does_not_modify_inputs(backend: Any) -> None:
    params, lora, x = host_layer(0, 6, 5, 2)
    mask = np.where(np.random.default_rng(1).random(x.shape) < 0.5, 0.0, 2.0)
    p, l, xb, mb = backend.tree(params), backend.tree(lora), backend.put(x), backend.put(mask)
    p_keys, l_keys = list(p), list(l)
    ml.lora_dense(p, l, xb, scale=2.0, dropout_mask=mb)
    ml.dense(p, xb)
    assert list(p) == p_keys and list(l) == l_keys
    for tree, host in ((p, params), (l, lora)):
        for k in host:
            np.testing.assert_array_equal(backend.get(tree[k]), host[k])
    np.testing.assert_array_equal(backend.get(xb), x)
    np.testing.assert_array_equal(backend.get(mb), mask)


# ---------------------------------------------------------------- merge / unmerge / delta_weight

@pytest.mark.parametrize("op", [ml.merge, ml.unmerge])
def test_merge_returns_new_dict_and_keeps_inputs(backend: Any, op: Any) -> None:
    params, lora, _ = host_layer(2, 6, 5, 3)
    params["extra"] = np.arange(4.0)
    p, l = backend.tree(params), backend.tree(lora)
    out = op(p, l, scale=0.5)
    assert out is not p and set(out) == {"W", "b", "extra"}
    assert list(p) == ["W", "b", "extra"] and set(l) == {"A", "B"}
    for k in params:  # inputs untouched
        np.testing.assert_array_equal(backend.get(p[k]), params[k])
    for k in lora:
        np.testing.assert_array_equal(backend.get(l[k]), lora[k])
    np.testing.assert_array_equal(backend.get(out["b"]), params["b"])  # extra keys carried over
    np.testing.assert_array_equal(backend.get(out["extra"]), params["extra"])
    assert not np.array_equal(backend.get(out["W"]), params["W"])


@with_fixture
@given(seed=seeds, d_in=dims, d_out=dims, r=ranks, scale=scales, fif=st.booleans())
def test_dense_of_merge_equals_lora_dense(backend: Any, seed: int, d_in: int, d_out: int, r: int,
                                          scale: float, fif: bool) -> None:
    params, lora, x = host_layer(seed, d_in, d_out, r, fan_in_fan_out=fif)
    p, l, xb = backend.tree(params), backend.tree(lora), backend.put(x)
    merged = ml.merge(p, l, scale=scale, fan_in_fan_out=fif)
    assert backend.get(merged["W"]).shape == params["W"].shape
    y_merged = backend.get(ml.dense(merged, xb, fan_in_fan_out=fif))
    y_lora = backend.get(ml.lora_dense(p, l, xb, scale=scale, fan_in_fan_out=fif))
    Wt = np.abs(params["W"] if fif else params["W"].T)
    BAt = abs(scale) * (np.abs(lora["B"]) @ np.abs(lora["A"])).T  # (d_in, d_out)
    size = np.abs(x) @ (Wt + BAt) + np.abs(params["b"])
    assert np.all(np.abs(y_merged - y_lora) <= 4 * (d_in + r + 3) * EPS64 * size)


@with_fixture
@given(seed=seeds, d_in=dims, d_out=dims, r=ranks, scale=scales, fif=st.booleans())
def test_unmerge_inverts_merge(backend: Any, seed: int, d_in: int, d_out: int, r: int, scale: float, fif: bool) -> None:
    params, lora, _ = host_layer(seed, d_in, d_out, r, fan_in_fan_out=fif)
    p, l = backend.tree(params), backend.tree(lora)
    back = ml.unmerge(ml.merge(p, l, scale=scale, fan_in_fan_out=fif), l, scale=scale, fan_in_fan_out=fif)
    BA = abs(scale) * (np.abs(lora["B"]) @ np.abs(lora["A"]))
    size = np.abs(params["W"]) + (BA.T if fif else BA)
    assert np.all(np.abs(backend.get(back["W"]) - params["W"]) <= 2 * (r + 2) * EPS64 * size)
    np.testing.assert_array_equal(backend.get(back["b"]), params["b"])


@with_fixture
@given(seed=seeds, d_in=dims, d_out=dims, r=ranks, scale=scales)
def test_delta_weight_shape_and_transposition(backend: Any, seed: int, d_in: int, d_out: int, r: int,
                                             scale: float) -> None:
    _, lora, _ = host_layer(seed, d_in, d_out, r)
    l = backend.tree(lora)
    delta = backend.get(ml.delta_weight(l, scale=scale))
    delta_t = backend.get(ml.delta_weight(l, scale=scale, fan_in_fan_out=True))
    assert delta.shape == (d_out, d_in) and delta_t.shape == (d_in, d_out)
    want = scale * lora["B"] @ lora["A"]
    tol = 2 * (r + 2) * EPS64 * abs(scale) * (np.abs(lora["B"]) @ np.abs(lora["A"]))
    assert np.all(np.abs(delta - want) <= tol)
    assert np.all(np.abs(delta_t - want.T) <= tol.T)
    # merge adds exactly the delta
    W = np.random.default_rng(seed).standard_normal((d_out, d_in))
    merged = backend.get(ml.merge({"W": backend.put(W)}, l, scale=scale)["W"])
    np.testing.assert_array_equal(merged, W + delta)


def test_delta_weight_default_scale_is_one(backend: Any) -> None:
    _, lora, _ = host_layer(0, 4, 3, 2)
    l = backend.tree(lora)
    np.testing.assert_array_equal(backend.get(ml.delta_weight(l)), backend.get(ml.delta_weight(l, scale=1.0)))
    assert np.allclose(backend.get(ml.delta_weight(l)), lora["B"] @ lora["A"], rtol=1e-14, atol=1e-14)


# ---------------------------------------------------------------- dropout_mask

@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_mask_values_and_keep_fraction(backend: Any, p: float) -> None:
    shape = (400, 250)
    mask = backend.get(ml.dropout_mask(0, shape, p))
    n = mask.size
    assert mask.shape == shape and mask.dtype == np.float64
    keep_value = 1.0 / (1.0 - p)
    assert set(np.unique(mask).tolist()) == {0.0, keep_value}
    # the kept fraction is Binomial(n, 1-p)/n: SE sqrt(p (1-p) / n) ~ 0.0016 at p = 0.5
    kept = np.count_nonzero(mask) / n
    assert kept == pytest.approx(1 - p, abs=6 * math.sqrt(p * (1 - p) / n))
    assert mask.mean() == pytest.approx(1.0, abs=6 * keep_value * math.sqrt(p * (1 - p) / n))  # inverted dropout


@pytest.mark.parametrize(("p", "value"), [(0.0, 1.0), (1.0, 0.0)])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_dropout_mask_extremes(backend: Any, p: float, value: float, dtype: str) -> None:
    mask = backend.get(ml.dropout_mask(3, (7, 5), p, dtype=dtype))
    assert mask.dtype == np.dtype(dtype) and mask.shape == (7, 5)
    assert np.all(mask == value)


def test_dropout_mask_seeded(backend: Any) -> None:
    a = backend.get(ml.dropout_mask(11, (6, 9), 0.4))
    b = backend.get(ml.dropout_mask(np.random.default_rng(11), (6, 9), 0.4))
    c = backend.get(ml.dropout_mask(12, (6, 9), 0.4))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


# ---------------------------------------------------------------- count_params

TREES = [
    ({"W": (3, 4)}, 12),
    ({"l1": {"W": (3, 4), "b": (3,)}, "l2": {"A": (2, 5), "B": (6, 2)}}, 12 + 3 + 10 + 12),
    ([{"A": (2, 5)}, ({"B": (7,)}, (1, 1)), [(2, 2, 2)]], 10 + 7 + 1 + 8),
    ({"scalar": (), "empty": (0, 5)}, 1),
    ({}, 0),
    ([], 0),
]


@pytest.mark.parametrize(("shapes", "expected"), TREES)
def test_count_params_nested(backend: Any, shapes: Any, expected: int) -> None:
    def build(t: Any) -> Any:
        if isinstance(t, dict):
            return {k: build(v) for k, v in t.items()}
        if isinstance(t, list):
            return [build(v) for v in t]
        if isinstance(t, tuple) and all(isinstance(v, int) for v in t):
            return backend.put(np.zeros(t))
        return tuple(build(v) for v in t)

    total = ml.count_params(build(shapes))
    assert total == expected and isinstance(total, int)


def test_count_params_of_inits() -> None:
    assert ml.count_params(ml.lora_init(0, 100, 100, 4)) == 4 * 100 + 100 * 4
    assert ml.count_params(ml.dense_init(0, 7, 3)) == 7 * 3 + 3
    assert ml.count_params(ml.dense_init(0, 7, 3, bias=False)) == 7 * 3


# ---------------------------------------------------------------- fit and grad

def regression(backend: Any, seed: int = 0) -> tuple[Any, dict, tuple, np.ndarray]:
    """y = x W_true^T + b_true; a dense layer from zero learns it under mse."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((64, 5))
    W_true, b_true = rng.standard_normal((3, 5)), rng.standard_normal(3)
    y = x @ W_true.T + b_true
    params = backend.tree({"W": np.zeros((3, 5)), "b": np.zeros(3)})

    def loss(p: dict, xb: Any, yb: Any) -> Any:
        return ml.mse_loss(ml.dense(p, xb), yb)

    return loss, params, (backend.put(x), backend.put(y)), W_true


def test_fit_decreases_loss(backend: Any) -> None:
    loss, params, args, W_true = regression(backend)
    before = {k: backend.get(v).copy() for k, v in params.items()}
    out, losses = ml.fit(loss, params, args, steps=300, lr=0.05)
    assert len(losses) == 300 and all(isinstance(v, float) for v in losses)
    assert losses[0] == pytest.approx(float(loss(params, *args)), rel=1e-15)
    assert losses[-1] < 1e-3 * losses[0]
    assert np.mean(losses[-50:]) < np.mean(losses[:50])
    np.testing.assert_allclose(backend.get(out["W"]), W_true, atol=0.05)
    for k in params:  # the input params are not modified
        np.testing.assert_array_equal(backend.get(params[k]), before[k])


def test_fit_callback_and_early_stop(backend: Any) -> None:
    loss, params, args, _ = regression(backend)
    seen: list[tuple[int, float, int]] = []

    def record(step: int, value: float, p: dict, state: dict) -> None:
        seen.append((step, value, state["step"]))

    _, losses = ml.fit(loss, params, args, steps=7, lr=0.05, callback=record)
    assert [s for s, _, _ in seen] == list(range(1, 8))
    assert [v for _, v, _ in seen] == losses
    assert [t for _, _, t in seen] == list(range(1, 8))

    calls: list[int] = []

    def stop_at_3(step: int, value: float, p: dict, state: dict) -> bool:
        calls.append(step)
        return step == 3

    out, losses3, state = ml.fit(loss, params, args, steps=50, lr=0.05, callback=stop_at_3, return_state=True)
    assert calls == [1, 2, 3] and losses3 == losses[:3] and state["step"] == 3
    ref, _ = ml.fit(loss, params, args, steps=3, lr=0.05)
    for k in ref:
        np.testing.assert_array_equal(backend.get(out[k]), backend.get(ref[k]))


@pytest.mark.parametrize("split", [1, 4, 9])
def test_fit_resume_equals_uninterrupted(backend: Any, split: int) -> None:
    loss, params, args, _ = regression(backend)
    options = dict(lr=0.03, weight_decay=0.01, decoupled=True)
    full, losses_full, state_full = ml.fit(loss, params, args, steps=10, return_state=True, **options)
    half, losses_a, state_a = ml.fit(loss, params, args, steps=split, return_state=True, **options)
    assert state_a["step"] == split
    rest, losses_b, state_b = ml.fit(loss, half, args, steps=10 - split, state=state_a, return_state=True, **options)
    assert losses_a + losses_b == losses_full
    assert state_b["step"] == state_full["step"] == 10
    for k in full:
        np.testing.assert_array_equal(backend.get(rest[k]), backend.get(full[k]))
        np.testing.assert_array_equal(backend.get(state_b["v"][k]), backend.get(state_full["v"][k]))


@pytest.mark.parametrize("amsgrad", [False, True])
def test_adam_keeps_zero_d_parameters_arrays(amsgrad: bool) -> None:
    # NumPy hands back a scalar for arithmetic on 0-d arrays; a parameter, its moments and its
    # update must stay arrays (writable, and the same type as they went in) step after step
    params = {"s": np.asarray(1.5), "w": np.ones(3)}
    state = ml.adam_init(params, amsgrad=amsgrad)
    for _ in range(2):
        params, state = ml.adam_step(params, {"s": np.asarray(0.3), "w": np.ones(3)}, state, lr=0.1,
                                     amsgrad=amsgrad)
    keys = ("m", "v", "v_max") if amsgrad else ("m", "v")
    for a in [params["s"], *(state[k]["s"] for k in keys)]:
        assert type(a) is np.ndarray and a.shape == ()
    assert float(params["s"]) < 1.5  # it moved against the positive gradient


def test_fit_zero_steps(backend: Any) -> None:
    loss, params, args, _ = regression(backend)
    out, losses, state = ml.fit(loss, params, args, steps=0, lr=0.1, return_state=True)
    assert losses == [] and state["step"] == 0
    for k in params:
        np.testing.assert_array_equal(backend.get(out[k]), backend.get(params[k]))


def test_fit_with_per_step_batches_equals_manual_loop(backend: Any) -> None:
    """data_or_args as a callable: called with 1..steps, its batch is used for that step."""
    loss, params, _, W_true = regression(backend)
    rng = np.random.default_rng(5)
    xs = [rng.standard_normal((8, 5)) for _ in range(6)]
    batches = [(backend.put(x), backend.put(x @ W_true.T)) for x in xs]
    asked: list[int] = []

    def data(step: int) -> tuple:
        asked.append(step)
        return batches[step - 1]

    out, losses = ml.fit(loss, params, data, steps=6, lr=0.1)
    assert asked == [1, 2, 3, 4, 5, 6]
    vg = ml.value_and_grad(loss)
    p, state, manual = params, ml.adam_init(params), []
    for batch in batches:
        value, g = vg(p, *batch)
        manual.append(float(value))
        p, state = ml.adam_step(p, g, state, lr=0.1)
    assert losses == manual
    for k in p:
        np.testing.assert_array_equal(backend.get(out[k]), backend.get(p[k]))


def test_grad_freezes_by_argument(backend: Any) -> None:
    """grad w.r.t. the lora dict: keys A and B only, shaped like A and B; the frozen layer gets none."""
    params, lora, x = host_layer(4, 6, 5, 2)
    y = np.random.default_rng(9).standard_normal((3, 5))
    p, l, xb, yb = backend.tree(params), backend.tree(lora), backend.put(x), backend.put(y)

    def loss(lora_: dict, frozen: dict, xb_: Any, yb_: Any) -> Any:
        return ml.mse_loss(ml.lora_dense(frozen, lora_, xb_, scale=0.5), yb_)

    g = ml.grad(loss)(l, p, xb, yb)
    assert set(g) == {"A", "B"}
    assert backend.get(g["A"]).shape == (2, 6) and backend.get(g["B"]).shape == (5, 2)
    value, g2 = ml.value_and_grad(loss)(l, p, xb, yb)
    assert float(value) == pytest.approx(float(loss(l, p, xb, yb)), rel=1e-15)
    for k in g:
        np.testing.assert_array_equal(backend.get(g[k]), backend.get(g2[k]))
    # with B = 0 the gradient w.r.t. A vanishes (dA = s (G B)^T X), the one w.r.t. B does not
    l0 = {"A": l["A"], "B": backend.put(np.zeros((5, 2)))}
    g0 = ml.grad(loss)(l0, p, xb, yb)
    assert np.all(backend.get(g0["A"]) == 0) and np.any(backend.get(g0["B"]) != 0)
    # the frozen dict is differentiable too when asked for: keys W and b
    assert set(ml.grad(loss, 1)(l, p, xb, yb)) == {"W", "b"}
