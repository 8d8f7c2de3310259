"""Models with named layers against real PEFT (float64): which modules a LoraConfig targets
(list / suffix / regex / "all-linear" / exclude), forward and gradients with rank and alpha
patterns, rsLoRA and the bias modes, merges, and adapter files both ways. Then the NumPy-only
properties: merge/unmerge, lora_state, splitting, backends, errors, the example.

Tolerance as in test_torch_parity.py: norm-wise relative error against a magnitude reference;
the outputs are sums of a few hundred float64 products (observed ~1e-15), so 1e-10 passes any
BLAS and fails a wrong scale, pattern or target by many orders of magnitude.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import D_MODEL, SIZES, copy_base, np_input, np_model, rel_err, torch_model
from helpers import model_forward as np_forward
from helpers import peft_modules as torch_and_peft

import minilora as ml
from minilora.errors import MiniLoraValueError
from minilora.peft import models as M
from minilora.peft.files import load_peft_adapter, save_peft_adapter

REPO = Path(__file__).resolve().parents[2]


def peft_targets(model: Any, peft: Any) -> list[str]:
    prefix = "base_model.model."
    return sorted(n[len(prefix):] for n, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer))


# ---------------------------------------------------------------- which modules are targeted

TARGETS = [
    (["q_proj", "v_proj"], None),
    (["attn.o_proj", "fc1", "head"], None),
    (r".*\.(q|k)_proj", None),
    (r"mlp\..*", None),
    ("all-linear", None),
    ("all-linear", ["fc2"]),
    (["q_proj", "v_proj", "fc1"], r".*v_proj"),
    (["proj"], None),  # a suffix must end at a "." boundary: matches nothing
    ("q_proj", None),  # a string is a full-match regex, not a suffix: matches nothing
]


@pytest.mark.compare
@pytest.mark.parametrize(("targets", "exclude"), TARGETS)
def test_targeted_modules_match_peft(targets: Any, exclude: Any) -> None:
    torch, peft = torch_and_peft()
    params = np_model("attention")
    config = peft.LoraConfig(target_modules=targets, exclude_modules=exclude, r=2)
    try:
        expected = peft_targets(peft.get_peft_model(torch_model(torch, "attention"), config), peft)
    except ValueError:
        expected = None  # PEFT found no target
    if expected is None:
        with pytest.raises(MiniLoraValueError, match="match no layer"):
            M.targeted_modules(params, targets, exclude=exclude)
    else:
        assert sorted(M.targeted_modules(params, targets, exclude=exclude)) == expected
        assert expected  # every non-empty case really targets something


def test_all_linear_leaves_out_the_output_layer_only() -> None:
    params = np_model("mlp")
    assert M.targeted_modules(params, "all-linear") == ["layers.0", "layers.1"]
    assert M.targeted_modules(params, "ALL-LINEAR", output_layer=None) == ["layers.0", "layers.1", "head"]
    assert M.targeted_modules(params, "all-linear", output_layer="layers.0") == ["layers.1", "head"]


# ---------------------------------------------------------------- forward and gradients

CONFIGS = [
    # (kind, targets, r, alpha, rank_pattern, alpha_pattern, rslora, bias)
    ("mlp", "all-linear", 2, 5, {}, {}, False, "none"),
    ("mlp", ["layers.0", "head"], 3, 2, {"head": 1}, {"layers.0": 7}, False, "all"),
    ("mlp", r"layers\.\d", 2, 4, {r"layers\.1": 4}, {}, True, "lora_only"),
    ("attention", ["q_proj", "v_proj"], 2, 3, {}, {}, False, "none"),
    ("attention", "all-linear", 2, 4, {"fc1": 4, "o_proj": 1}, {"q_proj": 16, "mlp.fc.": 3}, True, "lora_only"),
    ("attention", r".*(k_proj|fc2|head)", 3, 6, {}, {"head": 1}, False, "all"),
]


def _peft_pair(kind: str, targets: Any, r: int, alpha: float, rp: dict, ap: dict, rslora: bool, bias: str,
               seed: int = 0) -> tuple[Any, dict, Any]:
    """(PEFT model, minilora params) with identical base weights and random non-zero A, B."""
    torch, peft = torch_and_peft()
    params = M.add_lora(np_model(kind, seed), targets, r, alpha, rng=seed, rank_pattern=rp, alpha_pattern=ap,
                        use_rslora=rslora)
    rng = np.random.default_rng(seed + 100)
    for layer in params.values():
        if "lora" in layer:
            f = layer["lora"]["default"]
            layer["lora"]["default"] = {"A": rng.standard_normal(f["A"].shape) * 0.5,
                                        "B": rng.standard_normal(f["B"].shape) * 0.5}
    net = torch_model(torch, kind)
    copy_base(torch, net, {n: {k: v for k, v in layer.items() if k in ("W", "b")} for n, layer in params.items()})
    config = peft.LoraConfig(target_modules=targets, r=r, lora_alpha=alpha, rank_pattern=rp, alpha_pattern=ap,
                             use_rslora=rslora, bias=bias)
    model = peft.get_peft_model(net, config)
    with torch.no_grad():
        for name, layer in params.items():
            if "lora" in layer:
                mod = model.base_model.model.get_submodule(name)
                mod.lora_A["default"].weight.copy_(torch.from_numpy(layer["lora"]["default"]["A"]))
                mod.lora_B["default"].weight.copy_(torch.from_numpy(layer["lora"]["default"]["B"]))
                assert mod.scaling["default"] == pytest.approx(layer["scale"]["default"], rel=1e-15)
    return model, params, torch


def _our_path(torch_name: str) -> tuple[str, ...]:
    """'base_model.model.attn.q_proj.lora_A.default.weight' -> ('attn.q_proj', 'lora', 'default', 'A')."""
    name = torch_name[len("base_model.model."):]
    m = re.fullmatch(r"(.+)\.lora_([AB])\.(\w+)\.weight", name)
    if m:
        return (m.group(1), "lora", m.group(3), m.group(2))
    module, _, leaf = name.replace(".base_layer.", ".").rpartition(".")
    return (module, {"weight": "W", "bias": "b"}[leaf])


def _paths(tree: dict, prefix: tuple = ()) -> list[tuple]:
    out = []
    for k, v in tree.items():
        out += _paths(v, (*prefix, k)) if isinstance(v, dict) else [(*prefix, k)]
    return out


def _get(tree: dict, path: tuple) -> Any:
    for k in path:
        tree = tree[k]
    return tree


@pytest.mark.compare
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c[0]}-{c[1]}-{c[-1]}")
def test_forward_gradients_and_trainables_match_peft(config: tuple) -> None:
    kind, bias = config[0], config[-1]
    model, params, torch = _peft_pair(*config)
    rng = np.random.default_rng(7)
    x = np_input(kind, rng)
    out = np_forward(kind, params, x)
    g = rng.standard_normal(out.shape)

    y = model(torch.from_numpy(x))
    (y * torch.from_numpy(g)).sum().backward()
    assert rel_err(out, y.detach().numpy()) <= 1e-10

    trainable, frozen = M.split_trainable(params, bias=bias)
    # the same parameters are trainable as in PEFT (bias modes included)
    torch_trainable = {_our_path(n): p for n, p in model.named_parameters() if p.requires_grad}
    assert sorted(torch_trainable) == sorted(_paths(trainable))

    grads = ml.grad(lambda t, f: (np_forward(kind, M.join(t, f), x) * g).sum())(trainable, frozen)
    for path, p in torch_trainable.items():
        assert rel_err(_get(grads, path), p.grad.numpy()) <= 1e-10, path


@pytest.mark.compare
def test_merge_all_matches_peft_merge_and_unload_and_unmerges() -> None:
    model, params, _ = _peft_pair("attention", "all-linear", 2, 4, {"fc1": 3}, {}, False, "none")
    merged = M.merge_all(params)
    base = model.merge_and_unload()
    for name, layer in merged.items():
        assert rel_err(layer["W"], base.get_submodule(name).weight.detach().numpy()) <= 1e-12
        assert not layer.get("lora") or name == "head"
    x = np_input("attention", np.random.default_rng(3))
    assert rel_err(np_forward("attention", merged, x), np_forward("attention", params, x)) <= 1e-12
    back = M.unmerge_all(merged)
    for name, layer in params.items():
        assert rel_err(back[name]["W"], layer["W"]) <= 1e-13
        assert sorted(back[name].get("lora", {})) == sorted(layer.get("lora", {}))
    unloaded = M.merge_all(params, unload=True)
    assert all(set(layer) <= {"W", "b"} for layer in unloaded.values())


@pytest.mark.compare
def test_adapter_files_round_trip_with_peft(tmp_path: Path) -> None:
    """minilora -> PEFT from_pretrained and PEFT save_pretrained -> minilora, same outputs."""
    torch, peft = torch_and_peft()
    model, params, _ = _peft_pair("mlp", ["layers.0", "head"], 3, 2, {"head": 1}, {"layers.0": 7}, True, "none")
    x = np_input("mlp", np.random.default_rng(5))
    expected = np_forward("mlp", params, x)
    # ours -> PEFT
    save_peft_adapter(tmp_path / "ours", M.peft_modules(params), r=3, lora_alpha=2, rank_pattern={"head": 1},
                      alpha_pattern={"layers.0": 7}, use_rslora=True)
    net = torch_model(torch, "mlp")
    copy_base(torch, net, params)
    loaded = peft.PeftModel.from_pretrained(net, str(tmp_path / "ours"))
    assert rel_err(loaded(torch.from_numpy(x)).detach().numpy(), expected) <= 1e-10
    # PEFT -> ours
    model.save_pretrained(str(tmp_path / "peft"))
    base = {n: {k: v for k, v in layer.items() if k in ("W", "b")} for n, layer in params.items()}
    attached = M.attach_peft_adapter(base, load_peft_adapter(tmp_path / "peft"), "mine")
    assert rel_err(np_forward("mlp", attached, x), expected) <= 1e-10


# ---------------------------------------------------------------- NumPy-only properties


@pytest.mark.parametrize("init", ["kaiming", "gaussian", "normal", "pissa", "olora"])
def test_every_init_starts_as_the_base_model(init: str) -> None:
    params = np_model("mlp")
    x = np_input("mlp", np.random.default_rng(0))
    with_lora = M.add_lora(params, "all-linear", 2, 3, rng=1, init=init)
    assert rel_err(M.mlp_forward(with_lora, x), M.mlp_forward(params, x)) <= 1e-12
    changed = [n for n in params if not np.array_equal(with_lora[n]["W"], params[n]["W"])]
    assert changed == ([] if init in ("kaiming", "gaussian", "normal") else ["layers.0", "layers.1"])


def test_lora_state_and_split_hold_exactly_the_adapter() -> None:
    params = M.add_lora(np_model("attention"), ["q_proj", "v_proj"], 2, 4, rng=0, rank_pattern={"v_proj": 3})
    state = M.lora_state(params)
    assert sorted(state) == ["attn.q_proj", "attn.v_proj"]
    assert ml.count_params(state) == (2 * D_MODEL + D_MODEL * 2) + (3 * D_MODEL + D_MODEL * 3)  # r (d_in + d_out)
    trainable, frozen = M.split_trainable(params)
    assert trainable == state
    rebuilt = M.join(trainable, frozen)
    assert _paths(rebuilt) and sorted(_paths(rebuilt)) == sorted(_paths(params))
    with pytest.raises(MiniLoraValueError, match="bias"):
        M.split_trainable(params, bias="some")


def test_bad_input() -> None:
    params = M.add_lora(np_model("mlp"), ["head"], 2, 2, rng=0)
    with pytest.raises(MiniLoraValueError, match="already has an adapter named 'default'"):
        M.add_lora(params, ["head"], 2, 2, rng=0)
    with pytest.raises(MiniLoraValueError, match="match no layer"):
        M.add_lora(params, ["nothing"], 2, 2, rng=0)
    with pytest.raises(MiniLoraValueError, match="init"):
        M.add_lora(params, ["head"], 2, 2, rng=0, init="loftq")


def test_mlp_on_every_backend(backend: Any) -> None:
    """Forward, LoRA gradients and a merge on the backend agree with NumPy to 1e-12."""
    def run() -> tuple:
        params = M.add_lora(M.mlp_init(0, SIZES), "all-linear", 2, 3, rng=1, init="normal")
        rng = np.random.default_rng(2)
        params["layers.1"]["lora"]["default"]["B"] = backend.put(rng.standard_normal((6, 2)))
        x = backend.put(rng.standard_normal((4, SIZES[0])))
        t, f = M.split_trainable(params, bias="lora_only")
        loss = lambda t, f: ml.mse_loss(M.mlp_forward(M.join(t, f), x), x[:, :3])
        value, grads = ml.value_and_grad(loss)(t, f)
        merged = M.mlp_forward(M.merge_all(params), x)
        return backend.get(value), ml.to_numpy(grads), backend.get(merged), backend.get(M.mlp_forward(params, x))

    got = run()
    with ml.use_backend("numpy"):
        ref = run()
    assert rel_err(got[0], ref[0]) <= 1e-12
    for (path, a) in [(p, _get(got[1], p)) for p in _paths(got[1])]:
        assert rel_err(a, _get(ref[1], path)) <= 1e-12, path
    assert rel_err(got[2], ref[3]) <= 1e-12 and rel_err(got[3], ref[3]) <= 1e-12


@pytest.mark.slow
def test_example_trains_the_mlp() -> None:
    out = subprocess.run([sys.executable, str(REPO / "examples" / "train_mlp_lora.py")], capture_output=True,
                         text=True, cwd=REPO, timeout=120, check=False, env={"PYTHONPATH": str(REPO), "PATH": ""})
    assert out.returncode == 0, out.stderr
    first, last = (float(v) for v in re.search(r"loss ([\d.e+-]+) -> ([\d.e+-]+)", out.stdout).groups())
    assert last < 0.05 * first
    assert re.search(r"trainable (\d+) of (\d+)", out.stdout)
    assert "merged forward == LoRA forward: True" in out.stdout


def test_dora_and_embedding_on_every_backend(backend: Any) -> None:
    """The DoRA and embedding primitives (ops.py, issue 4 section) on the backend: forward and
    every gradient equal NumPy's to 1e-12 (the CuPy code path, on array_api_strict)."""
    from minilora import variants as V

    rng = np.random.default_rng(4)
    host = {"W": rng.standard_normal((5, 4)), "b": rng.standard_normal(5), "A": rng.standard_normal((2, 4)),
            "B": rng.standard_normal((5, 2)), "m": rng.random(5) + 1, "x": rng.standard_normal((3, 4)),
            "mask": (rng.random((3, 4)) > 0.3) / 0.7, "E": rng.standard_normal((6, 4)),
            "EA": rng.standard_normal((2, 6)), "EB": rng.standard_normal((4, 2)), "em": rng.random(4) + 1}
    ids = np.array([[0, 5, 2], [2, 2, 1]])

    def run(put: Any, get: Any, idx: Any) -> list:
        p = {k: put(v) for k, v in host.items()}

        def dora(t: dict) -> Any:
            y = V.dora_dense({"W": t["W"], "b": t["b"]}, {"A": t["A"], "B": t["B"]}, t["m"], p["x"], scale=1.5,
                             dropout_mask=p["mask"])
            return ml.mse_loss(y, put(np.ones((3, 5))))

        def emb(t: dict) -> Any:
            e = V.lora_embedding({"W": t["E"]}, {"A": t["EA"], "B": t["EB"]}, idx, scale=0.5, magnitude=t["em"])
            return ml.mse_loss(e, put(np.ones((2, 3, 4))))

        out = []
        for f, keys in ((dora, ("W", "b", "A", "B", "m")), (emb, ("E", "EA", "EB", "em"))):
            value, grads = ml.value_and_grad(f)({k: p[k] for k in keys})
            out += [get(value)] + [get(grads[k]) for k in keys]
        return out

    got = run(backend.put, backend.get, ml.get_backend().asarray(ids))
    want = run(np.asarray, np.asarray, ids)
    for a, b in zip(got, want, strict=True):
        assert rel_err(a, b) <= 1e-12
