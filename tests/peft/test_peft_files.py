"""PEFT adapter folders: minilora reads what PEFT's ``save_pretrained`` writes and PEFT's
``from_pretrained`` reads what minilora writes, giving the same outputs (float64).

The helpers at the top (a small torch model with HF-style module names, a PEFT adapter with
non-zero factors) are shared with ``test_merge.py``.

Tolerance: norm-wise relative error against a magnitude reference, as in
``test_torch_parity.py``: the outputs here are sums of at most a few hundred float64 products, so
two correct implementations differ by ~1e-15; 1e-10 leaves room for another BLAS and catches any
wrong scale, transposition or lost factor by many orders of magnitude.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import pytest
from helpers import NET_CONFIGS as CONFIGS
from helpers import VOCAB, base_state, make_net, peft_adapter, peft_modules, rel_err, require

import minilora as ml
from minilora.formats import safetensors as st
from minilora.peft.files import PeftFileError, load_peft_adapter, pattern_value, save_peft_adapter


def np_forward(state: dict, ids: np.ndarray, adapter: Any = None) -> np.ndarray:
    """The model of ``make_net`` in NumPy, with the adapter's LoRA/DoRA/embedding terms."""
    from minilora.variants import dora_dense, lora_embedding

    def lin(name: str, x: Any, fif: bool = False) -> Any:
        p = {"W": state[f"{name}.weight"]}
        if f"{name}.bias" in state:
            p["b"] = state[f"{name}.bias"]
        if adapter is not None and f"{name}.bias" in adapter.extra:  # bias="all"/"lora_only"
            p["b"] = adapter.extra[f"{name}.bias"]
        if adapter is None or name not in adapter.modules:
            return ml.dense(p, x, fan_in_fan_out=fif)
        t, s = adapter.modules[name], adapter.scale(name)
        lora = {"A": t["A"], "B": t["B"]}
        if "lora_bias" in t:
            p = {**p, "b": p["b"] + s * t["lora_bias"]}
        if "m" in t:
            return dora_dense(p, lora, t["m"], x, scale=s, fan_in_fan_out=fif)
        return ml.lora_dense(p, lora, x, scale=s, fan_in_fan_out=fif)

    W = state["embed_tokens.weight"]
    if adapter is not None and "embed_tokens" in adapter.modules:
        t = adapter.modules["embed_tokens"]
        h = lora_embedding({"W": W}, {"A": t["A"], "B": t["B"]}, ids, scale=adapter.scale("embed_tokens"),
                           magnitude=t.get("m"))
    else:
        h = W[ids]
    for i in range(2):
        pre = f"layers.{i}.self_attn."
        z = np.tanh(lin(pre + "q_proj", h) + lin(pre + "k_proj", h) + lin(pre + "v_proj", h))
        h = h + lin(pre + "o_proj", z)
        pre = f"layers.{i}.mlp."
        h = h + lin(pre + "down", np.tanh(lin(pre + "c_fc", h, fif=True)))
    return lin("lm_head", h)


def _ids(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, VOCAB, size=(3, 5))


@pytest.mark.compare
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_peft_saved_adapter_loads_and_gives_peft_outputs(tmp_path: Any, name: str) -> None:
    torch, peft = peft_modules()
    net = make_net(torch, seed=len(name))
    state = base_state(net)
    model = peft_adapter(torch, peft, net, str(tmp_path / "ad"), **CONFIGS[name])
    if name.startswith("bias"):  # bias modes save (trained) base biases too: make them differ from the base
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith("bias") and p.requires_grad:
                    p.add_(1.0)
        model.save_pretrained(str(tmp_path / "ad"))
    adapter = load_peft_adapter(tmp_path / "ad")
    assert sorted(adapter.modules) == sorted(
        n.removeprefix("base_model.model.") for n, m in model.named_modules() if hasattr(m, "lora_A")
        and (m.lora_A or m.lora_embedding_A))
    for module in adapter.modules:  # rank and alpha per module, as PEFT resolved the patterns
        layer = model.get_submodule("base_model.model." + module)
        assert adapter.rank(module) == layer.r["default"]
        assert adapter.scale(module) == pytest.approx(layer.scaling["default"], rel=1e-15)
    ids = _ids(np.random.default_rng(0))
    with torch.no_grad():
        expected = model(torch.from_numpy(ids)).numpy()
    got = np_forward(state, ids, adapter)
    base_only = np_forward(state, ids)
    assert rel_err(got, expected) <= 1e-10
    assert rel_err(base_only, expected) > 1e-3  # the adapter changes the output: the test can fail


@pytest.mark.compare
@pytest.mark.parametrize("name", ["plain", "patterns", "fan_in_fan_out", "dora", "lora_bias", "embedding",
                                  "embedding_dora", "bias_all", "bias_lora_only"])
def test_minilora_saved_adapter_loads_into_peft(tmp_path: Any, name: str) -> None:
    torch, peft = peft_modules()
    net = make_net(torch, seed=3)
    state = base_state(net)
    # an adapter made by minilora alone: shapes from a PEFT-written one, values from NumPy
    peft_adapter(torch, peft, make_net(torch, seed=3), str(tmp_path / "shape"), **CONFIGS[name])
    template = load_peft_adapter(tmp_path / "shape")
    rng = np.random.default_rng(7)
    modules = {m: {k: rng.standard_normal(v.shape) * 0.5 + (1.0 if k == "m" else 0.0) for k, v in t.items()}
               for m, t in template.modules.items()}
    cfg = CONFIGS[name]
    extra = {k: rng.standard_normal(v.shape) for k, v in template.extra.items()}  # bias modes
    assert bool(extra) == name.startswith("bias")
    save_peft_adapter(tmp_path / "mine", modules, kinds=template.kinds, extra=extra, **cfg)
    mine = load_peft_adapter(tmp_path / "mine")
    loaded = peft.PeftModel.from_pretrained(net, str(tmp_path / "mine"))
    ids = _ids(rng)
    with torch.no_grad():
        expected = loaded(torch.from_numpy(ids)).numpy()
    assert rel_err(np_forward(state, ids, mine), expected) <= 1e-10
    for module, t in modules.items():  # PEFT holds exactly the values we wrote
        layer = loaded.get_submodule("base_model.model." + module)
        a = layer.lora_embedding_A["default"] if "default" in layer.lora_embedding_A else layer.lora_A["default"].weight
        np.testing.assert_array_equal(a.detach().numpy(), t["A"])


@pytest.mark.compare
def test_pattern_value_follows_peft_get_pattern_key() -> None:
    peft = require("peft")
    from peft.utils.other import get_pattern_key

    patterns = {"q_proj": 1, r"layers\.1\..*": 2, "self_attn.v_proj": 3, "proj": 4}
    names = ["layers.0.self_attn.q_proj", "layers.1.mlp.down", "layers.0.self_attn.v_proj", "x.k_proj",
             "layers.0.mlp.c_fc", "q_proj"]
    for n in names:
        key = get_pattern_key(list(patterns), n)
        assert pattern_value(patterns, n, "default") == patterns.get(key, "default"), n
    assert peft.__version__


# --------------------------------------------------------------------------- bad input


def _write_min_adapter(folder: Any, **overrides: Any) -> None:
    rng = np.random.default_rng(0)
    modules = {"fc": {"A": rng.standard_normal((2, 4)), "B": rng.standard_normal((3, 2))}}
    save_peft_adapter(folder, modules, r=2, lora_alpha=4, **overrides)


def test_round_trip_without_peft(tmp_path: Any) -> None:
    _write_min_adapter(tmp_path)
    a = load_peft_adapter(tmp_path)
    assert a.rank("fc") == 2 and a.scale("fc") == 2.0 and a.config["target_modules"] == ["fc"]
    header, _ = st.read_header(tmp_path / "adapter_model.safetensors")
    assert sorted(header) == ["base_model.model.fc.lora_A.weight", "base_model.model.fc.lora_B.weight"]


@pytest.mark.parametrize(("edit", "match"), [
    (lambda c: c.update(peft_type="IA3"), "unsupported peft_type 'IA3'"),
    (lambda c: c.update(use_qalora=True), "use_qalora"),
    (lambda c: c.update(layer_replication=[[0, 1]]), "layer_replication"),
    (lambda c: c.update(r=3), "rank 2 but the config gives r=3"),
    (lambda c: c.update(rank_pattern={"fc": 5}), "r=5"),
    (lambda c: c.update(use_dora=True), "lora_magnitude_vector is missing"),
    (lambda c: c.update(bias="some"), "bias must be"),
    (lambda c: c.update(lora_alpha=-1), "lora_alpha must be a positive"),
])
def test_bad_config_is_refused_naming_the_file(tmp_path: Any, edit: Any, match: str) -> None:
    _write_min_adapter(tmp_path)
    path = tmp_path / "adapter_config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))
    with pytest.raises(PeftFileError if "rank" not in match and "r=" not in match else ml.MiniLoraValueError,
                       match=match.replace("(", r"\(").replace("[", r"\[")) as info:
        load_peft_adapter(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_missing_and_corrupt_files(tmp_path: Any) -> None:
    with pytest.raises(PeftFileError, match="adapter folder not found"):
        load_peft_adapter(tmp_path / "nope")
    with pytest.raises(PeftFileError, match="adapter_config.json: file not found"):
        load_peft_adapter(tmp_path)
    _write_min_adapter(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-5])
    with pytest.raises(st.SafetensorsError, match="adapter_model.safetensors"):
        load_peft_adapter(tmp_path)
    os.remove(weights)
    (tmp_path / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(PeftFileError, match="adapter_model.bin"):
        load_peft_adapter(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(PeftFileError, match="corrupt JSON"):
        load_peft_adapter(tmp_path)


def test_inconsistent_tensors_name_the_module(tmp_path: Any) -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ml.ShapeError, match=r"module 'fc'.*\(3, 2\)"):
        save_peft_adapter(tmp_path, {"fc": {"A": rng.standard_normal((2, 4)), "B": rng.standard_normal((3, 5))}},
                          r=2, lora_alpha=2)
    with pytest.raises(PeftFileError, match="module 'fc' lacks lora B"):
        save_peft_adapter(tmp_path, {"fc": {"A": rng.standard_normal((2, 4))}}, r=2, lora_alpha=2)
    assert not os.path.exists(tmp_path / "adapter_model.safetensors")  # nothing half-written
