"""Nothing is kept between a primitive's forward and its derivative, nor after a call returns.

Issue 11: a one-slot per-thread memo in ``ops.py`` once handed a VJP another call's array (wrong
gradients, silently) and kept the last loss's d = pred - target alive (8 MiB after a 1024 x 1024
``mse_loss``). These tests keep it from coming back:

- the core's source holds no thread-local, weak-reference or module-level mutable state (the
  backend choice in ``backend.py`` is the one exception, and it is a choice, not a memo);
- after an untraced call, or a whole gradient, returns, none of the memory it allocated is alive;
- a loss's forward never holds more than one block of d (``losses.BLOCK`` elements).
"""

from __future__ import annotations

import ast
import gc
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import minilora as ml
from minilora import losses

PKG = Path(ml.__file__).resolve().parent
# the core, and the variants' primitives (their derivatives live beside the core's)
CORE = sorted(p for p in PKG.glob("*.py")) + [PKG / "variants" / "primitives.py"]
# The one piece of module state is the active backend (``backend._current``, an immutable Backend
# record replaced by ``set_backend``): the rule below lets only backend.py assign a global.
MUTABLE_CALLS = {"dict", "list", "set", "defaultdict", "OrderedDict", "deque", "local", "WeakKeyDictionary",
                 "WeakValueDictionary", "ContextVar", "bytearray"}


def _module_level_mutables(tree: ast.Module) -> list[tuple[str, int]]:
    found = []
    for node in tree.body:
        targets: list[ast.expr] = []
        value = None
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        if value is None:
            continue
        mutable = isinstance(value, (ast.List, ast.Dict, ast.Set, ast.ListComp, ast.DictComp, ast.SetComp))
        if isinstance(value, ast.Call):
            fn = value.func
            name = fn.attr if isinstance(fn, ast.Attribute) else fn.id if isinstance(fn, ast.Name) else ""
            mutable = name in MUTABLE_CALLS
        for t in targets:
            if mutable and isinstance(t, ast.Name) and t.id != "__all__":
                found.append((t.id, node.lineno))
    return found


@pytest.mark.parametrize("path", CORE, ids=lambda p: p.name)
def test_the_core_keeps_no_hidden_state(path: Path) -> None:
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        else:
            names = []
        for name in names:
            assert name.split(".")[0] not in {"threading", "weakref", "contextvars"}, (
                f"{path.name} (line {node.lineno}) imports {name}: per-thread or weakly held state "
                "between a forward and its derivative is what issue 11 removed")
        if isinstance(node, ast.Global):
            assert path.name == "backend.py", f"{path.name} (line {node.lineno}) assigns a global: {node.names}"
    bad = _module_level_mutables(tree)
    assert not bad, f"{path.name}: module-level mutable objects {bad}"


def test_the_rule_sees_a_memo() -> None:
    """The AST rule above flags exactly the kind of state issue 11 removed."""
    planted = ast.parse("import threading\n_memo = threading.local()\n_cache = {}\nSIZES = (1, 2)\n")
    assert _module_level_mutables(planted) == [("_memo", 2), ("_cache", 3)]


def _alive_after(fn: Any) -> int:
    """Bytes allocated by ``fn()`` and still alive once it has returned and its result is dropped."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        fn()
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


def _peak_of(fn: Any) -> int:
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        fn()
        return tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()


N = 1024
MIB = 1 << 20


@pytest.fixture(scope="module")
def big() -> dict:
    rng = np.random.default_rng(11)
    return {"pred": rng.standard_normal((N, N)), "target": rng.standard_normal((N, N))}


@pytest.mark.parametrize("loss", [ml.mse_loss, ml.l1_loss], ids=["mse", "l1"])
def test_an_untraced_loss_leaves_nothing_alive(big: dict, loss: Any) -> None:
    alive = _alive_after(lambda: loss(big["pred"], big["target"]))
    assert alive < 64 * 1024, f"{alive / MIB:.2f} MiB still held after {loss.__name__} returned (the pred is 8 MiB)"


@pytest.mark.parametrize("loss", [ml.mse_loss, ml.l1_loss], ids=["mse", "l1"])
def test_a_loss_forward_holds_one_block_of_d_at_most(big: dict, loss: Any) -> None:
    peak = _peak_of(lambda: loss(big["pred"], big["target"]))
    one_block = losses.BLOCK * big["pred"].itemsize
    assert peak <= one_block + 64 * 1024, (
        f"{loss.__name__} peaked at {peak / MIB:.2f} MiB over an 8 MiB input: more than one block of d "
        f"({one_block / MIB:.2f} MiB)")


def test_a_gradient_leaves_nothing_alive(big: dict) -> None:
    rng = np.random.default_rng(3)
    d_in, d_out, r = 256, 128, 4
    frozen = {"W": rng.standard_normal((d_out, d_in))}
    lora = {"A": rng.standard_normal((r, d_in)), "B": rng.standard_normal((d_out, r))}
    x, y = rng.standard_normal((512, d_in)), rng.standard_normal((512, d_out))

    def f(lora_: dict) -> Any:
        return ml.mse_loss(ml.lora_dense(frozen, lora_, x, scale=2.0), y)

    g = ml.grad(f)
    g(lora)  # first call: autograd's own one-off caches (vspace registrations, ...) fill here

    def call() -> None:
        g(lora)

    alive = _alive_after(call)
    assert alive < 32 * 1024, f"{alive / 1024:.0f} KiB held after grad returned (one (512, 128) array is 512 KiB)"
    # and the same after value_and_grad, the loss alone and hvp
    for fn in (lambda: ml.value_and_grad(f)(lora), lambda: f(lora),
               lambda: ml.hvp(f)(lora, {"A": np.ones_like(lora["A"]), "B": np.ones_like(lora["B"])})):
        fn()
        alive = _alive_after(fn)
        assert alive < 32 * 1024, f"{alive / 1024:.0f} KiB held after a call returned"
