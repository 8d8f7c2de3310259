"""The backend switch: defaults, restoring, clear refusals, where new arrays are made, and that
``import minilora`` stays light."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from typing import Any

import numpy as np
import pytest

import minilora as ml
from minilora.backend import KNOWN_BACKENDS, Backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(ml.__file__)))


def _strict_type(backend: Any) -> type:
    return type(backend.put(np.zeros(1)))


def _assert_on_backend(a: Any, backend: Any) -> None:
    """``a`` is an array of the active backend's type, on its device."""
    if backend.name == "numpy":
        assert type(a) is np.ndarray, type(a)
    else:
        assert type(a) is _strict_type(backend), type(a)
        assert a.device == backend.device, a.device


# ---------------------------------------------------------------- the switch


def test_default_backend_is_numpy() -> None:
    be = ml.get_backend()
    assert isinstance(be, Backend)
    assert (be.name, be.xp, be.device) == ("numpy", np, None)


def _python(code: str) -> str:
    """Run ``code`` in a fresh interpreter that imports this checkout's minilora; its stdout."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env=env, cwd=ROOT).stdout


def test_default_backend_is_numpy_in_a_fresh_interpreter() -> None:
    code = "import minilora as ml, numpy as np; b = ml.get_backend(); print(b.name, b.xp is np, b.device)"
    out = _python(code)
    assert out.split() == ["numpy", "True", "None"]


def test_set_backend_returns_previous_and_switches() -> None:
    xps = _require_strict()
    start = ml.get_backend()
    device = xps.Device("device1")
    try:
        previous = ml.set_backend(xps, device=device)
        assert previous == start
        now = ml.get_backend()
        assert now.name == "array_api_strict" and now.device == device
        assert now.xp is xps.asarray(0.0).__array_namespace__()
        back = ml.set_backend("numpy")
        assert back == now
        assert ml.get_backend().xp is np
    finally:
        ml.set_backend(start.xp, device=start.device)
    assert ml.get_backend() == start


def _require_strict() -> Any:
    from conftest import require

    return require("array_api_strict")


@pytest.mark.parametrize("spec", ["name", "module"])
def test_use_backend_restores_after_normal_exit_and_after_exception(spec: str) -> None:
    xps = _require_strict()
    target = "array_api_strict" if spec == "name" else xps
    start = ml.get_backend()
    with ml.use_backend(target) as be:
        assert ml.get_backend() is be and be.name == "array_api_strict"
    assert ml.get_backend() == start

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with ml.use_backend(target, device=xps.Device("device1")):
            assert ml.get_backend().name == "array_api_strict"
            raise Boom
    assert ml.get_backend() == start


def test_use_backend_nested_restores_each_level() -> None:
    xps = _require_strict()
    with ml.use_backend(xps, device=xps.Device("device1")) as outer:
        with ml.use_backend("numpy"):
            assert ml.get_backend().xp is np
        assert ml.get_backend() == outer
    assert ml.get_backend().xp is np


# ---------------------------------------------------------------- refusals


def test_missing_cupy_raises_backend_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cupy", None)  # makes `import cupy` fail even where installed
    start = ml.get_backend()
    with pytest.raises(ml.BackendUnavailableError) as info:
        ml.set_backend("cupy")
    err = info.value
    assert isinstance(err, ImportError) and isinstance(err, ml.MiniLoraError)
    msg = str(err)
    assert "cupy" in msg and "not installed" in msg and "pip install" in msg
    assert ml.get_backend() == start  # a failed switch changes nothing
    with pytest.raises(ImportError):  # callers can catch it as the ImportError it is
        with ml.use_backend("cupy"):
            pass
    assert ml.get_backend() == start


@pytest.mark.parametrize("name", ["torch", "jax", "NumPy", "", "cupy "])
def test_unknown_backend_name_lists_the_known_ones(name: str) -> None:
    with pytest.raises(ml.MiniLoraValueError) as info:
        ml.set_backend(name)
    assert isinstance(info.value, ValueError)
    msg = str(info.value)
    for known in KNOWN_BACKENDS:
        assert repr(known) in msg, (known, msg)
    assert repr(name) in msg
    assert ml.get_backend().xp is np


@pytest.mark.parametrize("module", [types.ModuleType("fake_xp"), sys.modules["json"], sys.modules["math"]],
                         ids=["empty", "json", "math"])
def test_module_that_is_not_an_array_namespace_is_refused(module: types.ModuleType) -> None:
    with pytest.raises(ml.MiniLoraValueError) as info:
        ml.set_backend(module)
    msg = str(info.value)
    assert module.__name__ in msg and "array-API namespace" in msg
    assert ml.get_backend().xp is np


@pytest.mark.parametrize("bad", [3, None, 1.5, ["numpy"], np.zeros(2)],
                         ids=["int", "None", "float", "list", "ndarray"])
def test_non_module_non_string_is_a_type_error(bad: Any) -> None:
    with pytest.raises(ml.MiniLoraTypeError) as info:
        ml.set_backend(bad)
    assert isinstance(info.value, TypeError)
    assert type(bad).__name__ in str(info.value)
    assert ml.get_backend().xp is np


# ---------------------------------------------------------------- where new arrays are made


def _make_all(seed: int) -> dict:
    return {
        "dense": ml.dense_init(seed, 5, 3),
        "dense_nobias": ml.dense_init(np.random.default_rng(seed), 4, 2, bias=False),
        "lora_kaiming": ml.lora_init(seed, 5, 3, 2),
        "lora_gaussian": ml.lora_init(seed, 5, 3, 2, init="gaussian"),
        "lora_normal": ml.lora_init(seed, 5, 3, 3, init="normal"),
        "mask": {"m": ml.dropout_mask(seed, (2, 4, 5), 0.3)},
        "mask_f32": {"m": ml.dropout_mask(seed, (6,), 0.5, dtype="float32")},
    }


def _leaves(tree: dict) -> list[tuple[str, Any]]:
    return [(f"{k}.{j}", a) for k, sub in tree.items() for j, a in sub.items()]


@pytest.mark.parametrize("seed", [0, 123])
def test_creators_use_the_active_backend(backend: Any, seed: int) -> None:
    made = _make_all(seed)
    assert set(made["dense_nobias"]) == {"W"}
    for path, a in _leaves(made):
        _assert_on_backend(a, backend)
        want = "float32" if path.startswith("mask_f32") else "float64"
        assert backend.get(a).dtype == np.dtype(want), path


@pytest.mark.parametrize("seed", [0, 123])
def test_creators_give_the_same_numbers_on_every_backend(seed: int) -> None:
    xps = _require_strict()
    host = _make_all(seed)
    with ml.use_backend(xps, device=xps.Device("device1")):
        moved = _make_all(seed)
    for (path, a), (_, b) in zip(_leaves(host), _leaves(moved), strict=True):
        assert type(a) is np.ndarray and type(b) is not np.ndarray, path
        got = np.asarray(ml.to_numpy(b))
        assert got.dtype == a.dtype and np.array_equal(got, a), path
    # different seeds really do differ (the comparison above is not vacuous)
    other = _make_all(seed + 1)
    assert not np.array_equal(other["dense"]["W"], host["dense"]["W"])
    assert np.all(host["lora_kaiming"]["B"] == 0)


def test_mixing_backends_in_lora_dense_is_a_type_error() -> None:
    xps = _require_strict()
    host_params = ml.dense_init(0, 4, 3)
    host_lora = ml.lora_init(1, 4, 3, 2)
    x_host = np.random.default_rng(2).standard_normal((5, 4))
    with ml.use_backend(xps, device=xps.Device("device1")):
        x_dev = ml.to_backend(x_host)
        lora_dev = ml.to_backend(host_lora)
    cases = [
        (host_params, host_lora, x_dev),
        (host_params, lora_dev, x_host),
        (host_params, {"A": host_lora["A"], "B": lora_dev["B"]}, x_host),
    ]
    for params, lora, x in cases:
        with pytest.raises(ml.MiniLoraTypeError) as info:
            ml.lora_dense(params, lora, x)
        assert "backend" in str(info.value)
    # the same data on one backend is fine
    ml.lora_dense(host_params, host_lora, x_host)


def test_to_backend_to_numpy_round_trip(backend: Any) -> None:
    rng = np.random.default_rng(5)
    tree = {"layer": {"W": rng.standard_normal((3, 4)), "b": rng.standard_normal(3)},
            "stack": [rng.standard_normal(2), (rng.standard_normal((1, 2)),)]}
    moved = ml.to_backend(tree)
    assert isinstance(moved["stack"], list) and isinstance(moved["stack"][1], tuple)
    for a in (moved["layer"]["W"], moved["layer"]["b"], moved["stack"][0], moved["stack"][1][0]):
        _assert_on_backend(a, backend)
    back = ml.to_numpy(moved)
    flat_in = [tree["layer"]["W"], tree["layer"]["b"], tree["stack"][0], tree["stack"][1][0]]
    flat_out = [back["layer"]["W"], back["layer"]["b"], back["stack"][0], back["stack"][1][0]]
    for a, b in zip(flat_in, flat_out, strict=True):
        assert type(b) is np.ndarray and b.dtype == a.dtype and np.array_equal(a, b)
    # with a dtype: cast on the way in
    low = ml.to_backend(tree["layer"], dtype="float32")
    assert backend.get(low["W"]).dtype == np.float32
    np.testing.assert_array_equal(backend.get(low["W"]), tree["layer"]["W"].astype(np.float32))


# ---------------------------------------------------------------- import stays light

HEAVY = ("scipy", "torch", "array_api_strict", "array_api_compat", "cupy", "matplotlib")


def test_import_minilora_does_not_import_heavy_modules() -> None:
    code = (
        "import sys, json; import minilora; "
        f"print(json.dumps(sorted(m for m in {list(HEAVY)!r} if m in sys.modules)))"
    )
    assert json.loads(_python(code).strip().splitlines()[-1]) == []
    # control: the same probe does report a heavy module once something imports it
    code_ctl = code.replace("import minilora;", "import minilora, array_api_strict;")
    _require_strict()
    assert json.loads(_python(code_ctl).strip().splitlines()[-1]) == ["array_api_strict"]
