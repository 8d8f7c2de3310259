"""minilora against PyTorch (CPU, float64): the seed experiment, forward and gradients of the
LoRA layer on random shapes, Adam/AdamW steps, and merging.

PyTorch is the implementation most users check themselves against, so minilora must agree with
it to rounding. Every torch tensor here is made float64 explicitly; the default dtype is never
changed. ``torch`` comes from ``conftest.require``: without it these tests skip locally and fail
in CI. Tests that need no torch (merge/unmerge algebra) do not ask for it.

Tolerances are norm-wise relative: ``||a - b|| <= rtol * max(||b||, ||m||, tiny)``. ``m`` is the
*magnitude* of the computation, the same computation run on the absolute values of every input
(and of the cotangent, for gradients). Rounding a sum of products errs by at most
n u sum_i |a_i b_i| (Higham, Accuracy and Stability, section 3.1), so ``m`` is the scale the
error is relative to; measuring against ``||b||`` alone fails when a result cancels to ~0
(e.g. a bias gradient that is a sum of +-1/N in another order: 0 in torch, 3e-17 here). Where
nothing cancels, ``||m||`` is within a small factor of ``||b||``. float64 has u = 2**-53 ~
1.1e-16 and the sums here have at most a few hundred terms, so two correct implementations that
sum in different orders differ by ~1e-15 relative. Each rtol is a few orders of magnitude above
what was observed, so a BLAS with another summation order passes, while a wrong formula (a
missing scale, a transposed factor, a lost mask, an off-by-one bias correction) fails by many
orders of magnitude.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from helpers import require
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import minilora as ml
from minilora.study.seed import seed_experiment, seed_problem

TINY = np.finfo(np.float64).tiny

# The `backend` fixture is function-scoped but only selects the array namespace: reusing it
# across hypothesis examples is what we want. Everything else comes from the loaded profile.
with_backend = settings(
    suppress_health_check=[*settings.default.suppress_health_check, HealthCheck.function_scoped_fixture]
)


@pytest.fixture(scope="module")
def torch() -> Iterator[Any]:
    """torch, run on one thread for this module: the tensors here are tiny, and on a small
    machine torch's intra-op threads spin against each other (the 1000-step seed run took
    ~9 s with 2 threads on 2 busy cores, 0.3 s with one). The previous setting is restored."""
    torch = require("torch")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield torch
    torch.set_num_threads(previous)


def rel_err(actual: Any, expected: Any, magnitude: Any = None) -> float:
    """||actual - expected|| / max(||expected||, ||magnitude||, tiny), as host float64 arrays;
    ``magnitude`` is the computation redone on absolute values (see the module docstring)."""
    a = np.asarray(actual, dtype=np.float64)
    b = np.asarray(expected, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    ref = max(np.linalg.norm(b), TINY)
    if magnitude is not None:
        ref = max(ref, float(np.linalg.norm(np.asarray(magnitude, dtype=np.float64))))
    return float(np.linalg.norm(a - b) / ref)


def to_torch(torch: Any, a: Any, requires_grad: bool = False) -> Any:
    """A float64 torch tensor holding a copy of the host array ``a``."""
    t = torch.from_numpy(np.array(a, dtype=np.float64, copy=True))
    return t.requires_grad_(requires_grad)


def host(t: Any) -> np.ndarray:
    return t.detach().numpy().copy()


# --------------------------------------------------------------------------- 1. the seed blog


def _seed_loss(lora: dict, frozen: dict, x: Any, target: Any) -> Any:
    # the loss minilora.demo trains (alpha = rank, so scale = 1)
    return ml.l1_loss(ml.lora_dense(frozen, lora, x, scale=1.0, fan_in_fan_out=True), target)


# (orientation, steps): the blog's own orientation for its full 1000 steps, and the PEFT
# orientation (A random, B zero) for a shorter run, to show the A/B mapping is right either way.
SEED_RUNS = [("seed", 1000), ("peft", 300)]


@pytest.mark.compare
@pytest.mark.parametrize(("orientation", "steps"), SEED_RUNS)
def test_seed_experiment_matches_the_blog_torch_code(torch: Any, orientation: str, steps: int) -> None:
    nn, F = torch.nn, torch.nn.functional
    with ml.use_backend("numpy"):
        prob = seed_problem(0, 100, 4, dtype="float64", orientation=orientation)
        lora, losses = ml.fit(
            _seed_loss, prob["lora"], (prob["frozen"], prob["x"], prob["target"]), steps=steps, lr=1e-2
        )
        demo = seed_experiment(steps=steps, rank=4, seed=0, dtype="float64", lr=1e-2, orientation=orientation)
    # the demo trains exactly this problem with exactly this loss
    assert demo["losses"] == losses

    # The blog, literally: x @ (W + W_B @ W_A), W_B (100, r) and W_A (r, 100); in PEFT names
    # W_B = A^T and W_A = B^T (whichever of the two is the zero factor).
    W = to_torch(torch, prob["frozen"]["W"])
    assert torch.equal(W, torch.eye(100, dtype=torch.float64))
    W_B = nn.Parameter(to_torch(torch, prob["lora"]["A"].T))
    W_A = nn.Parameter(to_torch(torch, prob["lora"]["B"].T))
    assert W_B.shape == (100, 4) and W_A.shape == (4, 100)
    assert (orientation == "seed") == bool(torch.all(W_B == 0))  # the blog zeroes W_B
    assert (orientation == "peft") == bool(torch.all(W_A == 0))  # PEFT zeroes B = W_A^T
    input_batch = to_torch(torch, prob["x"])
    target = to_torch(torch, prob["target"])
    optimizer = torch.optim.Adam([W_A, W_B], lr=1e-2)
    torch_losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        out = input_batch @ (W + (W_B @ W_A))
        loss = F.l1_loss(out, target)
        loss.backward()
        optimizer.step()
        torch_losses.append(loss.item())

    assert len(losses) == len(torch_losses) == steps
    assert losses[-1] < 0.5 * losses[0]  # it trains at all (guards against two identical no-ops)
    # The two differ only in summation order (torch forms W + W_B W_A, minilora never does): the
    # first losses agree to ~1e-16 and Adam's normalised steps keep the drift small over 1000
    # steps (observed max ~2.5e-13 with torch 2.13 CPU). 1e-9 leaves room for another BLAS; a
    # wrong scale, transposition or Adam formula is off by far more within a few steps.
    history = np.abs(np.array(losses) - np.array(torch_losses)) / np.abs(np.array(torch_losses))
    assert history.max() <= 1e-9, (history.max(), int(history.argmax()))

    merged = ml.merge(prob["frozen"], lora, scale=1.0, fan_in_fan_out=True)["W"]
    with torch.no_grad():
        torch_merged = host(W + W_B @ W_A)
    assert rel_err(merged, torch_merged) <= 1e-9
    assert rel_err(lora["A"], host(W_B).T) <= 1e-9
    assert rel_err(lora["B"], host(W_A).T) <= 1e-9


# --------------------------------------------------------------------------- shared strategies


@st.composite
def lora_cases(draw: Any, with_mask: bool = True) -> dict:
    """Shapes and options for one LoRA layer; the arrays themselves come from ``seed``."""
    lead = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=2)))
    d_in, d_out = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    rank = draw(st.integers(1, min(d_in, d_out)))
    # |scale| >= 1e-3 keeps every intermediate far from the subnormal range, where the two
    # libraries' different placement of the scale would legitimately lose relative accuracy
    magnitude = draw(st.just(0.0) | st.floats(1e-3, 8.0))
    scale = -magnitude if draw(st.booleans()) else magnitude
    p = draw(st.none() | st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0])) if with_mask else None
    return dict(
        lead=lead, d_in=d_in, d_out=d_out, rank=rank, scale=scale,
        fan_in_fan_out=draw(st.booleans()), bias=draw(st.booleans()), p=p,
        seed=draw(st.integers(0, 2**32 - 1)),
    )


# a batch of one, with one and with two leading dimensions, is always tried
BATCH_OF_ONE = dict(
    lead=(1,), d_in=3, d_out=2, rank=1, scale=2.0, fan_in_fan_out=False, bias=True, p=0.5, seed=1
)
BATCH_OF_ONE_2D = dict(
    lead=(1, 1), d_in=1, d_out=1, rank=1, scale=-0.5, fan_in_fan_out=True, bias=False, p=None, seed=2
)


def make_arrays(case: dict) -> dict:
    """Host float64 arrays for a case: x, W (stored (d_in, d_out) for fan_in_fan_out), b or
    None, A (r, d_in), B (d_out, r) (nonzero, so every gradient is exercised), mask or None."""
    rng = np.random.default_rng(case["seed"])
    d_in, d_out, r = case["d_in"], case["d_out"], case["rank"]
    x = rng.standard_normal((*case["lead"], d_in))
    W = rng.standard_normal((d_in, d_out) if case["fan_in_fan_out"] else (d_out, d_in))
    b = rng.standard_normal(d_out) if case["bias"] else None
    A = rng.standard_normal((r, d_in))
    B = rng.standard_normal((d_out, r))
    mask = None
    if case["p"] is not None:
        with ml.use_backend("numpy"):
            mask = ml.dropout_mask(rng, x.shape, case["p"])
    return dict(x=x, W=W, b=b, A=A, B=B, mask=mask)


def on_backend(backend: Any, arrays: dict) -> tuple[dict, dict, Any, Any]:
    """(params, lora, x, mask) on the backend under test."""
    params = {"W": backend.put(arrays["W"])}
    if arrays["b"] is not None:
        params["b"] = backend.put(arrays["b"])
    lora = {"A": backend.put(arrays["A"]), "B": backend.put(arrays["B"])}
    mask = None if arrays["mask"] is None else backend.put(arrays["mask"])
    return params, lora, backend.put(arrays["x"]), mask


def torch_lora_dense(torch: Any, x: Any, W: Any, b: Any, A: Any, B: Any, mask: Any, scale: float,
                     fan_in_fan_out: bool) -> Any:
    """PEFT's forward written with torch: base(x) + scale * lora_B(lora_A(dropout(x)))."""
    F = torch.nn.functional
    y = x @ W if fan_in_fan_out else F.linear(x, W)
    if b is not None:
        y = y + b
    xm = x if mask is None else x * mask
    return y + scale * F.linear(F.linear(xm, A), B)


def torch_leaves(torch: Any, arrays: dict, absolute: bool = False) -> dict:
    """x, W, b, A, B as float64 leaf tensors that require grad (b only if present); with
    ``absolute``, their absolute values (for the magnitude of the computation)."""
    fix = np.abs if absolute else np.asarray
    names = [k for k in ("x", "W", "b", "A", "B") if arrays[k] is not None]
    return {k: to_torch(torch, fix(arrays[k]), True) for k in names}


def torch_lora_dense_of(torch: Any, t: dict, arrays: dict, case: dict, absolute: bool = False) -> Any:
    """``torch_lora_dense`` on the leaves ``t`` (from ``torch_leaves``) and the case's options;
    ``absolute`` takes |scale| (the mask is never negative)."""
    mask = None if arrays["mask"] is None else to_torch(torch, arrays["mask"])
    scale = abs(case["scale"]) if absolute else case["scale"]
    return torch_lora_dense(torch, t["x"], t["W"], t.get("b"), t["A"], t["B"], mask, scale,
                            case["fan_in_fan_out"])


# --------------------------------------------------------------------------- 2. forward, gradients


@pytest.mark.compare
@with_backend
@given(case=lora_cases())
@example(case=BATCH_OF_ONE)
@example(case=BATCH_OF_ONE_2D)
def test_lora_dense_forward_matches_torch(torch: Any, backend: Any, case: dict) -> None:
    arrays = make_arrays(case)
    params, lora, x, mask = on_backend(backend, arrays)
    y = ml.lora_dense(params, lora, x, scale=case["scale"], fan_in_fan_out=case["fan_in_fan_out"],
                      dropout_mask=mask)
    with torch.no_grad():
        expected = torch_lora_dense_of(torch, torch_leaves(torch, arrays), arrays, case)
        magnitude = torch_lora_dense_of(torch, torch_leaves(torch, arrays, absolute=True), arrays, case, True)
    got = backend.get(y)
    assert got.shape == (*case["lead"], case["d_out"])
    # sums of at most 12 terms in float64: ~3e-16 observed; 1e-10 flags any formula error
    assert rel_err(got, host(expected), host(magnitude)) <= 1e-10


LOSSES = [("l1", "mean"), ("l1", "sum"), ("mse", "mean"), ("mse", "sum")]


@pytest.mark.compare
@pytest.mark.parametrize(("loss_name", "reduction"), LOSSES)
@with_backend
@given(case=lora_cases())
@example(case=BATCH_OF_ONE)
@example(case=BATCH_OF_ONE_2D)
def test_lora_dense_gradients_match_torch_autograd(
    torch: Any, backend: Any, loss_name: str, reduction: str, case: dict
) -> None:
    F = torch.nn.functional
    ml_loss = {"l1": ml.l1_loss, "mse": ml.mse_loss}[loss_name]
    torch_loss = {"l1": F.l1_loss, "mse": F.mse_loss}[loss_name]
    scale, fif = case["scale"], case["fan_in_fan_out"]
    arrays = make_arrays(case)
    t = torch_leaves(torch, arrays)

    # the target sits at least 0.5 away from the prediction in every entry, so sign(pred - target)
    # is the same in both libraries despite rounding (L1's gradient is discontinuous at 0)
    rng = np.random.default_rng(case["seed"] + 1)
    with torch.no_grad():
        pred0 = host(torch_lora_dense_of(torch, t, arrays, case))
    offset = (0.5 + rng.random(pred0.shape)) * rng.choice([-1.0, 1.0], pred0.shape)
    target = pred0 + offset

    pred = torch_lora_dense_of(torch, t, arrays, case)
    pred.retain_grad()
    expected_loss = torch_loss(pred, to_torch(torch, target), reduction=reduction)
    expected_loss.backward()
    # magnitudes: the layer's backward on |inputs| and |scale| with cotangent |dL/dpred|
    t_abs = torch_leaves(torch, arrays, absolute=True)
    (torch_lora_dense_of(torch, t_abs, arrays, case, True) * pred.grad.abs()).sum().backward()

    def loss(params: dict, lora: dict, x: Any, target: Any, mask: Any) -> Any:
        y = ml.lora_dense(params, lora, x, scale=scale, fan_in_fan_out=fif, dropout_mask=mask)
        return ml_loss(y, target, reduction=reduction)

    params, lora, x, mask = on_backend(backend, arrays)
    value, (g_params, g_lora, g_x) = ml.value_and_grad(loss, argnum=(0, 1, 2))(
        params, lora, x, backend.put(target), mask
    )
    assert set(g_params) == set(params) and set(g_lora) == {"A", "B"}
    # pred is rounded differently in the two libraries (~1e-16 of its magnitude, up to ~100 here)
    # and pred - target cancels to >= 0.5, so the loss and the MSE cotangent 2 (pred - target) / N
    # differ by up to ~1e-14 relative (observed: 4e-14 for MSE, 3e-16 for L1 gradients). 1e-10
    # leaves ample room and still flags any formula error.
    assert rel_err(backend.get(value), host(expected_loss)) <= 1e-10
    got = {"x": g_x, "W": g_params["W"], "A": g_lora["A"], "B": g_lora["B"]}
    if "b" in params:
        got["b"] = g_params["b"]
    assert set(got) == set(t)
    for name, g in got.items():
        # each gradient entry sums at most 4*4*12 products (see above for the MSE cotangent)
        err = rel_err(backend.get(g), host(t[name].grad), host(t_abs[name].grad))
        assert err <= 1e-10, (name, err)


# --------------------------------------------------------------------------- 3. Adam and AdamW

# shapes of a small parameter dict, including a 0-d one (torch allows scalar parameters)
ADAM_SHAPES = {"W": (5, 3), "b": (3,), "T": (2, 2, 2), "s": ()}
OPTIMIZERS = [("Adam", 0.0), ("Adam", 0.1), ("AdamW", 0.01), ("AdamW", 0.1)]
# torch's defaults; momentum below 0.5 (so torch's lerp takes its other branch) with a large eps
HYPER = [((0.9, 0.999), 1e-8), ((0.8, 0.99), 1e-6), ((0.3, 0.95), 1e-3)]
LR = 0.05
STEPS = 50


def adam_problem(seed: int, steps: int) -> tuple[dict, list[dict]]:
    """Initial params and a fixed sequence of gradients whose size varies over 4 decades."""
    rng = np.random.default_rng(seed)
    params = {k: rng.standard_normal(s) for k, s in ADAM_SHAPES.items()}
    grads = [
        {k: rng.standard_normal(s) * 10.0 ** rng.uniform(-3, 1) for k, s in ADAM_SHAPES.items()}
        for _ in range(steps)
    ]
    return params, grads


def torch_optimizer(torch: Any, name: str, tensors: list, wd: float, betas: tuple, eps: float,
                    amsgrad: bool, maximize: bool) -> Any:
    cls = {"Adam": torch.optim.Adam, "AdamW": torch.optim.AdamW}[name]
    return cls(tensors, lr=LR, betas=betas, eps=eps, weight_decay=wd, amsgrad=amsgrad, maximize=maximize)


def ml_options(name: str, wd: float, betas: tuple, eps: float, amsgrad: bool, maximize: bool) -> dict:
    return dict(lr=LR, betas=betas, eps=eps, weight_decay=wd, decoupled=name == "AdamW",
                amsgrad=amsgrad, maximize=maximize)


@pytest.mark.compare
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize(("betas", "eps"), HYPER)
@pytest.mark.parametrize(("name", "wd"), OPTIMIZERS)
def test_adam_step_matches_torch_optim(
    torch: Any, name: str, wd: float, betas: tuple, eps: float, amsgrad: bool, maximize: bool
) -> None:
    params, grads = adam_problem(7, STEPS)
    tp = {k: torch.nn.Parameter(to_torch(torch, v)) for k, v in params.items()}
    opt = torch_optimizer(torch, name, list(tp.values()), wd, betas, eps, amsgrad, maximize)
    options = ml_options(name, wd, betas, eps, amsgrad, maximize)
    state = ml.adam_init(params, amsgrad=amsgrad)
    for step, g in enumerate(grads, start=1):
        params, state = ml.adam_step(params, g, state, **options)
        for k, p in tp.items():
            p.grad = to_torch(torch, g[k])
        opt.step()
        for k, p in tp.items():
            # the same operations in the same order (torch's single-tensor CPU path): agreement
            # to the last bit or two (max ~5e-16 observed); 1e-12 allows an fma here and there
            err = rel_err(params[k], host(p))
            assert err <= 1e-12, (step, k, err)
    assert state["step"] == STEPS
    # the moments: ~2e-16 for v, up to ~4e-15 for m (a running mean of gradients of both signs,
    # so entries near 0 carry the rounding of the larger terms that cancelled)
    for k, p in tp.items():
        ts = opt.state[p]
        assert int(ts["step"]) == STEPS
        assert rel_err(state["m"][k], host(ts["exp_avg"])) <= 1e-12
        assert rel_err(state["v"][k], host(ts["exp_avg_sq"])) <= 1e-12
        if amsgrad:
            assert rel_err(state["v_max"][k], host(ts["max_exp_avg_sq"])) <= 1e-12


@pytest.mark.compare
@pytest.mark.parametrize(("name", "wd", "amsgrad"), [("Adam", 0.1, True), ("AdamW", 0.01, False)])
def test_adam_resumes_from_its_state_like_torch(torch: Any, name: str, wd: float, amsgrad: bool) -> None:
    betas, eps = (0.8, 0.99), 1e-6
    options = ml_options(name, wd, betas, eps, amsgrad, False)
    start, grads = adam_problem(11, STEPS)
    half = STEPS // 2

    straight, state = start, ml.adam_init(start, amsgrad=amsgrad)
    for g in grads:
        straight, state = ml.adam_step(straight, g, state, **options)

    first, saved = start, ml.adam_init(start, amsgrad=amsgrad)
    for g in grads[:half]:
        first, saved = ml.adam_step(first, g, saved, **options)
    # a saved state is plain data: copy it (as a checkpoint would) and carry on from the copy
    resumed, state2 = copy.deepcopy(first), copy.deepcopy(saved)
    assert state2["step"] == half
    for g in grads[half:]:
        resumed, state2 = ml.adam_step(resumed, g, state2, **options)
    assert state2["step"] == STEPS
    for k in straight:  # deterministic arithmetic: resuming is exact, not merely close
        np.testing.assert_array_equal(resumed[k], straight[k])
        np.testing.assert_array_equal(state2["m"][k], state["m"][k])
        np.testing.assert_array_equal(state2["v"][k], state["v"][k])

    # torch does the same through optimizer.state_dict() into a fresh optimizer
    tp = {k: torch.nn.Parameter(to_torch(torch, v)) for k, v in start.items()}
    opt = torch_optimizer(torch, name, list(tp.values()), wd, betas, eps, amsgrad, False)
    for g in grads[:half]:
        for k, p in tp.items():
            p.grad = to_torch(torch, g[k])
        opt.step()
    checkpoint = copy.deepcopy(opt.state_dict())
    tp2 = {k: torch.nn.Parameter(p.detach().clone()) for k, p in tp.items()}
    opt2 = torch_optimizer(torch, name, list(tp2.values()), wd, betas, eps, amsgrad, False)
    opt2.load_state_dict(checkpoint)
    for g in grads[half:]:
        for k, p in tp2.items():
            p.grad = to_torch(torch, g[k])
        opt2.step()
    for k, p in tp2.items():
        assert rel_err(resumed[k], host(p)) <= 1e-12
        assert rel_err(state2["m"][k], host(opt2.state[p]["exp_avg"])) <= 1e-12


# --------------------------------------------------------------------------- 4. merge


@with_backend
@given(case=lora_cases(with_mask=False))
@example(case={**BATCH_OF_ONE, "p": None})
def test_merged_dense_equals_lora_dense(backend: Any, case: dict) -> None:
    arrays = make_arrays(case)
    params, lora, x, _ = on_backend(backend, arrays)
    s, fif = case["scale"], case["fan_in_fan_out"]
    merged = ml.merge(params, lora, scale=s, fan_in_fan_out=fif)
    assert set(merged) == set(params)
    y_merged = backend.get(ml.dense(merged, x, fan_in_fan_out=fif))
    y_lora = backend.get(ml.lora_dense(params, lora, x, scale=s, fan_in_fan_out=fif))
    # x (W + s B A) and x W + s (x A^T) B^T are the same number rounded differently: a few ulps
    # of the magnitude |x| (|W| + |s| |B| |A|) + |b| (~1e-15 observed); 1e-12 still catches any
    # wrong sign, scale or transposition
    xa, A, B = np.abs(arrays["x"]), np.abs(arrays["A"]), np.abs(arrays["B"])
    W_in_out = np.abs(arrays["W"] if fif else arrays["W"].T)  # (d_in, d_out)
    magnitude = xa @ W_in_out + abs(s) * (xa @ A.T) @ B.T
    if arrays["b"] is not None:
        magnitude = magnitude + np.abs(arrays["b"])
    assert rel_err(y_merged, y_lora, magnitude) <= 1e-12


@with_backend
@given(case=lora_cases(with_mask=False))
def test_unmerge_inverts_merge(backend: Any, case: dict) -> None:
    arrays = make_arrays(case)
    params, lora, _, _ = on_backend(backend, arrays)
    s, fif = case["scale"], case["fan_in_fan_out"]
    merged = ml.merge(params, lora, scale=s, fan_in_fan_out=fif)
    back = ml.unmerge(merged, lora, scale=s, fan_in_fan_out=fif)
    W, W_merged, W_back = arrays["W"], backend.get(merged["W"]), backend.get(back["W"])
    # (W + D) - D with the same D: the two roundings err by at most u |W + D| and u |W| per
    # entry, so ||error|| <= u (||W|| + ||W + D||); 1e-14 is ~90 u. Relative to ||W|| alone it
    # could not be bounded: when |D| >> |W| the first rounding already loses W's low bits.
    assert np.linalg.norm(W_back - W) <= 1e-14 * (np.linalg.norm(W) + np.linalg.norm(W_merged))
    if "b" in params:  # the bias is untouched, and the inputs were not modified
        np.testing.assert_array_equal(backend.get(back["b"]), arrays["b"])
    np.testing.assert_array_equal(backend.get(params["W"]), W)


@pytest.mark.compare
@with_backend
@given(case=lora_cases(with_mask=False))
def test_delta_weight_and_merge_match_torch(torch: Any, backend: Any, case: dict) -> None:
    F = torch.nn.functional
    arrays = make_arrays(case)
    params, lora, x, _ = on_backend(backend, arrays)
    s, fif = case["scale"], case["fan_in_fan_out"]
    results = {}
    for absolute in (False, True):  # the second pass gives the magnitudes
        t = torch_leaves(torch, arrays, absolute)
        with torch.no_grad():
            delta = (t["B"] @ t["A"]) * (abs(s) if absolute else s)  # PEFT get_delta_weight: (d_out, d_in)
            delta = delta.T if fif else delta
            W_merged = t["W"] + delta  # PEFT merge: base_layer.weight.data += delta
            y = F.linear(t["x"], W_merged.T if fif else W_merged, t.get("b"))
        results[absolute] = {"delta": host(delta), "W": host(W_merged), "y": host(y)}
    expected, magnitude = results[False], results[True]
    got_delta = backend.get(ml.delta_weight(lora, scale=s, fan_in_fan_out=fif))
    assert got_delta.shape == expected["delta"].shape
    # rank-r dot products (r <= 12), then one addition and a d_in-term matmul: ~5e-16 observed
    assert rel_err(got_delta, expected["delta"], magnitude["delta"]) <= 1e-12
    merged = ml.merge(params, lora, scale=s, fan_in_fan_out=fif)
    assert rel_err(backend.get(merged["W"]), expected["W"], magnitude["W"]) <= 1e-12
    y_merged = backend.get(ml.dense(merged, x, fan_in_fan_out=fif))
    assert rel_err(y_merged, expected["y"], magnitude["y"]) <= 1e-12
