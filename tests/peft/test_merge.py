"""``minilora merge`` and ``minilora inspect`` against PEFT's ``merge_and_unload``.

Acceptance: a PEFT-saved adapter merged into a safetensors base file (written by
``safetensors.torch``, HF module names) by ``minilora merge`` equals PEFT's merged model tensor
by tensor: bit for bit in float32, float16 and bfloat16 for plain LoRA (PEFT's rounding: adapter
held in float32, delta and sum in float32, one rounding to the base dtype), to rounding for
DoRA (torch's float32 norm sums in another order) and in float64.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import NET_CONFIGS as CONFIGS
from helpers import make_net, peft_adapter, peft_modules, rel_err

import minilora as ml
import minilora.cli as cli
from minilora.formats import safetensors as st
from minilora.peft.files import save_peft_adapter
from minilora.peft.merge import MergeError, merge_adapter_file

REPO = Path(__file__).resolve().parents[2]


def _setup(tmp_path: Path, name: str, dtype: str, seed: int = 0) -> tuple[Any, Any, Path, Path]:
    """(torch, peft, base file, adapter folder): a float32 adapter saved by PEFT, a base in dtype."""
    torch, peft = peft_modules()
    peft_adapter(torch, peft, make_net(torch, seed, torch.float32), str(tmp_path / "ad"), seed=seed + 1,
                 **CONFIGS[name])
    from safetensors.torch import save_file

    net = make_net(torch, seed, getattr(torch, dtype))
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "base.safetensors"))
    return torch, peft, tmp_path / "base.safetensors", tmp_path / "ad"


def _peft_merged(torch: Any, peft: Any, base: Path, adapter: Path, dtype: str, scale: float = 1.0) -> dict:
    from safetensors.torch import load_file

    net = make_net(torch, 0, getattr(torch, dtype))
    net.load_state_dict(load_file(str(base)))
    model = peft.PeftModel.from_pretrained(net, str(adapter))
    if scale != 1.0:
        for m in model.modules():
            if hasattr(m, "scale_layer") and hasattr(m, "lora_A"):
                m.scale_layer(scale)
    return {k: v.detach() for k, v in model.merge_and_unload().state_dict().items()}


def _bits(t: Any) -> np.ndarray:
    import torch

    view = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32,
            torch.float64: torch.int64}[t.dtype]
    return t.contiguous().view(view).numpy()


@pytest.mark.compare
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("name", ["plain", "patterns", "fan_in_fan_out", "lora_bias", "embedding", "bias_all"])
def test_merge_equals_peft_merge_and_unload_bit_for_bit(tmp_path: Path, name: str, dtype: str) -> None:
    torch, peft, base, adapter = _setup(tmp_path, name, dtype)
    out = tmp_path / "out.safetensors"
    summary = merge_adapter_file(base, adapter, out)
    expected = _peft_merged(torch, peft, base, adapter, dtype)
    from safetensors.torch import load_file

    got = load_file(str(out))
    original = load_file(str(base))
    assert sorted(got) == sorted(expected)
    changed = 0
    for k in expected:
        assert got[k].dtype == expected[k].dtype == original[k].dtype, k
        np.testing.assert_array_equal(_bits(got[k]), _bits(expected[k]), err_msg=k)
        changed += not torch.equal(got[k], original[k])
    assert changed >= len(summary) > 0  # the merge did something (the test can fail)


@pytest.mark.compare
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", ["dora", "embedding_dora"])
def test_dora_merge_equals_peft_to_rounding(tmp_path: Path, name: str, dtype: str) -> None:
    torch, peft, base, adapter = _setup(tmp_path, name, dtype)
    out = tmp_path / "out.safetensors"
    merge_adapter_file(base, adapter, out)
    expected = _peft_merged(torch, peft, base, adapter, dtype)
    got, original = st.load(out), st.load(base)
    tol = 1e-12 if dtype == "float64" else 4 * np.finfo(np.float32).eps
    for k, v in expected.items():
        assert rel_err(got[k], v.numpy()) <= tol, k
    assert any(rel_err(original[k], v.numpy()) > 1e-3 for k, v in expected.items())


@pytest.mark.compare
def test_scale_matches_peft_scale_layer(tmp_path: Path) -> None:
    torch, peft, base, adapter = _setup(tmp_path, "patterns", "float64")
    out = tmp_path / "out.safetensors"
    summary = merge_adapter_file(base, adapter, out, scale=0.5)
    expected = _peft_merged(torch, peft, base, adapter, "float64", scale=0.5)
    got = st.load(out)
    for k, v in expected.items():
        assert rel_err(got[k], v.numpy()) <= 1e-14, k
    assert {row["module"] for row in summary} == {"layers.0.self_attn.q_proj", "layers.1.self_attn.q_proj",
                                                   "layers.0.self_attn.k_proj", "layers.1.self_attn.k_proj",
                                                   "layers.0.self_attn.o_proj", "layers.1.self_attn.o_proj",
                                                   "layers.0.mlp.down", "layers.1.mlp.down"}


@pytest.mark.compare
@pytest.mark.parametrize("name", ["plain", "fan_in_fan_out", "lora_bias", "embedding"])
def test_unmerge_restores_the_base(tmp_path: Path, name: str) -> None:
    _, _, base, adapter = _setup(tmp_path, name, "float64")
    merge_adapter_file(base, adapter, tmp_path / "m.safetensors")
    merge_adapter_file(tmp_path / "m.safetensors", adapter, tmp_path / "u.safetensors", unmerge=True)
    orig, merged, back = st.load(base), st.load(tmp_path / "m.safetensors"), st.load(tmp_path / "u.safetensors")
    assert any(not np.array_equal(orig[k], merged[k]) for k in orig)
    for k in orig:
        assert rel_err(back[k], orig[k], merged[k]) <= 1e-14, k


# --------------------------------------------------------------------------- bad input


def _small(tmp_path: Path, base_tensors: dict | None = None, **cfg: Any) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    tensors = base_tensors if base_tensors is not None else {
        "fc.weight": rng.standard_normal((3, 4)).astype(np.float32), "fc.bias": np.zeros(3, np.float32),
        "head.weight": rng.standard_normal((2, 3)).astype(np.float32)}
    st.save(tensors, tmp_path / "base.safetensors")
    modules = {"fc": {"A": rng.standard_normal((2, 4)), "B": rng.standard_normal((3, 2))}}
    save_peft_adapter(tmp_path / "ad", modules, r=2, lora_alpha=4, **cfg)
    return tmp_path / "base.safetensors", tmp_path / "ad"


@pytest.mark.parametrize(("tensors", "match"), [
    ({"other.weight": np.zeros((3, 4), np.float32)}, "adapter module 'fc' matches no tensor"),
    ({"fc.weight": np.zeros((5, 3), np.float32)}, r"module 'fc': base tensor 'fc.weight' has shape \(5, 3\)"),
    ({"fc.weight": np.zeros((3, 4), np.int32)}, "dtype I32, which minilora merge cannot handle"),
])
def test_adapter_that_does_not_fit_the_base(tmp_path: Path, tensors: dict, match: str) -> None:
    base, adapter = _small(tmp_path, tensors)
    out = tmp_path / "out.safetensors"
    with pytest.raises(ml.MiniLoraValueError, match=match):
        merge_adapter_file(base, adapter, out)
    assert not out.exists()


def test_failed_write_leaves_out_untouched(tmp_path: Path) -> None:
    base, adapter = _small(tmp_path)
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"previous OUT")
    seen = []

    def boom(name: str) -> None:
        seen.append(name)
        if len(seen) == 2:  # after the header and the first tensor have been written
            raise OSError("disk full (simulated)")

    with pytest.raises(MergeError, match=r"out\.safetensors: cannot write: disk full"):
        merge_adapter_file(base, adapter, out, _on_tensor=boom)
    assert out.read_bytes() == b"previous OUT"
    assert sorted(os.listdir(tmp_path)) == ["ad", "base.safetensors", "out.safetensors"]  # no temp file left


def test_corrupt_base_and_unsupported_unmerge(tmp_path: Path) -> None:
    base, adapter = _small(tmp_path)
    data = base.read_bytes()
    (tmp_path / "short.safetensors").write_bytes(data[:-4])
    with pytest.raises(st.SafetensorsError, match="short.safetensors"):
        merge_adapter_file(tmp_path / "short.safetensors", adapter, tmp_path / "o.safetensors")
    with pytest.raises(MergeError, match="must differ from BASE"):
        merge_adapter_file(base, adapter, base)
    rng = np.random.default_rng(1)
    save_peft_adapter(tmp_path / "dora", {"fc": {"A": rng.standard_normal((2, 4)), "B": rng.standard_normal((3, 2)),
                                                 "m": np.ones(3)}}, r=2, lora_alpha=2, use_dora=True)
    with pytest.raises(MergeError, match="DoRA merge cannot be undone"):
        merge_adapter_file(base, tmp_path / "dora", tmp_path / "o.safetensors", unmerge=True)
    big = {"fc": {"A": np.full((2, 4), 1e30), "B": np.full((3, 2), 1e30)}}
    save_peft_adapter(tmp_path / "big", big, r=2, lora_alpha=2)
    with pytest.raises(ml.NonFiniteError, match="module 'fc'"):
        merge_adapter_file(base, tmp_path / "big", tmp_path / "o.safetensors")
    assert not (tmp_path / "o.safetensors").exists()


# --------------------------------------------------------------------------- the commands


def test_cli_merge_and_inspect(tmp_path: Path, capsys: Any) -> None:
    base, adapter = _small(tmp_path)
    assert cli.main(["merge", str(base), str(adapter), str(tmp_path / "o.safetensors"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [m["module"] for m in report["modules"]] == ["fc"] and report["modules"][0]["scale"] == 2.0
    assert cli.main(["merge", str(base), str(adapter), str(tmp_path / "o2.safetensors"), "--scale", "0"]) == 0
    assert "merged 1 module(s)" in capsys.readouterr().out
    np.testing.assert_array_equal(st.load(tmp_path / "o2.safetensors")["fc.weight"], st.load(base)["fc.weight"])
    assert cli.main(["inspect", str(adapter), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["modules"][0] | {"module": "fc", "rank": 2, "alpha": 4.0, "scale": 2.0, "params": 14} == \
        info["modules"][0]
    assert cli.main(["inspect", str(adapter)]) == 0
    assert "1 module(s), 14 parameters" in capsys.readouterr().out


@pytest.mark.parametrize("args", [["merge", "nope.safetensors", "ad", "o.safetensors"],
                                  ["merge", "base.safetensors", "missing_dir", "o.safetensors"],
                                  ["inspect", "missing_dir"]])
def test_cli_errors_are_one_line(tmp_path: Path, args: list[str]) -> None:
    _small(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "minilora", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("minilora: error:"), proc.stderr
    assert args[1] in lines[0] or args[2] in lines[0]
