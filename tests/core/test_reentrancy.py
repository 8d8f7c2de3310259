"""Gradients stay exactly right when the same primitives run between a forward and its backward.

Issue 11: with a memo handing arrays from a forward to its VJP, a signal handler calling
``mse_loss(pred, other)`` during ``grad(mse_loss)(pred, target)`` made about 2% of gradients wrong.
Here the same primitives run in between in every way Python allows: a signal handler (a timer
firing every 200 us), interleaved generators, a nested ``grad`` inside a ``fit`` callback, and
threads switching every microsecond. Every gradient must equal, bit for bit, the one computed
alone.
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any

import numpy as np
import pytest
from autograd.core import make_vjp

import minilora as ml

RNG = np.random.default_rng(2024)
N, D_IN, D_OUT, R = 8, 6, 5, 2
FROZEN = {"W": RNG.standard_normal((D_OUT, D_IN)), "b": RNG.standard_normal(D_OUT)}
LORA = {"A": RNG.standard_normal((R, D_IN)), "B": RNG.standard_normal((D_OUT, R))}
X, Y = RNG.standard_normal((N, D_IN)), RNG.standard_normal((N, D_OUT))
# what the interference computes on: same shapes (so any memo keyed by shape or slot would be hit),
# other values
X2, Y2 = X[::-1].copy() * 3.0, Y + 1.0
LORA2 = {"A": LORA["A"] * -2.0, "B": LORA["B"] + 0.5}
PRED, TARGET = RNG.standard_normal((N, D_OUT)), RNG.standard_normal((N, D_OUT))


def objective(lora: dict, x: Any, y: Any, loss: Any = ml.mse_loss) -> Any:
    return loss(ml.lora_dense(FROZEN, lora, x, scale=1.5), y)


def interfere() -> None:
    """The same primitives, on the same input arrays where possible, with other partners; the
    untraced loss on the very ``pred`` of the interrupted gradient comes last, so whatever a memo
    keyed by that input might hold is the interference's."""
    ml.grad(objective)(LORA2, X2, Y2)
    ml.lora_dense(FROZEN, LORA2, X, scale=1.5)
    ml.l1_loss(PRED, TARGET + 2.0)
    ml.mse_loss(PRED, Y2)


def exact(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(exact(a[k], b[k]) for k in a)
    return bool(np.array_equal(a, b))


EXPECTED_LORA = ml.grad(objective)(LORA, X, Y)
EXPECTED_LOSS = ml.grad(ml.mse_loss)(PRED, TARGET)
EXPECTED_L1 = ml.grad(objective)(LORA, X, Y, ml.l1_loss)


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs signal.setitimer (POSIX)")
def test_a_signal_handler_running_the_same_primitives_changes_no_gradient() -> None:
    fired = [0]
    busy = [False]

    def handler(signum: int, frame: Any) -> None:
        if busy[0]:  # the timer fired inside the handler itself: let that one pass
            return
        busy[0] = True
        fired[0] += 1
        interfere()
        busy[0] = False

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, 2e-4, 2e-4)
    wrong = 0
    calls = 0
    try:
        while calls < 3000 or fired[0] < 200:
            calls += 1
            wrong += not exact(ml.grad(ml.mse_loss)(PRED, TARGET), EXPECTED_LOSS)
            wrong += not exact(ml.grad(objective)(LORA, X, Y), EXPECTED_LORA)
            wrong += not exact(ml.grad(objective)(LORA, X, Y, ml.l1_loss), EXPECTED_L1)
            if calls > 200_000:
                break
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        signal.signal(signal.SIGALRM, old)
    assert fired[0] >= 200, f"the handler fired only {fired[0]} times in {calls} rounds: the test saw no interleaving"
    assert wrong == 0, f"{wrong} of {3 * calls} gradients differed from the same gradient computed alone"


FORWARDS = {"lora_linear", "lora_linear_tree", "linear", "mse_loss_op", "l1_loss_op"}


def test_a_profiler_hook_running_the_same_primitives_after_every_forward_changes_no_gradient() -> None:
    """The deterministic form of the signal test: a profile hook runs the interference the
    moment each primitive's forward returns, before autograd makes its VJP (the window the old
    memo fell into), in thousands of gradients."""
    fired = [0]
    busy = [False]

    def hook(frame: Any, event: str, arg: Any) -> None:
        if event == "return" and frame.f_code.co_name in FORWARDS and not busy[0] and \
                "minilora" in frame.f_code.co_filename:
            busy[0] = True
            fired[0] += 1
            interfere()
            busy[0] = False

    wrong = 0
    sys.setprofile(hook)
    try:
        for _ in range(1000):
            wrong += not exact(ml.grad(ml.mse_loss)(PRED, TARGET), EXPECTED_LOSS)
            wrong += not exact(ml.grad(objective)(LORA, X, Y), EXPECTED_LORA)
            wrong += not exact(ml.grad(objective)(LORA, X, Y, ml.l1_loss), EXPECTED_L1)
    finally:
        sys.setprofile(None)
    assert fired[0] >= 5000, f"the hook ran only {fired[0]} times"
    assert wrong == 0, f"{wrong} of 3000 gradients differed from the same gradient computed alone"


def test_interleaved_forwards_and_backwards_give_each_its_own_gradient() -> None:
    """Two traces open at once (generators): forward 1, forward 2, backward 1, backward 2."""

    def trace(lora: dict, x: Any, y: Any) -> Any:
        vjp, loss = make_vjp(lambda p: objective(p, x, y), lora)
        yield loss
        yield vjp(np.ones_like(loss))

    for _ in range(50):
        first, second = trace(LORA, X, Y), trace(LORA2, X2, Y2)
        next(first)
        next(second)
        g2 = next(second)  # the later trace's backward first
        g1 = next(first)
        assert exact(g1, EXPECTED_LORA)
        assert exact(g2, ml.grad(objective)(LORA2, X2, Y2))


def test_a_nested_grad_in_a_fit_callback_changes_nothing() -> None:
    seen = []

    def callback(step: int, loss: float, params: dict, state: dict) -> None:
        seen.append(ml.grad(objective)(params, X2, Y2))  # the same primitives, another problem
        interfere()

    plain, plain_losses = ml.fit(objective, LORA, (X, Y), steps=25, lr=1e-2)
    busy, busy_losses = ml.fit(objective, LORA, (X, Y), steps=25, lr=1e-2, callback=callback)
    assert len(seen) == 25
    assert busy_losses == plain_losses
    assert exact(busy, plain)


def test_threads_computing_gradients_at_once_each_get_their_own() -> None:
    problems = [(LORA, X, Y), (LORA2, X2, Y2), (LORA, X2, Y), (LORA2, X, Y2)]
    expected = [ml.grad(objective)(*p) for p in problems]
    wrong = [0] * len(problems)
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            for _ in range(300):
                wrong[k] += not exact(ml.grad(objective)(*problems[k]), expected[k])
        except BaseException as e:  # noqa: BLE001 - reported below, in the main thread
            errors.append(e)

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter allows
    try:
        threads = [threading.Thread(target=work, args=(k,)) for k in range(len(problems))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(old)
    assert not errors, errors
    assert wrong == [0] * len(problems), f"wrong gradients per thread: {wrong}"
