"""``minilora merge`` on more ``transformers`` architectures (tiny configs, random weights, no
download) with PEFT adapters *trained* a few optimizer steps (so B != 0 and modules_to_save hold
trained copies) and saved by PEFT: Mistral, Qwen2 (sharded bfloat16 folder with embed_tokens as a
LoRA target), T5 (seq2seq), RoBERTa sequence classification (modules_to_save), GPT-2 in float16,
Llama at ranks where torch sums the product in two chains. Each merged output equals PEFT's
``merge_and_unload`` key by key, bit for bit, and loaded back with ``from_pretrained`` gives the
same logits."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import peft_modules

import minilora.cli as cli
from minilora.formats import safetensors as st
from minilora.peft.merge import merge_checkpoint

pytestmark = pytest.mark.compare

VOCAB = 48
THREADS = max(2, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def _tf() -> Any:
    torch, peft = peft_modules()
    import transformers

    transformers.logging.set_verbosity_error()
    return torch, peft, transformers


def _bits(t: Any) -> np.ndarray:
    import torch

    return t.contiguous().view({torch.bfloat16: torch.int16, torch.float16: torch.int16,
                                torch.float32: torch.int32}[t.dtype]).numpy()


def _decoder(name: str) -> Any:
    def make(tf: Any) -> Any:
        config = getattr(tf, f"{name}Config")(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                              num_attention_heads=2, num_key_value_heads=1, vocab_size=VOCAB,
                                              tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
                                              pad_token_id=0)
        return getattr(tf, f"{name}ForCausalLM")(config)

    return make


def _t5(tf: Any) -> Any:
    return tf.T5ForConditionalGeneration(tf.T5Config(d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1,
                                                     num_heads=2, vocab_size=VOCAB, decoder_start_token_id=0,
                                                     pad_token_id=0, eos_token_id=1))


def _roberta(tf: Any) -> Any:
    return tf.RobertaForSequenceClassification(tf.RobertaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=VOCAB,
        max_position_embeddings=16, num_labels=3, pad_token_id=1, bos_token_id=0, eos_token_id=2))


def _gpt2(tf: Any) -> Any:
    return tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=8,
                                            bos_token_id=0, eos_token_id=0))


def _batch(torch: Any, kind: str) -> dict:
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(3, VOCAB, (2, 6), generator=gen)
    if kind == "seq_cls":
        return {"input_ids": ids, "labels": torch.tensor([0, 2])}
    if kind == "seq2seq":
        return {"input_ids": ids, "labels": torch.randint(3, VOCAB, (2, 5), generator=gen)}
    return {"input_ids": ids, "labels": ids}


def _setup(tmp: Path, make: Any, config: dict, kind: str = "causal", dtype: str = "float32",
           shard: str | None = None) -> tuple[Path, Path]:
    """(base folder, adapter folder): the model saved by save_pretrained in ``dtype`` (sharded with
    ``shard``), and a PEFT adapter (default init, B = 0) trained 3 Adam steps on random tokens
    (float32), saved by PEFT."""
    torch, peft, tf = _tf()
    torch.manual_seed(0)
    make(tf).to(getattr(torch, dtype)).save_pretrained(tmp / "base", **({"max_shard_size": shard} if shard else {}))
    torch.manual_seed(0)
    pm = peft.get_peft_model(make(tf), peft.LoraConfig(**config))
    opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        pm(**_batch(torch, kind)).loss.backward()
        opt.step()
        opt.zero_grad()
    pm.save_pretrained(tmp / "ad")
    saved = st.load(tmp / "ad" / "adapter_model.safetensors")
    assert any("lora_B" in k or "lora_embedding_B" in k for k in saved)
    assert all(np.any(v != 0) for k, v in saved.items() if "_B" in k)  # trained: no zero B left
    return tmp / "base", tmp / "ad"


def _check(tmp: Path, base: Path, ad: Path, cls: str, dtype: str, kind: str = "causal", src: Path | None = None,
           **kw: Any) -> dict:
    """Merge with minilora into a folder; assert every tensor equals PEFT's merge_and_unload bit for
    bit and the folder, loaded with from_pretrained, gives PEFT's merged logits exactly."""
    torch, peft, tf = _tf()
    summary = merge_checkpoint(src or base, ad, tmp / "out", **kw)
    model = getattr(tf, cls).from_pretrained(base, dtype=getattr(torch, dtype))
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)  # PEFT's merge as a user runs it: torch's default thread count
    try:
        expected = peft.PeftModel.from_pretrained(model, str(ad)).merge_and_unload()
    finally:
        torch.set_num_threads(before)
    want = expected.state_dict()
    got = {}
    for f in sorted((tmp / "out").glob("*.safetensors")):
        from safetensors.torch import load_file

        got.update(load_file(str(f)))
    orig = {}
    for f in sorted(base.glob("*.safetensors")):
        orig.update(st.read_header(f)[0])
    assert sorted(got) == sorted(k for k in orig if k != "__metadata__")
    touched = {r["tensor"] for r in summary["modules"]} | {r["tensor"] for r in summary["replaced"]}
    for k, v in got.items():
        assert v.dtype == want[k].dtype, k
        np.testing.assert_array_equal(_bits(v), _bits(want[k]), err_msg=k)
    assert touched and touched <= set(got)
    assert all(r["bit_equal"] for r in summary["modules"]) and summary["not_bit_equal"] == []
    loaded = getattr(tf, cls).from_pretrained(tmp / "out", dtype=getattr(torch, dtype))
    batch = _batch(torch, kind)
    inputs = {"input_ids": batch["input_ids"]}
    if kind == "seq2seq":
        inputs["decoder_input_ids"] = batch["labels"]
    with torch.no_grad():
        a, b = loaded(**inputs).logits, expected(**inputs).logits
    assert torch.equal(a, b)
    return summary


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_mistral_all_linear(tmp_path: Path, dtype: str) -> None:
    base, ad = _setup(tmp_path, _decoder("Mistral"), {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"},
                      dtype=dtype)
    summary = _check(tmp_path, base, ad, "MistralForCausalLM", dtype)
    assert len(summary["modules"]) == 14  # 7 linear layers x 2 (all-linear leaves lm_head out)


def test_qwen2_sharded_bfloat16_folder_with_embed_tokens_target(tmp_path: Path) -> None:
    base, ad = _setup(tmp_path, _decoder("Qwen2"), {"r": 4, "lora_alpha": 16, "target_modules":
                                                    ["embed_tokens", "q_proj", "v_proj", "down_proj"]},
                      dtype="bfloat16", shard="4KB")
    assert len(list(base.glob("model-*.safetensors"))) >= 2
    summary = _check(tmp_path, base, ad, "Qwen2ForCausalLM", "bfloat16", src=base)  # the folder, not the index
    kinds = {r["module"]: r["kind"] for r in summary["modules"]}
    assert kinds["model.embed_tokens"] == "embedding"
    assert [r["tensor"] for r in summary["replaced"]] == ["model.embed_tokens.weight"]  # save_embedding_layers
    assert sorted(p.name for p in (tmp_path / "out").glob("model-*.safetensors")) == \
        sorted(p.name for p in base.glob("model-*.safetensors"))


def test_t5_seq2seq(tmp_path: Path) -> None:
    base, ad = _setup(tmp_path, _t5, {"r": 4, "lora_alpha": 8, "target_modules": ["q", "v", "wo"],
                                      "task_type": "SEQ_2_SEQ_LM"}, kind="seq2seq")
    summary = _check(tmp_path, base, ad, "T5ForConditionalGeneration", "float32", kind="seq2seq")
    assert {r["tensor"].split(".")[0] for r in summary["modules"]} == {"encoder", "decoder"}


def test_roberta_sequence_classification_copies_the_trained_classifier(tmp_path: Path) -> None:
    base, ad = _setup(tmp_path, _roberta, {"r": 4, "target_modules": ["query", "value"], "task_type": "SEQ_CLS"},
                      kind="seq_cls")
    cfg = json.loads((ad / "adapter_config.json").read_text())
    assert "classifier" in cfg["modules_to_save"]
    summary = _check(tmp_path, base, ad, "RobertaForSequenceClassification", "float32", kind="seq_cls")
    assert {r["tensor"] for r in summary["replaced"]} == {"classifier.dense.weight", "classifier.dense.bias",
                                                           "classifier.out_proj.weight", "classifier.out_proj.bias"}
    trained = st.load(tmp_path / "out" / "model.safetensors")["classifier.out_proj.weight"]
    assert not np.array_equal(trained, st.load(base / "model.safetensors")["classifier.out_proj.weight"])


def test_gpt2_float16_conv1d(tmp_path: Path) -> None:
    base, ad = _setup(tmp_path, _gpt2, {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn", "c_fc"],
                                        "fan_in_fan_out": True}, dtype="float16")
    summary = _check(tmp_path, base, ad, "GPT2LMHeadModel", "float16")
    assert all(r["fan_in_fan_out"] for r in summary["modules"])


@pytest.mark.parametrize("r", [129, 193, 200])
def test_llama_at_ranks_torch_sums_in_one_or_two_chains(tmp_path: Path, r: int) -> None:
    """Ranks 129-192 are one fma chain in torch, 193-384 two (the old 128-term split was wrong)."""
    base, ad = _setup(tmp_path, _decoder("Llama"), {"r": r, "lora_alpha": 16, "target_modules": ["q_proj", "up_proj"]})
    _check(tmp_path, base, ad, "LlamaForCausalLM", "float32")


def test_inspect_accepts_saved_embedding_layers(tmp_path: Path, capsys: Any) -> None:
    base, ad = _setup(tmp_path, _decoder("Llama"), {"r": 4, "target_modules": ["embed_tokens", "lm_head"]})
    assert cli.main(["inspect", str(ad), "--base", str(base), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["base"]["refused"] == []
    assert {r["tensor"] for r in info["base"]["replaced"]} == {"model.embed_tokens.weight", "lm_head.weight"}
    assert {r["module"] for r in info["base"]["merged"]} == {"model.embed_tokens", "lm_head"}
