"""Every primitive is differentiable to second order, in both modes, on both backends.

(a) ``autograd.test_util.check_grads(..., modes=["fwd", "rev"], order=2)``: central finite
    differences of the JVP and the VJP themselves (forward-over-forward, reverse-over-forward,
    forward-over-reverse, reverse-over-reverse), on hypothesis shapes with masks,
    ``fan_in_fan_out``, bias and no bias, on NumPy and on array_api_strict arrays on 'device1'.
(b) Against the plain ``autograd.numpy`` expression of the same math (NumPy): for a loss of the
    primitive, the JVP of the gradient, the gradient of the gradient and ``ml.hvp`` agree to
    1e-10 (float64), relative to the largest entry of the reference.

Before these derivatives were written in differentiable operations (``minilora.array_ops``),
forward-over-reverse gave zeros without an error: ``test_jvp_of_grad_is_not_zero`` is that
reproduction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import autograd
import autograd.numpy as anp
import numpy as np
import pytest
from autograd.test_util import check_grads
from helpers import require
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import minilora as ml
from minilora import losses, ops
from minilora.errors import MiniLoraTypeError, MiniLoraValueError
from minilora.variants import primitives

TOL = 1e-10
few = settings(max_examples=12, deadline=None,
               suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@dataclass
class Case:
    x: np.ndarray
    W: np.ndarray
    b: np.ndarray | None
    A: np.ndarray
    B: np.ndarray
    m: np.ndarray
    mask: np.ndarray | None
    y: np.ndarray
    scale: float
    fif: bool


@st.composite
def cases(draw: Any) -> Case:
    batch = tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=2)))
    d_in, d_out = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    r = draw(st.integers(1, min(d_in, d_out)))
    fif, bias, masked = draw(st.booleans()), draw(st.booleans()), draw(st.booleans())
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return Case(
        x=rng.standard_normal(batch + (d_in,)),
        W=rng.standard_normal((d_in, d_out) if fif else (d_out, d_in)),
        b=rng.standard_normal(d_out) if bias else None,
        A=rng.standard_normal((r, d_in)),
        B=rng.standard_normal((d_out, r)),
        m=rng.uniform(0.5, 2.0, d_out),
        mask=rng.uniform(-2.0, 2.0, batch + (d_in,)) if masked else None,
        y=rng.standard_normal(batch + (d_out,)),
        scale=draw(st.floats(-3.0, 3.0)),
        fif=fif,
    )


def _check2(backend: Any, f: Any, args: tuple, argnums: list[int]) -> None:
    moved = tuple(None if a is None else backend.tree(a) if isinstance(a, dict) else backend.put(a) for a in args)
    saved = np.random.get_state()  # check_grads draws its directions from the global generator
    np.random.seed(len(argnums))
    try:
        check_grads(f, argnum=tuple(argnums), modes=["fwd", "rev"], order=2)(*moved)
        for i in argnums:  # each argument alone: the formulas take another branch per argnum set
            check_grads(f, argnum=i, modes=["fwd", "rev"], order=2)(*moved)
    finally:
        np.random.set_state(saved)


def _diff(c: Case, *extra: int) -> list[int]:
    return [0, 1] + ([2] if c.b is not None else []) + list(extra)


# ---------------------------------------------------------------- (a) finite differences, order 2


@few
@given(c=cases())
def test_linear_second_order(backend: Any, c: Case) -> None:
    _check2(backend, lambda x, W, b: ops.linear(x, W, b, fan_in_fan_out=c.fif), (c.x, c.W, c.b), _diff(c))


@few
@given(c=cases())
def test_lora_linear_second_order(backend: Any, c: Case) -> None:
    def f(x: Any, W: Any, b: Any, A: Any, B: Any, mask: Any) -> Any:
        return ops.lora_linear(x, W, b, A, B, mask, scale=c.scale, fan_in_fan_out=c.fif)

    _check2(backend, f, (c.x, c.W, c.b, c.A, c.B, c.mask), _diff(c, 3, 4, *([5] if c.mask is not None else [])))


@few
@given(c=cases())
def test_lora_linear_tree_second_order(backend: Any, c: Case) -> None:
    def f(x: Any, W: Any, b: Any, lora: Any) -> Any:
        return ops.lora_linear_tree(x, W, b, lora, c.mask if c.mask is None else backend.put(c.mask),
                                    scale=c.scale, fan_in_fan_out=c.fif)

    _check2(backend, f, (c.x, c.W, c.b, {"A": c.A, "B": c.B}), _diff(c, 3))


@few
@given(c=cases())
def test_lora_delta_and_tanh_second_order(backend: Any, c: Case) -> None:
    _check2(backend, lambda A, B: ops.lora_delta(A, B, scale=c.scale, fan_in_fan_out=c.fif), (c.A, c.B), [0, 1])
    _check2(backend, ops.tanh, (c.x,), [0])


@few
@given(c=cases(), mean=st.booleans())
def test_losses_second_order(backend: Any, c: Case, mean: bool) -> None:
    # |pred - target| >= 0.1: |.| is smooth there, so finite differences of L1's gradient are valid
    gap = np.random.default_rng(c.y.size).uniform(0.1, 2.0, c.y.shape) * np.sign(c.y + 1e-3)
    for prim in (losses.mse_loss_op, losses.l1_loss_op):
        _check2(backend, lambda p, t, prim=prim: prim(p, t, mean=mean), (c.y, c.y + gap), [0, 1])


@few
@given(c=cases())
def test_dora_linear_second_order(backend: Any, c: Case) -> None:
    """x, b, m and the mask: W, A and B enter DoRA's norm, which is detached by design (PEFT), so
    finite differences do not see the primitive's derivative there; (b) checks those."""
    W, A, B = (backend.put(a) for a in (c.W, c.A, c.B))

    def f(x: Any, b: Any, m: Any, mask: Any) -> Any:
        return primitives.dora_linear(x, W, b, A, B, m, mask, scale=c.scale, fan_in_fan_out=c.fif)

    b = c.b if c.b is not None else np.zeros(c.m.shape)
    _check2(backend, f, (c.x, b, c.m, c.mask), [0, 1, 2] + ([3] if c.mask is not None else []))


@few
@given(c=cases())
def test_lora_embedding_second_order(backend: Any, c: Case) -> None:
    rng = np.random.default_rng(c.x.size)
    num, dim, r = 6, c.B.shape[0], c.A.shape[0]
    ids = rng.integers(0, num, c.x.shape[:-1])
    ids_b = ids if backend.name == "numpy" else backend.xp.asarray(ids, device=backend.device)
    W, A = rng.standard_normal((num, dim)), rng.standard_normal((r, num))
    _check2(backend, lambda W_, A_, B_: primitives.lora_embedding(ids_b, W_, A_, B_, scale=c.scale),
            (W, A, c.B), [0, 1, 2])
    Wb, Ab, Bb = (backend.put(a) for a in (W, A, c.B))
    _check2(backend, lambda m_: primitives.lora_embedding(ids_b, Wb, Ab, Bb, m_, scale=c.scale), (c.m[:dim],), [0])


# ---------------------------------------------------------------- (b) against autograd.numpy


def _ref_lora(x: Any, W: Any, b: Any, A: Any, B: Any, mask: Any, scale: float, fif: bool) -> Any:
    xm = x if mask is None else x * mask
    y = anp.matmul(x, W if fif else anp.transpose(W)) + anp.matmul(anp.matmul(xm, anp.transpose(A)) * scale,
                                                                   anp.transpose(B))
    return y if b is None else y + b


def _ref_dora(x: Any, W: Any, b: Any, A: Any, B: Any, m: Any, mask: Any, scale: float, fif: bool) -> Any:
    Wv, Av, Bv = (autograd.tracer.getval(a) for a in (W, A, B))
    V = (Wv.T if fif else Wv) + (Bv @ Av) * scale
    n = np.sqrt(np.sum(V * V, axis=1))  # detached, as PEFT
    c = m / n
    xm = x if mask is None else x * mask
    Wt = W if fif else anp.transpose(W)
    low = anp.matmul(anp.matmul(xm, anp.transpose(A)) * scale, anp.transpose(B))
    y = anp.matmul(x, Wt) + (c - 1) * anp.matmul(xm, Wt) + c * low
    return y if b is None else y + b


def _close(got: Any, ref: Any, what: str) -> None:
    got, ref = ml.to_numpy(got), ml.to_numpy(ref)
    if isinstance(ref, dict):
        for k in ref:
            _close(got[k], ref[k], f"{what}[{k!r}]")
        return
    got, ref = np.asarray(got, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape, f"{what}: shape {got.shape} != {ref.shape}"
    # relative to the largest entry; entries that are 0 in exact arithmetic come out as rounding
    # noise (1e-18 to 1e-16: autograd.numpy differentiates |d| as d / |d|) in the reference, hence
    # the floor (absolute 1e-13: the values compared here are 1e-2 to 1e2)
    scale = max(float(np.max(np.abs(ref))) if ref.size else 0.0, 1e-3)
    err = float(np.max(np.abs(got - ref))) if ref.size else 0.0
    assert err <= TOL * scale, f"{what}: error {err:.3e} > {TOL:g} x {scale:.3e}"


def _at(fun: Any, args: tuple, j: int) -> Any:
    """fun as a function of argument j alone, the others fixed at ``args``."""
    return lambda p: fun(*args[:j], p, *args[j + 1:])


def _pair(f: Any, fr: Any, args: tuple, i: int, j: int, u: Any, v: Any, what: str) -> None:
    """d/dj of grad_i as forward-over-reverse (JVP of the gradient), reverse-over-reverse (grad of
    <grad_i, u>) and reverse-over-forward (grad of the JVP along u)."""
    fo = autograd.make_jvp(_at(ml.grad(f, i), args, j))(args[j])(v)[1]
    fo_r = autograd.make_jvp(_at(autograd.grad(fr, i), args, j))(args[j])(v)[1]
    _close(fo, fo_r, f"{what}: forward-over-reverse d{j} grad{i}")
    rr = ml.grad(lambda *a: anp.sum(ml.grad(f, i)(*a) * u), j)(*args)
    rr_r = autograd.grad(lambda *a: anp.sum(autograd.grad(fr, i)(*a) * u), j)(*args)
    _close(rr, rr_r, f"{what}: reverse-over-reverse d{j} grad{i}")
    rf = ml.grad(lambda *a: autograd.make_jvp(f, i)(*a)(u)[1], j)(*args)
    rf_r = autograd.grad(lambda *a: autograd.make_jvp(fr, i)(*a)(u)[1], j)(*args)
    _close(rf, rf_r, f"{what}: reverse-over-forward d{j} jvp{i}")


def _all_second_derivatives(f: Any, fr: Any, args: tuple, argnums: list[int], what: str) -> None:
    """Every pair (i, j) of ``_pair``, and forward-over-forward (a JVP of a JVP) for the first."""
    rng = np.random.default_rng(len(argnums))
    for i in argnums:
        u = rng.standard_normal(np.shape(args[i]))
        for j in argnums:
            _pair(f, fr, args, i, j, u, rng.standard_normal(np.shape(args[j])), what)
    i = argnums[0]
    u, w = rng.standard_normal(np.shape(args[i])), rng.standard_normal(np.shape(args[i]))
    ff = autograd.make_jvp(lambda p: autograd.make_jvp(_at(f, args, i))(p)(u)[1])(args[i])(w)[1]
    ff_r = autograd.make_jvp(lambda p: autograd.make_jvp(_at(fr, args, i))(p)(u)[1])(args[i])(w)[1]
    _close(ff, ff_r, f"{what}: forward-over-forward d{i} jvp{i}")


@few
@given(c=cases())
def test_lora_linear_second_derivatives_match_autograd_numpy(c: Case) -> None:
    def f(x: Any, W: Any, A: Any, B: Any, y: Any) -> Any:
        return losses.mse_loss_op(ops.lora_linear(x, W, c.b, A, B, c.mask, scale=c.scale, fan_in_fan_out=c.fif), y)

    def fr(x: Any, W: Any, A: Any, B: Any, y: Any) -> Any:
        return anp.mean((_ref_lora(x, W, c.b, A, B, c.mask, c.scale, c.fif) - y) ** 2)

    _all_second_derivatives(f, fr, (c.x, c.W, c.A, c.B, c.y), [0, 1, 2, 3, 4], "lora_linear+mse")


# |.|'' is zero almost everywhere, so the reference's second derivative in y is identically zero and
# autograd warns about it on the plain expression; the comparison itself is the check.
@pytest.mark.filterwarnings("ignore:Output seems independent of input")
@few
@given(c=cases())
def test_linear_tanh_l1_second_derivatives_match_autograd_numpy(c: Case) -> None:
    def f(x: Any, W: Any, y: Any) -> Any:
        return losses.l1_loss_op(ops.tanh(ops.linear(x, W, c.b, fan_in_fan_out=c.fif)), y, mean=False)

    def fr(x: Any, W: Any, y: Any) -> Any:
        z = anp.matmul(x, W if c.fif else anp.transpose(W))
        return anp.sum(anp.abs(anp.tanh(z if c.b is None else z + c.b) - y))

    _all_second_derivatives(f, fr, (c.x, c.W, c.y + 3.0), [0, 1, 2], "tanh(linear)+l1")


@few
@given(c=cases())
def test_dora_second_derivatives_match_autograd_numpy(c: Case) -> None:
    def f(x: Any, W: Any, A: Any, B: Any, m: Any) -> Any:
        y = primitives.dora_linear(x, W, c.b, A, B, m, c.mask, scale=c.scale, fan_in_fan_out=c.fif)
        return losses.mse_loss_op(y, c.y)

    def fr(x: Any, W: Any, A: Any, B: Any, m: Any) -> Any:
        return anp.mean((_ref_dora(x, W, c.b, A, B, m, c.mask, c.scale, c.fif) - c.y) ** 2)

    _all_second_derivatives(f, fr, (c.x, c.W, c.A, c.B, c.m), [0, 1, 2, 3, 4], "dora+mse")


@few
@given(c=cases(), with_m=st.booleans())
def test_embedding_second_derivatives_match_autograd_numpy(c: Case, with_m: bool) -> None:
    rng = np.random.default_rng(c.x.size)
    num, dim, r = 6, c.B.shape[0], c.A.shape[0]
    ids = rng.integers(0, num, c.x.shape[:-1])
    W, A = rng.standard_normal((num, dim)), rng.standard_normal((r, num))
    m = c.m[:dim] if with_m else None
    target = rng.standard_normal((*ids.shape, dim))

    def f(W_: Any, A_: Any, B_: Any) -> Any:
        return losses.mse_loss_op(primitives.lora_embedding(ids, W_, A_, B_, m, scale=c.scale), target)

    def fr(W_: Any, A_: Any, B_: Any) -> Any:
        y = W_[ids] + anp.matmul(anp.transpose(A_)[ids], anp.transpose(B_)) * c.scale
        if m is not None:
            Wv, Av, Bv = (autograd.tracer.getval(a) for a in (W_, A_, B_))
            V = Wv + (Bv @ Av).T * c.scale
            y = y * (m / np.sqrt(np.sum(V * V, axis=0)))
        return anp.mean((y - target) ** 2)

    _all_second_derivatives(f, fr, (W, A, c.B), [0, 1, 2], "embedding+mse")


# ---------------------------------------------------------------- the reproduction, hvp


def _problem(seed: int = 0) -> tuple:
    rng = np.random.default_rng(seed)
    x, W, y = rng.standard_normal((7, 6)), rng.standard_normal((5, 6)), rng.standard_normal((7, 5))
    lora = {"A": rng.standard_normal((3, 6)), "B": rng.standard_normal((5, 3))}
    v = {"A": rng.standard_normal((3, 6)), "B": rng.standard_normal((5, 3))}

    def f(lora: Any, y: Any) -> Any:
        return ml.mse_loss(ml.lora_dense({"W": W}, lora, x, scale=1.5), y)

    def fr(lora: Any, y: Any) -> Any:
        return anp.mean((anp.matmul(x, W.T) + 1.5 * anp.matmul(anp.matmul(x, anp.transpose(lora["A"])),
                                                               anp.transpose(lora["B"])) - y) ** 2)

    return f, fr, lora, v, y


def test_jvp_of_grad_is_not_zero() -> None:
    """The issue's reproduction: make_jvp(lambda y: grad(f)(lora, y)) gave zeros for dA and dB."""
    f, fr, lora, _, y = _problem()
    t = np.ones_like(y)
    got = autograd.make_jvp(lambda yy: ml.grad(f)(lora, yy))(y)(t)[1]
    ref = autograd.make_jvp(lambda yy: autograd.grad(fr)(lora, yy))(y)(t)[1]
    assert all(np.max(np.abs(got[k])) > 0.1 for k in got)
    _close(got, ref, "jvp of grad")


def test_hvp_matches_autograd_and_finite_differences() -> None:
    f, fr, lora, v, y = _problem()
    h = ml.hvp(f)(lora, y, v)
    _close(h, autograd.make_jvp(lambda p: autograd.grad(fr)(p, y))(lora)(v)[1], "hvp vs autograd.numpy")
    eps = 1e-5
    plus = ml.grad(f)({k: lora[k] + eps * v[k] for k in lora}, y)
    minus = ml.grad(f)({k: lora[k] - eps * v[k] for k in lora}, y)
    for k in lora:
        fd = (plus[k] - minus[k]) / (2 * eps)
        assert np.max(np.abs(h[k] - fd)) <= 1e-6 * np.max(np.abs(fd)), k
    # along another argument, and for a plain array argument
    hy = ml.hvp(f, 1)(lora, y, np.ones_like(y))
    np.testing.assert_allclose(hy, 2.0 / y.size * np.ones_like(y), rtol=1e-12)


def test_hvp_refuses_bad_vectors() -> None:
    f, _, lora, v, y = _problem()
    with pytest.raises(MiniLoraValueError, match="v must have the same structure"):
        ml.hvp(f)(lora, y, {"A": v["A"]})
    with pytest.raises(MiniLoraValueError, match="shape"):
        ml.hvp(f)(lora, y, {"A": v["A"], "B": v["A"]})
    with pytest.raises(MiniLoraValueError, match="the vector v"):
        ml.hvp(f)(lora)
    with pytest.raises(MiniLoraValueError, match="out of range"):
        ml.hvp(f, 5)(lora, y, v)
    with pytest.raises(MiniLoraTypeError, match="one argnum"):
        ml.hvp(f, (0, 1))


def test_hvp_on_the_array_api_backend_matches_numpy() -> None:
    xps = require("array_api_strict")
    f, _, lora, v, y = _problem(3)
    want = ml.hvp(f)(lora, y, v)
    with ml.use_backend(xps, device=xps.Device("device1")):
        moved = ml.to_backend((lora, y, v))
        rng = np.random.default_rng(3)
        x, W = rng.standard_normal((7, 6)), rng.standard_normal((5, 6))
        x, W = ml.to_backend((x, W))

        def g(lora: Any, y: Any) -> Any:
            return ml.mse_loss(ml.lora_dense({"W": W}, lora, x, scale=1.5), y)

        got = ml.to_numpy(ml.hvp(g)(*moved))
    _close(got, want, "hvp array_api_strict vs numpy")
