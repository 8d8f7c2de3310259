"""``minilora merge`` on real ``transformers`` models (built from tiny configs, random weights) with
adapters made and saved by PEFT, against PEFT's ``merge_and_unload``: GPT-2 Conv1D layers next to a
Linear lm_head, sharded Llama folders with saved embedding layers, BERT sequence classification
(modules_to_save), the hub's prefix-less GPT-2 layout, tied embeddings; output folders loaded back
with ``from_pretrained``."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import peft_modules, rel_err

from minilora.formats import safetensors as st
from minilora.peft.merge import merge_adapter_file, merge_checkpoint
from minilora.peft.merge_plan import MergeError

pytestmark = pytest.mark.compare


def _tf() -> Any:
    torch, peft = peft_modules()
    import transformers

    transformers.logging.set_verbosity_error()
    return torch, peft, transformers


def _gpt2(tf: Any, **kw: Any) -> Any:
    return tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=48, n_positions=8,
                                            bos_token_id=0, eos_token_id=0, **kw))


def _llama(tf: Any, tie: bool = False) -> Any:
    return tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                              num_attention_heads=2, num_key_value_heads=1, vocab_size=48,
                                              tie_word_embeddings=tie, bos_token_id=0, eos_token_id=0,
                                              pad_token_id=0))


def _bits(t: Any) -> np.ndarray:
    import torch

    return t.contiguous().view({torch.bfloat16: torch.int16, torch.float16: torch.int16,
                                torch.float32: torch.int32}[t.dtype]).numpy()


def _setup(tmp: Path, make: Any, config: dict, dtype: str = "float32", shard: str | None = None,
           seed: int = 0) -> tuple[Path, Path]:
    """(base folder, adapter folder): the model saved by save_pretrained in ``dtype`` (sharded with
    ``shard``), a PEFT adapter with random A and B (init_lora_weights=False) saved by PEFT."""
    torch, peft, tf = _tf()
    torch.manual_seed(seed)
    model = make(tf)
    model.to(getattr(torch, dtype)).save_pretrained(tmp / "base", **({"max_shard_size": shard} if shard else {}))
    torch.manual_seed(seed + 1)
    pm = peft.get_peft_model(make(tf), peft.LoraConfig(init_lora_weights=False, **config))
    pm.save_pretrained(tmp / "ad")
    return tmp / "base", tmp / "ad"


def _peft_merged(base: Path, adapter: Path, cls: str, dtype: str) -> Any:
    torch, peft, tf = _tf()
    model = getattr(tf, cls).from_pretrained(base, dtype=getattr(torch, dtype))
    return peft.PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()


def _assert_equal(got: dict, expected: dict, names: Any) -> int:
    changed = 0
    for k in names:
        assert got[k].dtype == expected[k].dtype, k
        np.testing.assert_array_equal(_bits(got[k]), _bits(expected[k]), err_msg=k)
        changed += 1
    return changed


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gpt2_conv1d_and_linear_lm_head_each_get_their_orientation(tmp_path: Path, dtype: str) -> None:
    make = lambda tf: _gpt2(tf, tie_word_embeddings=False)  # noqa: E731
    base, ad = _setup(tmp_path, make, {"r": 4, "lora_alpha": 8, "target_modules": r".*\.attn\.c_proj|lm_head"}, dtype)
    assert json.loads((ad / "adapter_config.json").read_text())["fan_in_fan_out"] is False  # PEFT's last value
    summary = merge_adapter_file(base, ad, tmp_path / "out.safetensors")
    fifo = {r["module"]: r["fan_in_fan_out"] for r in summary}
    assert fifo == {"lm_head": False, "transformer.h.0.attn.c_proj": True, "transformer.h.1.attn.c_proj": True}
    from safetensors.torch import load_file

    got = load_file(str(tmp_path / "out.safetensors"))
    expected = _peft_merged(base, ad, "GPT2LMHeadModel", dtype).state_dict()
    orig = load_file(str(base / "model.safetensors"))
    assert _assert_equal(got, expected, got) == len(orig)
    import torch

    assert not torch.equal(got["transformer.h.0.attn.c_proj.weight"], orig["transformer.h.0.attn.c_proj.weight"])


def test_square_conv1d_name_without_layer_type_is_refused(tmp_path: Path) -> None:
    make = lambda tf: _gpt2(tf, tie_word_embeddings=False)  # noqa: E731
    base, ad = _setup(tmp_path, make, {"r": 4, "target_modules": r".*\.attn\.c_proj|lm_head"})
    (tmp_path / "bare").mkdir()
    shutil.copy(base / "model.safetensors", tmp_path / "bare" / "w.safetensors")  # no config.json beside it
    out = tmp_path / "out.safetensors"
    with pytest.raises(MergeError, match=r"module 'transformer\.h\.0\.attn\.c_proj': cannot tell whether it is a "
                                         "Conv1D"):
        merge_adapter_file(tmp_path / "bare" / "w.safetensors", ad, out)
    assert not out.exists()


def test_hub_gpt2_layout_resolves_the_transformer_prefix(tmp_path: Path) -> None:
    torch, peft, tf = _tf()
    make = lambda tf: _gpt2(tf, tie_word_embeddings=False)  # noqa: E731
    base, ad = _setup(tmp_path, make, {"r": 4, "target_modules": ["c_attn", "c_fc"]})
    full = tf.GPT2LMHeadModel.from_pretrained(base)
    full.transformer.save_pretrained(tmp_path / "hub")  # keys h.0..., as the hub's gpt2 checkpoint
    assert "h.0.attn.c_attn.weight" in st.read_header(tmp_path / "hub" / "model.safetensors")[0]
    merge_adapter_file(tmp_path / "hub", ad, tmp_path / "out.safetensors")
    from safetensors.torch import load_file

    got = load_file(str(tmp_path / "out.safetensors"))
    expected = _peft_merged(base, ad, "GPT2LMHeadModel", "float32").state_dict()
    assert _assert_equal(got, {k.removeprefix("transformer."): v for k, v in expected.items()}, got) == len(got)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_sharded_llama_with_saved_embeddings_to_a_loadable_folder(tmp_path: Path, dtype: str) -> None:
    torch, peft, tf = _tf()
    base, ad = _setup(tmp_path, _llama, {"r": 4, "lora_alpha": 16,
                                         "target_modules": ["embed_tokens", "q_proj", "down_proj", "lm_head"]},
                      dtype, shard="8KB")
    shards = sorted(p.name for p in base.iterdir() if p.suffix == ".safetensors")
    assert len(shards) >= 2
    # the saved base layers are loaded over the base's (a resized or retrained vocabulary travels so)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(ad / "adapter_model.safetensors"))
    for k in [k for k in tensors if k.endswith("base_layer.weight")]:
        tensors[k] = torch.randn_like(tensors[k])
    save_file(tensors, str(ad / "adapter_model.safetensors"), metadata={"format": "pt"})
    (base / "generation_config.json").exists() or (base / "generation_config.json").write_text("{}")
    (base / "tokenizer_config.json").write_text('{"model_max_length": 8}')
    summary = merge_checkpoint(base / "model.safetensors.index.json", ad, tmp_path / "out")
    assert {r["tensor"] for r in summary["replaced"]} == {"model.embed_tokens.weight", "lm_head.weight"}
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".safetensors") == shards
    assert json.loads((out / "model.safetensors.index.json").read_text())["weight_map"] == \
        json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    assert (out / "tokenizer_config.json").read_text() == '{"model_max_length": 8}'
    expected = _peft_merged(base, ad, "LlamaForCausalLM", dtype)
    loaded = tf.LlamaForCausalLM.from_pretrained(out, dtype=getattr(torch, dtype))
    got = loaded.state_dict()
    assert _assert_equal(got, expected.state_dict(), expected.state_dict()) == len(expected.state_dict())
    ids = torch.tensor([[1, 5, 7, 3]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected(ids).logits)


def test_dora_on_llama_within_4_ulp(tmp_path: Path) -> None:
    base, ad = _setup(tmp_path, _llama, {"r": 4, "use_dora": True, "target_modules": ["q_proj", "up_proj"]})
    merge_adapter_file(base, ad, tmp_path / "out.safetensors")
    got = st.load(tmp_path / "out.safetensors")
    expected = _peft_merged(base, ad, "LlamaForCausalLM", "float32").state_dict()
    for k in got:
        assert rel_err(got[k], expected[k].numpy()) <= 4 * np.finfo(np.float32).eps, k


def test_sequence_classification_modules_to_save_are_copied(tmp_path: Path) -> None:
    torch, peft, tf = _tf()

    def make(tf: Any) -> Any:
        return tf.BertForSequenceClassification(tf.BertConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                              num_attention_heads=2, vocab_size=40, num_labels=3))

    base, ad = _setup(tmp_path, make, {"r": 4, "target_modules": ["query", "value"], "task_type": "SEQ_CLS"})
    assert json.loads((ad / "adapter_config.json").read_text())["modules_to_save"]
    summary = merge_checkpoint(base, ad, tmp_path / "out.safetensors")
    assert {r["tensor"] for r in summary["replaced"]} == {"classifier.weight", "classifier.bias"}
    from safetensors.torch import load_file

    got = load_file(str(tmp_path / "out.safetensors"))
    expected = _peft_merged(base, ad, "BertForSequenceClassification", "float32").state_dict()
    assert _assert_equal(got, expected, got) == len(got)
    assert not torch.equal(got["classifier.weight"], load_file(str(base / "model.safetensors"))["classifier.weight"])


def test_tied_lm_head_is_refused_naming_the_tying(tmp_path: Path) -> None:
    base, ad = _setup(tmp_path, lambda tf: _llama(tf, tie=True), {"r": 4, "target_modules": ["q_proj", "lm_head"]})
    with pytest.raises(MergeError, match="module 'lm_head': the base ties it .*tie_word_embeddings"):
        merge_adapter_file(base, ad, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_dtype_cast_of_the_output_folder(tmp_path: Path) -> None:
    torch, peft, tf = _tf()
    base, ad = _setup(tmp_path, _llama, {"r": 4, "target_modules": ["q_proj"]})
    merge_checkpoint(base, ad, tmp_path / "out", dtype="bfloat16")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    got = tf.LlamaForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.bfloat16).state_dict()
    expected = _peft_merged(base, ad, "LlamaForCausalLM", "float32").to(torch.bfloat16).state_dict()
    assert _assert_equal(got, expected, expected) == len(expected)
    assert os.path.getsize(tmp_path / "out" / "model.safetensors") < os.path.getsize(base / "model.safetensors")
