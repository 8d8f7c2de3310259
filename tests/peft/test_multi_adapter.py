"""Several adapters on one model and their combination, against real PEFT (float64).

- several active adapters: outputs equal PEFT with ``set_adapter([...])``;
- ``combine_adapters`` cat / linear / svd: each layer's Delta W equals PEFT
  ``add_weighted_adapter``'s ``get_delta_weight`` (svd compared as Delta W: the factors are
  unique only up to signs);
- PEFT's defects, pinned for the installed version: with rsLoRA PEFT's Delta is exactly
  sqrt(new rank) times ours (<= 0.21.2); ``peft_weighted_delta`` reproduces PEFT for that version,
  and its table of older versions (svd's double scale <= 0.20.0) is checked on its own.

Tolerance 1e-10 relative as in test_torch_parity.py (float64 sums of few terms; an SVD of a
well-separated spectrum is accurate to ~1e-15 relative).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from helpers import copy_base, np_input, np_model, rel_err, torch_model
from helpers import model_forward as np_forward
from helpers import peft_modules as torch_and_peft

from minilora.errors import MiniLoraValueError
from minilora.peft import models as M
from minilora.peft import multi_adapter as MA

# adapter "a" on q/v, "b" on v/o/fc1: layers with one, both, or none of the adapters
SPECS = {"a": (["q_proj", "v_proj"], 2, 3.0), "b": (["v_proj", "o_proj", "fc1"], 3, 5.0)}


def _pair(rslora: bool = False, same_rank: bool = False) -> tuple[Any, dict, Any]:
    torch, peft = torch_and_peft()
    params = np_model("attention")
    model = None
    net = torch_model(torch, "attention")
    copy_base(torch, net, params)
    rng = np.random.default_rng(11)
    for name, (targets, r, alpha) in SPECS.items():
        r = 2 if same_rank else r
        params = MA.add_adapter(params, name, targets, r, alpha, rng=0, use_rslora=rslora)
        cfg = peft.LoraConfig(target_modules=targets, r=r, lora_alpha=alpha, use_rslora=rslora)
        if model is None:
            model = peft.get_peft_model(net, cfg, adapter_name=name)
        else:
            model.add_adapter(name, cfg)
    with torch.no_grad():
        for module, layer in params.items():
            for name, f in layer.get("lora", {}).items():
                f["A"], f["B"] = rng.standard_normal(f["A"].shape), rng.standard_normal(f["B"].shape)
                mod = model.base_model.model.get_submodule(module)
                mod.lora_A[name].weight.copy_(torch.from_numpy(f["A"]))
                mod.lora_B[name].weight.copy_(torch.from_numpy(f["B"]))
                assert mod.scaling[name] == pytest.approx(layer["scale"][name], rel=1e-15)
    return model, params, torch


@pytest.mark.compare
@pytest.mark.parametrize("active", [["a"], ["b"], ["a", "b"]])
def test_active_adapters_match_peft(active: list[str]) -> None:
    model, params, torch = _pair()
    x = np_input("attention", np.random.default_rng(1))
    model.base_model.set_adapter(active)
    expected = model(torch.from_numpy(x)).detach().numpy()
    assert rel_err(np_forward("attention", params, x, active), expected) <= 1e-10
    # weighting an adapter is the same as scaling its scale
    weighted = np_forward("attention", params, x, {"a": 0.25, "b": 1.0})
    scaled = {n: ({**layer, "scale": {k: v * (0.25 if k == "a" else 1.0) for k, v in layer["scale"].items()}}
                  if "scale" in layer else layer) for n, layer in params.items()}
    assert rel_err(weighted, np_forward("attention", scaled, x, ["a", "b"])) <= 1e-12


def _deltas(model: Any, params: dict, name: str) -> dict:
    out = {}
    for module in params:
        mod = model.base_model.model.get_submodule(module)
        if hasattr(mod, "lora_A") and name in mod.lora_A:
            out[module] = mod.get_delta_weight(name).detach().numpy()
    return out


@pytest.mark.compare
@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize(("method", "svd_rank"), [("cat", None), ("linear", None), ("svd", None), ("svd", 1)])
def test_combine_adapters_against_peft(method: str, svd_rank: Any, rslora: bool) -> None:
    _, peft = torch_and_peft()
    model, params, _ = _pair(rslora, same_rank=method == "linear")
    weights = [0.75, -1.25]  # exact in float32, as PEFT holds the svd weights (module docstring)
    model.add_weighted_adapter(["a", "b"], weights, "c", combination_type=method, svd_rank=svd_rank)
    peft_deltas = _deltas(model, params, "c")
    ours = MA.combine_adapters(params, ["a", "b"], weights, "c", method, svd_rank=svd_rank)
    assert sorted(peft_deltas) == sorted(n for n, layer in ours.items() if "c" in layer.get("lora", {}))
    new_rank = model.peft_config["c"].r  # PEFT's rank of the new adapter
    for module, expected in peft_deltas.items():
        layer = ours[module]
        assert layer["scale"]["c"] == 1.0
        mine = layer["lora"]["c"]["B"] @ layer["lora"]["c"]["A"]
        # the installed PEFT's exact relation to the intended result
        factor = math.sqrt(new_rank) if rslora and peft.__version__ <= "0.21.2" else 1.0
        # linear: PEFT rounds the coefficients sqrt|w s| to float32 (reproduced exactly below)
        assert rel_err(expected, factor * mine) <= (1e-6 if method == "linear" else 1e-10), module
        if rslora and new_rank > 1:
            assert rel_err(expected, mine) > 0.1  # the defect is really there (sqrt(k) >= sqrt(2))
        present = [a for a in ("a", "b") if a in layer["lora"]]
        src = [layer["lora"][a] for a in present]
        reproduced = MA.peft_weighted_delta(src, [layer["scale"][a] for a in present],
                                            [weights[("a", "b").index(a)] for a in present],
                                            "linear" if len(present) == 1 and method == "linear" else method,
                                            new_rank=new_rank, use_rslora=rslora, peft_version=peft.__version__)
        assert rel_err(expected, reproduced) <= 1e-10, module


def test_cat_and_full_rank_svd_are_exact_and_linear_has_cross_terms() -> None:
    rng = np.random.default_rng(0)
    f = [{"A": rng.standard_normal((2, 6)), "B": rng.standard_normal((5, 2))} for _ in range(2)]
    s, w = [1.5, 0.5], [1.0, -2.0]
    exact = sum(wi * si * fi["B"] @ fi["A"] for wi, si, fi in zip(w, s, f, strict=True))
    for method, k in [("cat", None), ("svd", 4)]:
        c = MA.combine_factors(f, s, w, method, svd_rank=k)
        assert rel_err(c["B"] @ c["A"], exact) <= 1e-12
    c = MA.combine_factors(f, s, w, "linear")
    assert rel_err(c["B"] @ c["A"], exact) > 0.1
    # svd of rank 2 is the best rank-2 approximation (Eckart-Young)
    c = MA.combine_factors(f, s, w, "svd")
    sv = np.linalg.svd(exact, compute_uv=False)
    assert np.linalg.norm(exact - c["B"] @ c["A"]) == pytest.approx(np.linalg.norm(sv[2:]), rel=1e-10)


def test_peft_version_table() -> None:
    """The documented behaviour of old and new PEFT releases, on one layer."""
    rng = np.random.default_rng(1)
    f = [{"A": rng.standard_normal((2, 6)), "B": rng.standard_normal((5, 2))} for _ in range(2)]
    s, w = [2.0, 0.5], [1.0, 1.0]
    intended = sum(wi * si * fi["B"] @ fi["A"] for wi, si, fi in zip(w, s, f, strict=True))
    double = sum(wi * si * si * fi["B"] @ fi["A"] for wi, si, fi in zip(w, s, f, strict=True))
    kw = {"new_rank": 4, "use_rslora": False}
    assert rel_err(MA.peft_weighted_delta(f, s, w, "svd", peft_version="0.20.0", **kw), double) <= 1e-12
    assert rel_err(MA.peft_weighted_delta(f, s, w, "svd", peft_version="0.21.0", **kw), intended) <= 1e-12
    assert rel_err(MA.peft_weighted_delta(f, s, w, "cat", peft_version="0.18.1", **kw), intended) <= 1e-12
    kw["use_rslora"] = True
    assert rel_err(MA.peft_weighted_delta(f, s, w, "cat", peft_version="0.21.2", **kw), 2.0 * intended) <= 1e-12
    assert rel_err(MA.peft_weighted_delta(f, s, w, "cat", peft_version="0.22.0", **kw), intended) <= 1e-12


def test_delete_and_bad_input() -> None:
    params = MA.add_adapter(np_model("mlp"), "a", "all-linear", 2, 2, rng=0)
    params = MA.add_adapter(params, "b", ["head"], 3, 2, rng=0)
    assert M.adapter_names(params) == ["a", "b"]
    assert M.adapter_names(MA.delete_adapter(params, "a")) == ["b"]
    with pytest.raises(MiniLoraValueError, match="no adapter named 'z'"):
        MA.delete_adapter(params, "z")
    with pytest.raises(MiniLoraValueError, match="merged into"):
        MA.delete_adapter(M.merge_all(params, ["a"]), "a")
    with pytest.raises(MiniLoraValueError, match="equal rank"):
        MA.combine_adapters(params, ["a", "b"], [1, 1], "c", "linear")
    with pytest.raises(MiniLoraValueError, match="do not exist"):
        MA.combine_adapters(params, ["a", "z"], [1, 1], "c", "cat")
    with pytest.raises(MiniLoraValueError, match="exists already"):
        MA.combine_adapters(params, ["a", "b"], [1, 1], "b", "cat")
    with pytest.raises(MiniLoraValueError, match="method"):
        MA.combine_adapters(params, ["a", "b"], [1, 1], "c", "ties")
