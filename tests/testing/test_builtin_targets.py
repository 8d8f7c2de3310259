"""The built-in targets flax, keras and torchtune: each ends green through ``minilora check`` (the
command itself, default cases), with what it declares shown; and every known difference between
them and torch's conventions that their adapters declare is pinned here for the installed
versions (the difference is really there, and undeclared it fails the check), as PEFT's defects
are pinned in tests/peft/test_multi_adapter.py. docs/tolerance.md lists them in one table."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import REPO, require

import minilora as ml
import minilora.testing
from minilora.testing.adapters import FrameworkUnavailableError
from minilora.testing.conformance import check

# target -> the packages it drives, its rows that must be n/a, and the declaration line's fragments
DORA = {"dora_forward", "dora_grad_x", "dora_grad_A", "dora_grad_B", "dora_grad_m", "dora_merge",
        "dora_merged_forward", "dora_unmerge"}
EMBEDDING = {"embedding_forward", "embedding_grad_A", "embedding_grad_B", "embedding_merge",
             "embedding_merged_forward"}
TARGETS = {
    "flax": (("jax", "flax", "optax"), {"merge", "merged_forward", "unmerge", "trainable"} | DORA | EMBEDDING,
             ["4 known differences"]),
    "keras": (("torch", "keras"), {"unmerge", "trainable"} | DORA,
              ["float64: adapter float32, accumulate float32, bias_correction float32", "Adam eps hat"]),
    "torchtune": (("torch", "torchao", "torchtune"), {"unmerge", "dora_unmerge", "trainable"} | EMBEDDING,
                  ["float16: accumulate float32", "DoRA bias scaled"]),
}
DTYPES = {"flax": ["float64"], "keras": ["float64", "float32"],
          "torchtune": ["float64", "float32", "float16", "bfloat16"]}


def need(package: str) -> Any:
    """``helpers.require``, with Keras imported on the torch backend as its adapter imports it."""
    if package == "keras" and "keras" not in sys.modules:
        os.environ["KERAS_BACKEND"] = "torch"
    return require(package)


def run_check(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO)] + ([os.environ["PYTHONPATH"]]
                                                                      if os.environ.get("PYTHONPATH") else [])))
    return subprocess.run([sys.executable, "-m", "minilora", "check", *args], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=timeout)


@pytest.mark.compare
@pytest.mark.slow
@pytest.mark.parametrize("target", list(TARGETS))
def test_minilora_check_passes_for_the_target(target: str, tmp_path: Path) -> None:
    packages, na, declared = TARGETS[target]
    for package in packages:
        need(package)
    out = run_check(target, "--json", str(tmp_path / "r.json"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith(f"minilora check {target}: ")
    assert lines[1].startswith("declared: ") and all(d in lines[1] for d in declared), lines[1]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["passed"] is True and report["declared"]["dtypes"] == DTYPES[target]
    rows = {(r["property"], r["dtype"]): r for r in report["results"]}
    for (prop, _dt), r in rows.items():
        if prop in na:
            assert r["verdict"] == "n/a", r
        else:
            assert r["verdict"] == "pass" and r["failed_cases"] == 0 and r["ratio"] <= 1.0, r
            assert r["cases"] >= (2 if prop == "init" else 9), r
    assert {dt for _, dt in rows} - {"any"} == set(DTYPES[target])
    assert {p for (p, _), r in rows.items() if r["verdict"] == "pass"} >= {"forward", "grad_A", "adam", "init"}
    assert lines[-1].startswith("all ") and "checks passed" in lines[-1]


# --------------------------------------------------------------------------- Keras


def _keras_adapter() -> Any:
    require("torch")
    need("keras")
    from minilora.testing.adapters.keras_adapter import KerasAdapter

    return KerasAdapter


@pytest.mark.compare
def test_keras_keeps_the_lora_factors_float32_under_a_float64_layer() -> None:
    KerasAdapter = _keras_adapter()
    keras = KerasAdapter().keras
    layer = keras.layers.Dense(3, dtype="float64")
    layer.build((None, 4))
    layer.enable_lora(2)
    assert keras.backend.standardize_dtype(layer.kernel.dtype) == "float64"
    assert layer.lora_kernel_a.dtype == "float32" and layer.lora_kernel_b.dtype == "float32"

    class Undeclared(KerasAdapter):  # claims float64 throughout
        precision = {"float64": {"bias_correction": "float32"}, "float32": {"bias_correction": "float32"}}

    report = check(Undeclared, dtypes=["float64"], properties=["forward", "grad_A"], max_examples=2)
    assert not report.result("forward", "float64").passed and not report.result("grad_A", "float64").passed


@pytest.mark.compare
def test_keras_lora_layers_keep_their_bias_trainable() -> None:
    keras = _keras_adapter()().keras
    layer = keras.layers.Dense(3)
    layer.build((None, 4))
    layer.enable_lora(2)
    assert sorted(v.path.split("/")[-1] for v in layer.trainable_variables) == ["bias", "lora_kernel_a",
                                                                              "lora_kernel_b"]
    emb = keras.layers.Embedding(5, 3)
    emb.build()
    emb.enable_lora(2)
    assert sorted(v.path.split("/")[-1] for v in emb.trainable_variables) == ["lora_embeddings_a",
                                                                            "lora_embeddings_b"]


@pytest.mark.compare
def test_keras_runs_float64_matmuls_in_float32() -> None:
    KerasAdapter = _keras_adapter()
    keras, torch = KerasAdapter().keras, KerasAdapter().torch
    assert keras.backend.result_type("float64", "float64") == "float32"
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((8, 64)), rng.standard_normal((64, 16))
    got = keras.ops.matmul(torch.from_numpy(x), torch.from_numpy(w))
    assert got.dtype == torch.float32
    # and its value is a float32 product: beyond any float64 rounding, within float32's bound
    err, M = np.abs(got.double().numpy() - x @ w), np.abs(x) @ np.abs(w)
    assert np.max(err / M) > 1e-9 and np.all(err <= ml.testing.gamma(66, "float32") * M)


@pytest.mark.compare
def test_keras_adam_is_epsilon_hat_with_float32_bias_correction() -> None:
    KerasAdapter = _keras_adapter()

    class TorchEps(KerasAdapter):  # claims torch's eps placement
        adam_eps = "torch"

    class Float64Correction(KerasAdapter):  # claims 1 - beta^t in float64
        precision = {"float64": {"adapter": "float32", "accumulate": "float32"}, "float32": {}}

    eps = check(TorchEps, dtypes=["float32"], properties=["adam"], max_examples=0).result("adam", "float32")
    failing = [c["case"] for c in eps.case_results if c["passed"] is False]
    assert not eps.passed and any("eps 0.001" in c or "eps 1e-06" in c for c in failing), eps.message()
    honest = check(KerasAdapter, dtypes=["float32"], properties=["adam"], max_examples=0).result("adam", "float32")
    assert honest.passed, honest.message()
    corr = check(Float64Correction, dtypes=["float32"], properties=["adam"], max_examples=8)
    assert not corr.result("adam", "float32").passed


@pytest.mark.compare
@pytest.mark.parametrize("target", ["keras", "flax"])
def test_keras_and_flax_draw_A_from_he_uniform(target: str) -> None:
    if target == "keras":
        cls = _keras_adapter()
    else:
        for package in ("jax", "flax", "optax"):
            require(package)
        from minilora.testing.adapters.flax_adapter import FlaxAdapter as cls

    class Kaiming(cls):  # type: ignore[misc, valid-type]
        inits = ("kaiming",)

    assert check(cls, properties=["init"]).passed
    row = check(Kaiming, properties=["init"]).results[0]
    assert row.property == "init" and not row.passed  # sqrt(6/d_in) is sqrt(6) times kaiming's bound


@pytest.mark.compare
def test_keras_on_another_backend_is_refused_with_one_line() -> None:
    _keras_adapter()
    require("jax")
    code = ("import os; os.environ['KERAS_BACKEND'] = 'jax'; import keras\n"
            "from minilora.testing.adapters import load_adapter\n"
            "try:\n    load_adapter('keras')\nexcept Exception as e:\n    print(type(e).__name__, e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHONPATH=str(REPO)), cwd=REPO)
    assert out.stdout.startswith("FrameworkUnavailableError") and "'jax' backend" in out.stdout, out.stdout
    assert issubclass(FrameworkUnavailableError, ImportError)


# --------------------------------------------------------------------------- Flax and optax


def _flax() -> Any:
    for package in ("jax", "flax", "optax"):
        require(package)
    from minilora.testing.adapters.flax_adapter import FlaxAdapter

    return FlaxAdapter()


@pytest.mark.compare
def test_flax_lora_linear_has_no_alpha() -> None:
    import inspect

    adapter = _flax()
    nnx = adapter.nnx
    names = set(inspect.signature(nnx.LoRALinear).parameters)
    assert not {"alpha", "lora_alpha", "scale", "scaling"} & names
    model = nnx.LoRALinear(5, 3, lora_rank=2, rngs=nnx.Rngs(0), param_dtype="float64", lora_param_dtype="float64",
                           b_initializer=nnx.initializers.normal(1.0))
    x = np.random.default_rng(1).standard_normal((4, 5))
    W, b = np.asarray(model.kernel.get_value()), np.asarray(model.bias.get_value())
    a, bb = np.asarray(model.lora.lora_a.get_value()), np.asarray(model.lora.lora_b.get_value())
    np.testing.assert_allclose(np.asarray(model(x)), x @ W + b + (x @ a) @ bb, rtol=1e-12)  # scale 1


def _amsgrad_trajectories() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """optax.amsgrad, torch's amsgrad (minilora's adam_step), and max_t of the bias-corrected v,
    on gradients that shrink (so the maximum matters)."""
    adapter = _flax()
    optax, jnp = adapter.optax, adapter.jnp
    lr, b1, b2, eps = 0.1, 0.9, 0.99, 1e-8
    grads = [np.array([3.0, -2.0]), np.array([0.5, 0.1]), np.array([0.2, -0.05]), np.array([0.1, 0.01])]
    tx = optax.amsgrad(lr, b1=b1, b2=b2, eps=eps)
    p = jnp.zeros(2)
    state = tx.init(p)
    for g in grads:
        updates, state = tx.update(jnp.asarray(g), state, p)
        p = optax.apply_updates(p, updates)
    theirs = np.asarray(p)
    mine, st = {"p": np.zeros(2)}, ml.adam_init({"p": np.zeros(2)}, amsgrad=True)
    for g in grads:
        mine, st = ml.adam_step(mine, {"p": g}, st, lr=lr, betas=(b1, b2), eps=eps, amsgrad=True)
    q, m, v, vmax = np.zeros(2), np.zeros(2), np.zeros(2), np.zeros(2)
    for t, g in enumerate(grads, start=1):
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        vmax = np.maximum(vmax, v / (1 - b2**t))
        q = q - lr * (m / (1 - b1**t)) / (np.sqrt(vmax) + eps)
    return theirs, mine["p"], q, np.array(grads)


@pytest.mark.compare
def test_optax_amsgrad_keeps_the_maximum_of_the_bias_corrected_second_moment() -> None:
    theirs, torch_like, corrected_max, _ = _amsgrad_trajectories()
    np.testing.assert_allclose(theirs, corrected_max, rtol=1e-12)
    assert np.max(np.abs(theirs - torch_like) / np.abs(torch_like)) > 1e-3  # torch's differs
    adapter = _flax()
    assert "amsgrad" not in adapter.optimizer_features  # so those cases are "not covered"
    row = check(type(adapter), properties=["adam"], max_examples=0).result("adam", "float64")
    assert row.passed and row.not_covered > 0 and "amsgrad" in row.missing


@pytest.mark.compare
def test_flax_adam_without_x64_would_compute_the_bias_correction_in_float32() -> None:
    # optax computes 1 - beta^t as a JAX array of the default float type: float64 only with x64,
    # which the adapter turns on (without it the float32 rounding is the false alarm)
    adapter = _flax()
    assert adapter.jax.config.read("jax_enable_x64") is True
    count = adapter.jnp.asarray(3, adapter.jnp.int32)  # optax's step count
    assert (1 - 0.999**count).dtype == np.float64  # optax.tree.bias_correction's 1 - decay**count
    assert math.isclose(float(1 - 0.999**count), 1 - 0.999**3, rel_tol=1e-15)
    code = "import jax.numpy as jnp; print((1 - 0.999 ** jnp.asarray(3, jnp.int32)).dtype)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={k: v for k, v in os.environ.items() if k != "JAX_ENABLE_X64"})
    assert out.stdout.strip() == "float32", out.stdout + out.stderr  # JAX's default: x64 off


# --------------------------------------------------------------------------- torchtune's DoRA


@pytest.mark.compare
def test_torchtune_dora_scales_the_bias_in_its_forward_but_not_in_its_merge() -> None:
    for package in ("torch", "torchao", "torchtune"):
        require(package)
    from minilora.testing.adapters.torchtune_adapter import TorchtuneAdapter
    from minilora.testing.variant_problems import make_dora_problem

    adapter = TorchtuneAdapter()
    p = make_dora_problem(lead=(3,), d_in=5, d_out=4, rank=2, alpha=4.0, seed=11)
    n = np.linalg.norm(p.W + p.scale * (p.B @ p.A), axis=1)
    c = p.magnitude / n
    trained = adapter.dora_forward(p)
    merged = adapter.dora_merge(p)["y"]
    np.testing.assert_allclose(trained - merged, np.broadcast_to((c - 1) * p.b, trained.shape), atol=1e-12)
    assert np.max(np.abs(trained - merged)) > 0.1  # the merged model is not the trained one

    class PeftBias(TorchtuneAdapter):  # claims PEFT's unscaled bias
        dora_bias = "peft"

    props = ["dora_forward", "dora_grad_m", "dora_merge", "dora_merged_forward"]
    honest = check(TorchtuneAdapter, dtypes=["float64"], properties=props, max_examples=2)
    assert honest.passed, honest.failures()
    lying = check(PeftBias, dtypes=["float64"], properties=props, max_examples=2)
    assert {r.property for r in lying.results if not r.passed} == {"dora_forward", "dora_grad_m"}
