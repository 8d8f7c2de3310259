"""The parameter and memory calculator: the paper's figures, counts against real arrays, memory
arithmetic, ``minilora params``, and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import minilora as ml
from minilora.errors import MiniLoraTypeError, MiniLoraValueError
from minilora.study.nf4 import nf4_bits_per_param
from minilora.study.param_calc import (
    MODELS,
    PROJECTIONS,
    lora_param_count,
    memory_estimate,
    projection_shapes,
    transformer_param_count,
)

REPO = Path(__file__).resolve().parents[2]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return subprocess.run([sys.executable, "-m", "minilora", *args], check=False, capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=60)


def model_count(model: str, rank: int, targets: tuple[str, ...] = ("q", "v")) -> int:
    m = MODELS[model]
    return lora_param_count(m["d_model"], m["n_layers"], list(targets), rank=rank, d_ff=m["d_ff"])


# ---------------------------------------------------------------- the paper's figures


@pytest.mark.parametrize(("model", "rank", "expected", "paper"), [
    ("roberta-base", 8, 294_912, "0.3M"),        # Table 2
    ("deberta-xxlarge", 16, 4_718_592, "4.7M"),  # Table 2
    ("gpt3-175b", 1, 4_718_592, "4.7M"),         # Table 4
    ("roberta-large", 8, 786_432, "0.8M"),       # Table 2
    ("gpt3-175b", 8, 37_748_736, "37.7M"),       # Table 4
])
def test_paper_figures(model: str, rank: int, expected: int, paper: str) -> None:
    count = model_count(model, rank)
    assert count == expected
    assert f"{count / 1e6:.{len(paper.split('.')[1]) - 1}f}M" == paper  # rounds to the printed figure


def test_the_model_sizes_used() -> None:
    dims = {k: (v["d_model"], v["n_layers"]) for k, v in MODELS.items()}
    assert dims["roberta-base"] == (768, 12)
    assert dims["deberta-xxlarge"] == (1536, 48)
    assert dims["gpt3-175b"] == (12288, 96)


@pytest.mark.parametrize(("model", "paper_millions", "formula"), [
    ("gpt2-medium", 0.35, 393_216),  # Table 3 "0.35M"; the formula gives 0.39M
    ("gpt2-large", 0.77, 737_280),   # Table 3 "0.77M"; the formula gives 0.74M
])
def test_paper_gpt2_figures_do_not_follow_from_the_formula(model: str, paper_millions: float, formula: int) -> None:
    """GPT-2 M/L in Table 3 use r = 4 on Wq, Wv (Appendix D); r (d_in + d_out) per matrix does not
    give the printed 0.35M / 0.77M."""
    count = model_count(model, 4)
    assert count == formula
    assert round(count / 1e6, 2) != paper_millions


@pytest.mark.parametrize(("model", "paper"), [("roberta-base", 125e6), ("gpt3-175b", 175e9), ("gpt2-medium", 354.92e6)])
def test_total_size_is_close_to_the_published_one(model: str, paper: float) -> None:
    """An estimate (embeddings, attention, MLP, norms), within 1% of the published sizes."""
    m = MODELS[model]
    total = transformer_param_count(m["d_model"], m["n_layers"], d_ff=m["d_ff"], vocab=m["vocab"],
                                    positions=m["positions"])
    assert abs(total - paper) / paper < 0.01


# ---------------------------------------------------------------- against real arrays


@given(d=st.integers(1, 24), d_ff=st.integers(1, 40), layers=st.integers(1, 3),
       ranks=st.dictionaries(st.sampled_from(PROJECTIONS), st.integers(1, 5), min_size=1))
def test_count_equals_the_arrays_lora_init_makes(d: int, d_ff: int, layers: int, ranks: dict) -> None:
    shapes = projection_shapes(d, d_ff)
    tree = [{name: ml.lora_init(0, shapes[name][1], shapes[name][0], r) for name, r in ranks.items()}
            for _ in range(layers)]
    assert lora_param_count(d, layers, ranks, d_ff=d_ff) == ml.count_params(tree)


@given(d=st.integers(1, 16), d_ff=st.integers(1, 40), layers=st.integers(1, 3), vocab=st.integers(0, 50),
       positions=st.integers(0, 20))
def test_total_equals_the_arrays_of_a_transformer(d: int, d_ff: int, layers: int, vocab: int, positions: int) -> None:
    layer = {name: ml.dense_init(0, d_in, d_out) for name, (d_out, d_in) in projection_shapes(d, d_ff).items()}
    layer["ln1"] = layer["ln2"] = {"g": np.ones(d), "b": np.zeros(d)}
    model = {"layers": [layer] * layers, "tok": np.zeros((vocab, d)), "pos": np.zeros((positions, d)),
             "ln_f": {"g": np.ones(d), "b": np.zeros(d)}}
    expected = ml.count_params(model)
    assert transformer_param_count(d, layers, d_ff=d_ff, vocab=vocab, positions=positions) == expected


def test_dict_and_list_targets_agree() -> None:
    assert lora_param_count(64, 3, {"q": 4, "v": 4}) == lora_param_count(64, 3, ["q", "v"], rank=4)
    assert lora_param_count(64, 1, {"up": 2}) == 2 * (64 + 256)  # d_ff defaults to 4 d


# ---------------------------------------------------------------- memory


@pytest.mark.parametrize(("dtype", "opt", "b", "ob"), [("float32", "float32", 4, 4), ("bfloat16", "float32", 2, 4),
                                                       ("float16", "float16", 2, 2)])
def test_memory_arithmetic(dtype: str, opt: str, b: int, ob: int) -> None:
    m = memory_estimate(1000, 10, dtype=dtype, optimizer_dtype=opt)
    assert m["full"] == {"weights": 1000 * b, "gradients": 1000 * b, "adam": 2000 * ob, "total": 1000 * (2 * b + 2 * ob)}
    assert m["lora"] == {"weights": 1010 * b, "gradients": 10 * b, "adam": 20 * ob, "total": 1010 * b + 10 * b + 20 * ob}


@pytest.mark.parametrize(("frozen", "double_quant"), [("nf4", False), ("nf4-dq", True)])
def test_memory_with_nf4_frozen_weights(frozen: str, double_quant: bool) -> None:
    m = memory_estimate(64 * 256, 100, frozen=frozen)
    assert m["lora"]["weights"] == 64 * 256 * nf4_bits_per_param(64, double_quant=double_quant) / 8 + 400


# ---------------------------------------------------------------- the command


@pytest.mark.parametrize(("args", "expected"), [
    (["--model", "roberta-base", "--rank", "8"], 294_912),
    (["--model", "deberta-xxlarge", "--rank", "16"], 4_718_592),
    (["--model", "gpt3-175b", "--rank", "1", "--targets", "q", "v"], 4_718_592),
    (["--d-model", "64", "--layers", "2", "--targets", "q=4", "v", "up=2", "--rank", "8"], 2 * (4 * 128 + 8 * 128 + 2 * 320)),
])
def test_command(args: list[str], expected: int) -> None:
    out = run_cli("params", *args)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    assert f"LoRA parameters     {expected:,}" in out.stdout
    report = json.loads(run_cli("params", *args, "--json").stdout)
    assert report["lora_params"] == expected
    assert report["memory_bytes"]["full"]["total"] == 16 * report["total_params"]


def test_command_qlora_memory() -> None:
    report = json.loads(run_cli("params", "--model", "gpt3-175b", "--rank", "4", "--frozen", "nf4-dq",
                                "--dtype", "bfloat16", "--json").stdout)
    expected = report["total_params"] * nf4_bits_per_param(64, double_quant=True) / 8 + 2 * report["lora_params"]
    assert report["memory_bytes"]["lora"]["weights"] == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(("args", "fragment"), [
    ([], "give --model, or --d-model and --layers"),
    (["--d-model", "64"], "give --model"),
    (["--model", "bert-tiny"], "bert-tiny"),
    (["--model", "roberta-base", "--targets", "qq"], "unknown projection 'qq'"),
    (["--model", "roberta-base", "--targets", "q", "q"], "'q' is given twice"),
    (["--model", "roberta-base", "--targets", "q=0"], "must be a positive integer"),
    (["--model", "roberta-base", "--targets", "q=x"], "must be a positive integer"),
    (["--model", "roberta-base", "--rank", "0"], "--rank"),
    (["--model", "roberta-base", "--dtype", "int8"], "int8"),
])
def test_command_bad_arguments(args: list[str], fragment: str) -> None:
    out = run_cli("params", *args)
    assert out.returncode != 0 and out.stdout == "" and "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], out.stderr


# ---------------------------------------------------------------- Python API bad input


@pytest.mark.parametrize(("kwargs", "error", "fragment"), [
    ({"targets": {"q": 0}}, MiniLoraValueError, "the rank of 'q' must be a positive integer; got 0"),
    ({"targets": {"q": -3}}, MiniLoraValueError, "got -3"),
    ({"targets": {"x": 4}}, MiniLoraValueError, "target projection must be one of"),
    ({"targets": {}}, MiniLoraValueError, "at least one projection"),
    ({"targets": ["q", "q"], "rank": 4}, MiniLoraValueError, "given twice"),
    ({"targets": ["q"]}, MiniLoraValueError, "rank is required"),
    ({"targets": "q", "rank": 4}, MiniLoraTypeError, "targets must be a dict"),
])
def test_bad_targets(kwargs: dict, error: type, fragment: str) -> None:
    with pytest.raises(error) as info:
        lora_param_count(64, 2, **kwargs)
    assert fragment in str(info.value)


@pytest.mark.parametrize(("call", "error", "fragment"), [
    (lambda: lora_param_count(0, 2, ["q"], rank=1), MiniLoraValueError, "d_model must be a positive integer"),
    (lambda: lora_param_count(64, 0, ["q"], rank=1), MiniLoraValueError, "n_layers must be a positive integer"),
    (lambda: transformer_param_count(64, 2, vocab=-1), MiniLoraValueError, "vocab must be an integer >= 0"),
    (lambda: memory_estimate(-1, 0), MiniLoraValueError, "total_params must be an integer >= 0"),
    (lambda: memory_estimate(10, 1, dtype="int8"), MiniLoraValueError, "dtype must be one of"),
    (lambda: memory_estimate(10, 1, frozen="int4"), MiniLoraValueError, "frozen must be one of"),
])
def test_bad_sizes(call: Any, error: type, fragment: str) -> None:
    with pytest.raises(error) as info:
        call()
    assert fragment in str(info.value)
