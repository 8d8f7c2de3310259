"""Every primitive in ``minilora.ops`` verified twice, independently.

(a) Against autograd differentiating the plain ``autograd.numpy`` expression of the same math
    (NumPy only): forward to ~1e-13 and every argument's gradient to ~1e-12, both relative to the
    size of the terms summed (the magnitude bound: the same expression on absolute values), so
    cancellation in a sum cannot fail a correct implementation.
(b) Central finite differences in float64 (``autograd.test_util.check_grads``, forward and
    reverse mode, first order) on NumPy and on array_api_strict arrays on 'device1'.

Plus: the fused LoRA linear never forms ``B @ A`` and never computes the frozen weight's
gradient (every array created is watched), NumPy and array_api_strict gradients and a whole
``fit`` agree to 1e-12.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import autograd
import autograd.numpy as anp
import numpy as np
import pytest
from autograd.numpy.numpy_boxes import ArrayBox
from autograd.numpy.numpy_vspaces import ArrayVSpace
from autograd.test_util import check_grads
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import minilora as ml
from minilora import losses, ops

FWD_RTOL = 1e-13
GRAD_RTOL = 1e-12

# the backend fixture is function-scoped but only selects the backend: safe to share by examples
fixture_ok = settings(suppress_health_check=[HealthCheck.function_scoped_fixture])


# ---------------------------------------------------------------- helpers


def assert_close(got: Any, ref: Any, bound: Any, rtol: float, what: str) -> None:
    """|got - ref| <= rtol * bound elementwise, where bound is the magnitude of the summed terms."""
    got, ref, bound = (np.asarray(a, dtype=np.float64) for a in (got, ref, bound))
    assert got.shape == ref.shape, f"{what}: shape {got.shape} != {ref.shape}"
    err = np.abs(got - ref)
    limit = rtol * bound + 1e-300
    worst = np.max(err / limit) if err.size else 0.0
    assert np.all(err <= limit), (
        f"{what}: error {np.max(err):.3e} exceeds {rtol:g} x bound (ratio {worst:.2f})"
    )


def magnitude_bound(fun: Any, *args: Any, **kwargs: Any) -> Any:
    """``fun`` on absolute values: for a multilinear expression this is sum |term| per entry."""
    return fun(*(None if a is None else np.abs(a) for a in args), **abs_kwargs(kwargs))


def abs_kwargs(kwargs: dict) -> dict:
    return {k: abs(v) if k == "scale" else v for k, v in kwargs.items()}


@dataclass
class LinCase:
    x: np.ndarray
    W: np.ndarray
    b: np.ndarray | None
    A: np.ndarray
    B: np.ndarray
    mask: np.ndarray | None
    R: np.ndarray  # cotangent weights for the scalar sum(out * R)
    scale: float
    fif: bool

    @property
    def d_in(self) -> int:
        return self.x.shape[-1]


@st.composite
def lin_cases(draw: Any) -> LinCase:
    batch = tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=2)))
    d_in, d_out = draw(st.integers(1, 10)), draw(st.integers(1, 10))
    r_max = min(d_in, d_out)
    rank = draw(st.one_of(st.integers(1, r_max), st.just(r_max)))
    fif, bias, masked = draw(st.booleans()), draw(st.booleans()), draw(st.booleans())
    scale = draw(st.floats(-4.0, 4.0))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return LinCase(
        x=rng.standard_normal(batch + (d_in,)),
        W=rng.standard_normal((d_in, d_out) if fif else (d_out, d_in)),
        b=rng.standard_normal(d_out) if bias else None,
        A=rng.standard_normal((rank, d_in)),
        B=rng.standard_normal((d_out, rank)),
        mask=rng.uniform(-2.0, 2.0, batch + (d_in,)) if masked else None,
        R=rng.standard_normal(batch + (d_out,)),
        scale=scale,
        fif=fif,
    )


@dataclass
class LossCase:
    pred: np.ndarray
    target: np.ndarray
    mean: bool


@st.composite
def loss_cases(draw: Any) -> LossCase:
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=0, max_size=3)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    pred = rng.standard_normal(shape)
    # |pred - target| >= 0.1 everywhere: |.| is smooth there, so finite differences are valid
    gap = rng.uniform(0.1, 2.0, shape) * rng.choice([-1.0, 1.0], shape)
    return LossCase(pred=np.asarray(pred), target=np.asarray(pred + gap), mean=draw(st.booleans()))


# ---------------------------------------------------------------- plain autograd.numpy references


def ref_linear(x: Any, W: Any, b: Any = None, *, fan_in_fan_out: bool = False) -> Any:
    y = anp.matmul(x, W if fan_in_fan_out else anp.transpose(W))
    return y if b is None else y + b


def ref_lora_linear(x: Any, W: Any, b: Any, A: Any, B: Any, mask: Any = None, *, scale: float,
                    fan_in_fan_out: bool) -> Any:
    xm = x if mask is None else x * mask
    h = anp.matmul(xm, anp.transpose(A)) * scale
    y = anp.matmul(x, W if fan_in_fan_out else anp.transpose(W)) + anp.matmul(h, anp.transpose(B))
    return y if b is None else y + b


def ref_lora_delta(A: Any, B: Any, *, scale: float, fan_in_fan_out: bool) -> Any:
    d = anp.matmul(B, A) * scale
    return anp.transpose(d) if fan_in_fan_out else d


def ref_l1(pred: Any, target: Any, *, mean: bool) -> Any:
    total = anp.sum(anp.abs(pred - target))
    return total / pred.size if mean else total


def ref_mse(pred: Any, target: Any, *, mean: bool) -> Any:
    d = pred - target
    total = anp.sum(d * d)
    return total / pred.size if mean else total


# ---------------------------------------------------------------- (a) against autograd.numpy


def _compare_multilinear(prim: Any, ref: Any, args: tuple, diff: list[int], R: np.ndarray,
                         kwargs: dict) -> None:
    """Forward and the gradient of sum(out * R) w.r.t. each of ``diff`` (singly and all at once)."""
    got = prim(*args, **kwargs)
    want = ref(*args, **kwargs)
    assert_close(got, want, magnitude_bound(ref, *args, **kwargs), FWD_RTOL, f"{prim.__name__} forward")

    def scalar(f: Any, r: np.ndarray, kw: dict = kwargs) -> Any:
        return lambda *a: anp.sum(f(*a, **kw) * r)

    abs_args = tuple(None if a is None else np.abs(a) for a in args)
    for argnums in [(i,) for i in diff] + [tuple(diff)]:
        g = autograd.grad(scalar(prim, R), argnums)(*args)
        gr = autograd.grad(scalar(ref, R), argnums)(*args)
        gb = autograd.grad(scalar(ref, np.abs(R), abs_kwargs(kwargs)), argnums)(*abs_args)
        for i, a, b_, c in zip(argnums, g, gr, gb, strict=True):
            assert_close(a, b_, c, GRAD_RTOL, f"{prim.__name__} d/d arg{i} (argnums {argnums})")

    # forward mode too: the JVP along a random tangent of each argument
    rng = np.random.default_rng(R.size)
    for i in diff:
        t = rng.standard_normal(np.shape(args[i]))
        _, jv = autograd.make_jvp(lambda *a: prim(*a, **kwargs), i)(*args)(t)
        _, jr = autograd.make_jvp(lambda *a: ref(*a, **kwargs), i)(*args)(t)
        _, jb = autograd.make_jvp(lambda *a: ref(*a, **abs_kwargs(kwargs)), i)(*abs_args)(np.abs(t))
        assert_close(jv, jr, jb, GRAD_RTOL, f"{prim.__name__} JVP along arg{i}")


def _lin_diff(c: LinCase, with_lora: bool) -> list[int]:
    diff = [0, 1] + ([2] if c.b is not None else [])
    if with_lora:
        diff += [3, 4] + ([5] if c.mask is not None else [])
    return diff


@given(lin_cases())
def test_linear_matches_autograd_numpy(c: LinCase) -> None:
    _compare_multilinear(ops.linear, ref_linear, (c.x, c.W, c.b), _lin_diff(c, False), c.R,
                         dict(fan_in_fan_out=c.fif))


@given(lin_cases())
def test_lora_linear_matches_autograd_numpy(c: LinCase) -> None:
    _compare_multilinear(ops.lora_linear, ref_lora_linear, (c.x, c.W, c.b, c.A, c.B, c.mask),
                         _lin_diff(c, True), c.R, dict(scale=c.scale, fan_in_fan_out=c.fif))


@given(lin_cases())
def test_lora_delta_matches_autograd_numpy(c: LinCase) -> None:
    R = np.random.default_rng(c.A.size).standard_normal(c.W.shape)  # delta has W's layout
    _compare_multilinear(ops.lora_delta, ref_lora_delta, (c.A, c.B), [0, 1], R,
                         dict(scale=c.scale, fan_in_fan_out=c.fif))


@pytest.mark.parametrize("prim, ref", [(losses.l1_loss_op, ref_l1), (losses.mse_loss_op, ref_mse)],
                         ids=["l1", "mse"])
@given(c=loss_cases())
def test_losses_match_autograd_numpy(prim: Any, ref: Any, c: LossCase) -> None:
    got, want = prim(c.pred, c.target, mean=c.mean), ref(c.pred, c.target, mean=c.mean)
    assert np.ndim(got) == 0
    # all terms are non-negative: the value itself bounds the rounding
    assert_close(got, want, np.abs(want), FWD_RTOL, f"{prim.__name__} forward")
    for argnums in [(0,), (1,), (0, 1)]:
        g = autograd.grad(lambda p, t: prim(p, t, mean=c.mean), argnums)(c.pred, c.target)
        gr = autograd.grad(lambda p, t: ref(p, t, mean=c.mean), argnums)(c.pred, c.target)
        for i, a, b_ in zip(argnums, g, gr, strict=True):
            assert_close(a, b_, np.abs(b_), GRAD_RTOL, f"{prim.__name__} d/d arg{i}")
    # the cotangent is honoured (not assumed to be 1)
    vjp, _ = autograd.make_vjp(lambda p: prim(p, c.target, mean=c.mean))(c.pred)
    vjp_ref, _ = autograd.make_vjp(lambda p: ref(p, c.target, mean=c.mean))(c.pred)
    assert_close(vjp(np.float64(-2.5)), vjp_ref(np.float64(-2.5)), np.abs(vjp_ref(np.float64(-2.5))),
                 GRAD_RTOL, f"{prim.__name__} vjp with cotangent -2.5")
    # forward mode: JVP = <gradient, tangent>; the bound is sum |gradient * tangent|
    rng = np.random.default_rng(c.pred.size)
    for i in (0, 1):
        t = rng.standard_normal(c.pred.shape)
        args = (c.pred, c.target)
        _, jv = autograd.make_jvp(lambda p, q: prim(p, q, mean=c.mean), i)(*args)(t)
        _, jr = autograd.make_jvp(lambda p, q: ref(p, q, mean=c.mean), i)(*args)(t)
        gi = autograd.grad(lambda p, q: ref(p, q, mean=c.mean), i)(*args)
        assert_close(jv, jr, np.sum(np.abs(gi * t)), GRAD_RTOL, f"{prim.__name__} JVP along arg{i}")


# ---------------------------------------------------------------- (b) finite differences, both backends


def _fd_check(backend: Any, f: Any, args: tuple, diff: list[int]) -> None:
    moved = tuple(None if a is None else backend.put(a) for a in args)
    saved = np.random.get_state()  # check_grads draws its directions from the global generator
    np.random.seed(len(diff))
    try:
        check_grads(f, argnum=tuple(diff), modes=["fwd", "rev"], order=1)(*moved)
        for i in diff:  # each argument alone too: the VJP/JVP take a different branch per argnum set
            check_grads(f, argnum=i, modes=["fwd", "rev"], order=1)(*moved)
    finally:
        np.random.set_state(saved)


@fixture_ok
@given(c=lin_cases())
def test_linear_finite_differences(backend: Any, c: LinCase) -> None:
    def f(x: Any, W: Any, b: Any) -> Any:
        return ops.linear(x, W, b, fan_in_fan_out=c.fif)

    _fd_check(backend, f, (c.x, c.W, c.b), _lin_diff(c, False))


@fixture_ok
@given(c=lin_cases())
def test_lora_linear_finite_differences(backend: Any, c: LinCase) -> None:
    def f(x: Any, W: Any, b: Any, A: Any, B: Any, mask: Any) -> Any:
        return ops.lora_linear(x, W, b, A, B, mask, scale=c.scale, fan_in_fan_out=c.fif)

    _fd_check(backend, f, (c.x, c.W, c.b, c.A, c.B, c.mask), _lin_diff(c, True))


@fixture_ok
@given(c=lin_cases())
def test_lora_delta_finite_differences(backend: Any, c: LinCase) -> None:
    def f(A: Any, B: Any) -> Any:
        return ops.lora_delta(A, B, scale=c.scale, fan_in_fan_out=c.fif)

    _fd_check(backend, f, (c.A, c.B), [0, 1])


@pytest.mark.parametrize("prim", [losses.l1_loss_op, losses.mse_loss_op], ids=["l1", "mse"])
@fixture_ok
@given(c=loss_cases())
def test_losses_finite_differences(backend: Any, prim: Any, c: LossCase) -> None:
    def f(p: Any, t: Any) -> Any:
        return prim(p, t, mean=c.mean)

    _fd_check(backend, f, (c.pred, c.target), [0, 1])


# ---------------------------------------------------------------- efficiency: no B @ A, no frozen dW

D_IN, D_OUT, RANK, BATCH = 7, 5, 2, (3, 4)  # no legitimate intermediate is (5, 7) or (7, 5)


class _Watched(np.ndarray):
    """An ndarray subclass that records every array numpy derives from it (results and views)."""

    created: list[np.ndarray] = []

    def __array_finalize__(self, obj: Any) -> None:
        _Watched.created.append(self)


ArrayBox.register(_Watched)
ArrayVSpace.register(_Watched)


class ArrayWatch:
    """Records every array created on one backend while active: NumPy via ``_Watched`` inputs,
    array_api_strict by wrapping ``Array._new``, through which all its results are made."""

    def __init__(self, backend: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        self.backend = backend
        self.monkeypatch = monkeypatch
        self.created: list[Any] = []

    def put(self, a: np.ndarray) -> Any:
        return np.array(a).view(_Watched) if self.backend.name == "numpy" else self.backend.put(a)

    def __enter__(self) -> ArrayWatch:
        if self.backend.name == "numpy":
            _Watched.created = self.created
        else:
            cls = type(self.backend.put(np.zeros(1)))
            original = cls.__dict__["_new"].__func__
            created = self.created

            def spy(klass: Any, x: Any, /, device: Any) -> Any:
                obj = original(klass, x, device=device)
                created.append(obj)
                return obj

            self.monkeypatch.setattr(cls, "_new", classmethod(spy))
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.backend.name == "numpy":
            _Watched.created = []
        else:
            self.monkeypatch.undo()

    def weight_shaped(self, W: Any) -> list[Any]:
        """Arrays of shape (d_out, d_in) or (d_in, d_out) that are not W or W^T itself."""
        get = self.backend.get
        Wn = get(W)
        shapes = {(D_OUT, D_IN), (D_IN, D_OUT)}
        found = [a for a in self.created if tuple(a.shape) in shapes]
        return [a for a in found if not any(
            get(a).shape == w.shape and np.array_equal(get(a), w) for w in (Wn, Wn.T))]


def _efficiency_inputs(watch: ArrayWatch, fif: bool, bias: bool, masked: bool) -> dict:
    rng = np.random.default_rng(7)
    return dict(
        x=watch.put(rng.standard_normal(BATCH + (D_IN,))),
        W=watch.put(rng.standard_normal((D_IN, D_OUT) if fif else (D_OUT, D_IN))),
        b=watch.put(rng.standard_normal(D_OUT)) if bias else None,
        A=watch.put(rng.standard_normal((RANK, D_IN))),
        B=watch.put(rng.standard_normal((D_OUT, RANK))),
        mask=watch.put(rng.uniform(0.0, 2.0, BATCH + (D_IN,))) if masked else None,
        R=watch.put(rng.standard_normal(BATCH + (D_OUT,))),
    )


@pytest.mark.parametrize("fif", [False, True], ids=["W(out,in)", "fan_in_fan_out"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_lora_linear_never_forms_BA_nor_frozen_weight_grad(backend: Any, monkeypatch: pytest.MonkeyPatch,
                                                           fif: bool, masked: bool, bias: bool) -> None:
    watch = ArrayWatch(backend, monkeypatch)
    v = _efficiency_inputs(watch, fif, bias, masked)
    kw = dict(scale=0.75, fan_in_fan_out=fif)

    def loss(A: Any, B: Any) -> Any:
        # a loss primitive closes the graph: boxes of non-NumPy arrays do math only through ops
        return losses.mse_loss_op(ops.lora_linear(v["x"], v["W"], v["b"], A, B, v["mask"], **kw), v["R"])

    with watch:
        y = ops.lora_linear(v["x"], v["W"], v["b"], v["A"], v["B"], v["mask"], **kw)
    assert tuple(y.shape) == BATCH + (D_OUT,)
    assert watch.created, "the watch saw nothing: it is not hooked in"
    assert watch.weight_shaped(v["W"]) == [], "forward formed a (d_out, d_in) array such as B @ A"

    watch.created.clear()
    with watch:
        gA, gB = ml.grad(loss, (0, 1))(v["A"], v["B"])
    assert tuple(gA.shape) == (RANK, D_IN) and tuple(gB.shape) == (D_OUT, RANK)
    extra = watch.weight_shaped(v["W"])
    assert extra == [], f"grad w.r.t. (A, B) made {len(extra)} weight-shaped array(s): frozen dW or B @ A"


def test_array_watch_detects_weight_gradient_and_BA(backend: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Positive control: the watch does see dW when W is differentiated, and B @ A from lora_delta."""
    watch = ArrayWatch(backend, monkeypatch)
    v = _efficiency_inputs(watch, False, True, False)

    def loss(W: Any, A: Any, B: Any) -> Any:
        return losses.mse_loss_op(ops.lora_linear(v["x"], W, v["b"], A, B, None, scale=0.75), v["R"])

    with watch:
        ml.grad(loss, (0, 1, 2))(v["W"], v["A"], v["B"])
    assert len(watch.weight_shaped(v["W"])) >= 1
    watch.created.clear()
    with watch:
        ops.lora_delta(v["A"], v["B"], scale=0.75)
    assert len(watch.weight_shaped(v["W"])) >= 1


# ---------------------------------------------------------------- NumPy vs array_api_strict


def _problem(seed: int, fif: bool) -> dict:
    rng = np.random.default_rng(seed)
    d_in, d_out, rank = 6, 4, 3
    return dict(
        params={"W": rng.standard_normal((d_in, d_out) if fif else (d_out, d_in)),
                "b": rng.standard_normal(d_out)},
        lora={"A": rng.standard_normal((rank, d_in)), "B": rng.standard_normal((d_out, rank))},
        x=rng.standard_normal((2, 5, d_in)),
        y=rng.standard_normal((2, 5, d_out)),
        mask=rng.choice([0.0, 1.0 / 0.8], (2, 5, d_in), p=[0.2, 0.8]),
    )


def _on(backend_case: Any, tree: Any) -> Any:
    return {k: backend_case.tree(v) if isinstance(v, dict) else backend_case.put(v) for k, v in tree.items()}


def _strict() -> Any:
    from conftest import BackendCase, require

    xps = require("array_api_strict")
    return type(xps.asarray(0.0)), BackendCase("array_api_strict", xps, xps.Device("device1"))


@pytest.mark.parametrize("loss_name", ["l1_loss", "mse_loss"])
@pytest.mark.parametrize("fif", [False, True], ids=["W(out,in)", "fan_in_fan_out"])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_loss_gradients_agree_across_backends(loss_name: str, fif: bool, seed: int) -> None:
    loss_fn = getattr(ml, loss_name)

    def loss(lora: dict, params: dict, x: Any, y: Any, mask: Any) -> Any:
        pred = ml.lora_dense(params, lora, x, scale=1.5, fan_in_fan_out=fif, dropout_mask=mask)
        return loss_fn(pred, y)

    prob = _problem(seed, fif)
    order = ("lora", "params", "x", "y", "mask")
    value_np, grad_np = ml.value_and_grad(loss)(*(prob[k] for k in order))

    Array, case = _strict()
    with ml.use_backend(case.xp, device=case.device):
        moved = _on(case, prob)
        value_s, grad_s = ml.value_and_grad(loss)(*(moved[k] for k in order))
    assert isinstance(value_s, Array) and value_s.device == case.device
    assert float(np.abs(float(value_s) - value_np)) <= 1e-12 * abs(value_np)
    for k in ("A", "B"):
        assert isinstance(grad_s[k], Array) and grad_s[k].device == case.device
        gs = case.get(grad_s[k])
        assert np.max(np.abs(gs - grad_np[k])) <= 1e-12 * np.max(np.abs(grad_np[k])), k
        assert np.any(grad_np[k] != 0)


def test_fit_on_array_api_strict_matches_numpy() -> None:
    prob = _problem(11, False)
    prob["lora"]["B"] = np.zeros_like(prob["lora"]["B"])  # the usual no-op start

    def loss(lora: dict, params: dict, x: Any, y: Any) -> Any:
        return ml.mse_loss(ml.lora_dense(params, lora, x, scale=2.0), y)

    opts = dict(steps=20, lr=0.05, weight_decay=0.01, decoupled=True)
    lora_np, losses_np = ml.fit(loss, prob["lora"], (prob["params"], prob["x"], prob["y"]), **opts)

    Array, case = _strict()
    with ml.use_backend(case.xp, device=case.device):
        moved = _on(case, prob)
        lora_s, losses_s = ml.fit(loss, moved["lora"], (moved["params"], moved["x"], moved["y"]), **opts)

    assert len(losses_s) == len(losses_np) == 20
    assert losses_np[-1] < losses_np[0]  # the run actually trains
    np.testing.assert_allclose(losses_s, losses_np, rtol=1e-12, atol=0)
    for k in ("A", "B"):
        assert isinstance(lora_s[k], Array), type(lora_s[k])
        assert lora_s[k].device == case.device
        got = case.get(lora_s[k])
        assert np.max(np.abs(got - lora_np[k])) <= 1e-12 * np.max(np.abs(lora_np[k])), k
