"""Helpers shared by the test folders (imported as ``from helpers import ...``; ``tests/`` is on
``sys.path`` through ``tests/conftest.py``). Test files do not import each other: what two of
them need lives here.

- optional frameworks: ``require`` (skip locally, fail in CI), ``STRICT``
- the command line in a subprocess: ``run_cli``, ``assert_one_line_error``, ``FakeTerminal``
- comparisons: ``rel_err``, ``peft_modules`` (torch and PEFT on one thread)
- the tiny HF-named torch model of the PEFT file tests: ``make_net``, ``peft_adapter``, ``NET_CONFIGS``
- the named-layer models of ``minilora.peft.models`` and their torch twins: ``np_model``,
  ``model_forward``, ``np_input``, ``torch_model``, ``copy_base``
"""

from __future__ import annotations

import importlib
import itertools
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from minilora.peft import models as M

REPO = Path(__file__).resolve().parents[1]  # the folder holding the minilora package
TESTS = Path(__file__).resolve().parent

# ---------------------------------------------------------------- optional frameworks

# CI=true (set by the CI runner) or MINILORA_REQUIRE_ALL=1: a missing framework is a failure.
STRICT = os.environ.get("CI", "").lower() in ("1", "true", "yes") or os.environ.get("MINILORA_REQUIRE_ALL") == "1"


# The frameworks of the `compare` extra. A test that uses one must be marked `compare`, so that
# the core-only loop (`pytest -m "not compare and not slow"`) never needs them; `require` checks
# the mark of the running test (set by the autouse fixture in conftest.py).
COMPARE_FRAMEWORKS = frozenset({"torch", "peft", "loralib", "bitsandbytes", "transformers", "jax", "flax", "optax",
                                "keras", "torchtune", "torchao"})
CURRENT_TEST: list[Any] = []  # the running test item, while one runs


def require(module: str) -> Any:
    """Import an optional framework; skip without it locally, fail without it in CI. A framework
    of the `compare` extra may only be required by a test marked ``@pytest.mark.compare``."""
    top = module.split(".")[0]
    if module == "safetensors.torch" or top in COMPARE_FRAMEWORKS:
        item = CURRENT_TEST[-1] if CURRENT_TEST else None
        if item is not None and item.get_closest_marker("compare") is None:
            pytest.fail(f"{item.nodeid} uses {module} but is not marked @pytest.mark.compare")
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if STRICT:
            pytest.fail(f"{module} is required in CI but could not be imported: {exc}")
        pytest.skip(f"{module} is not installed (pip install -e '.[test,compare]')")


class FakeTerminal:
    """A stream that claims to be a terminal (or not) and records what is written to it, for
    testing progress lines."""

    def __init__(self, tty: bool) -> None:
        self.tty, self.text = tty, ""

    def isatty(self) -> bool:
        return self.tty

    def write(self, s: str) -> None:
        self.text += s

    def flush(self) -> None:
        pass


# ---------------------------------------------------------------- the command line


def run_cli(*args: str, pythonpath_first: Path | None = None, wrapper: str | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    paths = [str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    if pythonpath_first is not None:
        paths.insert(0, str(pythonpath_first))
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.pop("PYTHONSTARTUP", None)
    command = [sys.executable, "-c", wrapper, *args] if wrapper else [sys.executable, "-m", "minilora", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd or REPO, timeout=120)


def assert_one_line_error(out: subprocess.CompletedProcess, *fragments: str) -> str:
    assert out.returncode != 0, out.stdout
    assert "Traceback" not in out.stderr and "Traceback" not in out.stdout, out.stderr
    lines = out.stderr.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0].strip(), f"expected one line on stderr, got {out.stderr!r}"
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


# ---------------------------------------------------------------- comparisons and the PEFT file model

TINY = np.finfo(np.float64).tiny


D, VOCAB = 16, 32  # multiples of 16: shapes whose torch product order minilora reproduces (peft.product)


def rel_err(actual: Any, expected: Any, magnitude: Any = None) -> float:
    a, b = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    ref = max(np.linalg.norm(b), TINY)
    if magnitude is not None:
        ref = max(ref, float(np.linalg.norm(np.asarray(magnitude, np.float64))))
    return float(np.linalg.norm(a - b) / ref)


def peft_modules() -> tuple[Any, Any]:
    """(torch, peft), with torch on one thread (tiny tensors; see test_torch_parity.py)."""
    torch = require("torch")
    peft = require("peft")
    torch.set_num_threads(1)
    return torch, peft


def make_net(torch: Any, seed: int = 0, dtype: Any = None) -> Any:
    """A tiny decoder-shaped model with HF module names: embed_tokens, layers.{0,1}.self_attn.
    {q,k,v,o}_proj, layers.{0,1}.mlp.c_fc (GPT-2 Conv1D, stored (d_in, d_out)), lm_head."""
    from transformers.pytorch_utils import Conv1D

    nn = torch.nn

    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q_proj, self.k_proj = nn.Linear(D, D), nn.Linear(D, D, bias=False)
            self.v_proj, self.o_proj = nn.Linear(D, D), nn.Linear(D, D)

    class Mlp(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c_fc = Conv1D(2 * D, D)  # (nf, nx): weight (D, 2D)
            self.down = nn.Linear(2 * D, D)

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.self_attn, self.mlp = Attn(), Mlp()

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed_tokens = nn.Embedding(VOCAB, D)
            self.layers = nn.ModuleList([Layer(), Layer()])
            self.lm_head = nn.Linear(D, VOCAB, bias=False)

        def forward(self, ids: Any) -> Any:
            h = self.embed_tokens(ids)
            for layer in self.layers:
                a = layer.self_attn
                h = h + a.o_proj(torch.tanh(a.q_proj(h) + a.k_proj(h) + a.v_proj(h)))
                h = h + layer.mlp.down(torch.tanh(layer.mlp.c_fc(h)))
            return self.lm_head(h)

    torch.manual_seed(seed)
    net = Net()
    with torch.no_grad():
        for p in net.parameters():  # Conv1D starts with std 0.02 and zero bias: make every entry count
            p.copy_(torch.randn_like(p) * 0.3)
    return net.to(dtype or torch.float64)


def peft_adapter(torch: Any, peft: Any, net: Any, folder: str, seed: int = 1, **config: Any) -> Any:
    """Wrap ``net`` with a PEFT LoRA adapter of random non-zero factors, save it to ``folder``."""
    cfg = peft.LoraConfig(**config)
    model = peft.get_peft_model(net, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) * 0.5
                        + (1.0 if "magnitude" in name else 0.0))
    model.save_pretrained(folder)
    return model


def base_state(net: Any) -> dict[str, np.ndarray]:
    """The base model's tensors as float64 NumPy arrays, by HF name."""
    return {k: v.detach().double().numpy().copy() for k, v in net.state_dict().items()}


# PEFT configs exercising every field minilora honours (each on the model above)
NET_CONFIGS = {
    "plain": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "patterns": dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "k_proj", "o_proj", "down"],
                     rank_pattern={"layers.1.self_attn.q_proj": 2, "o_proj": 3},
                     alpha_pattern={r"layers\.0\..*k_proj": 5}),
    "regex": dict(r=3, lora_alpha=6, target_modules=r".*\.(q|v)_proj"),
    "fan_in_fan_out": dict(r=3, lora_alpha=4, fan_in_fan_out=True, target_modules=["c_fc"]),
    "dora": dict(r=2, lora_alpha=3, use_dora=True, target_modules=["q_proj", "down", "lm_head"]),
    "lora_bias": dict(r=2, lora_alpha=4, lora_bias=True, target_modules=["v_proj", "o_proj"]),
    "embedding": dict(r=3, lora_alpha=6, target_modules=["embed_tokens", "q_proj"]),
    "embedding_dora": dict(r=2, lora_alpha=2, use_dora=True, target_modules=["embed_tokens"]),
    "bias_all": dict(r=2, lora_alpha=2, bias="all", target_modules=["q_proj"]),
    "bias_lora_only": dict(r=2, lora_alpha=2, bias="lora_only", target_modules=["q_proj", "o_proj"]),
}


# ---------------------------------------------------------------- the named-layer models (minilora.peft.models)

SIZES = (5, 7, 6, 3)


D_MODEL, D_OUT, HEADS = 8, 3, 2


def torch_model(torch: Any, kind: str) -> Any:
    """The torch twin of ``mlp_init``/``attention_init`` as a ``transformers.PreTrainedModel``
    whose output embedding is "head" (so PEFT's "all-linear" leaves it out, as minilora does)."""
    from transformers import PretrainedConfig, PreTrainedModel

    nn = torch.nn

    class Net(PreTrainedModel):
        config_class = PretrainedConfig

        def __init__(self) -> None:
            super().__init__(PretrainedConfig())
            if kind == "mlp":
                self.layers = nn.ModuleList([nn.Linear(a, b) for a, b in itertools.pairwise(SIZES[:-1])])
                self.head = nn.Linear(SIZES[-2], SIZES[-1])
            else:
                self.attn, self.mlp = nn.Module(), nn.Module()
                for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
                    setattr(self.attn, n, nn.Linear(D_MODEL, D_MODEL, bias=n != "k_proj"))
                self.mlp.fc1, self.mlp.fc2 = nn.Linear(D_MODEL, 2 * D_MODEL), nn.Linear(2 * D_MODEL, D_MODEL)
                self.head = nn.Linear(D_MODEL, D_OUT)

        def get_output_embeddings(self) -> Any:
            return self.head

        def forward(self, x: Any) -> Any:
            if kind == "mlp":
                for layer in self.layers:
                    x = torch.tanh(layer(x))
                return self.head(x)
            n, t, d = x.shape
            a = self.attn

            def heads(h: Any) -> Any:
                return h.reshape(n, t, HEADS, d // HEADS).transpose(1, 2)

            q, k, v = heads(a.q_proj(x)), heads(a.k_proj(x)), heads(a.v_proj(x))
            att = torch.softmax(q @ k.transpose(-1, -2) / (d // HEADS) ** 0.5, dim=-1) @ v
            h = x + a.o_proj(att.transpose(1, 2).reshape(n, t, d))
            h = h + self.mlp.fc2(torch.tanh(self.mlp.fc1(h)))
            return self.head(h)

    return Net().double()


def np_model(kind: str, seed: int = 0) -> dict:
    return M.mlp_init(seed, SIZES) if kind == "mlp" else M.attention_init(seed, D_MODEL, D_OUT)


def model_forward(kind: str, params: dict, x: Any, adapters: Any = None) -> Any:
    if kind == "mlp":
        return M.mlp_forward(params, x, adapters)
    return M.attention_forward(params, x, adapters, n_heads=HEADS)


def np_input(kind: str, rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal((4, SIZES[0]) if kind == "mlp" else (2, 3, D_MODEL))


def copy_base(torch: Any, net: Any, params: dict) -> None:
    with torch.no_grad():
        for name, layer in params.items():
            mod = net.get_submodule(name)
            mod.weight.copy_(torch.from_numpy(layer["W"]))
            if "b" in layer:
                mod.bias.copy_(torch.from_numpy(layer["b"]))


# ---------------------------------------------------------------- bad inputs


def expect_error(fn: Any, kind: type[BaseException], *fragments: str) -> BaseException:
    """``fn()`` raises ``kind``, a MiniLoraError (so a ValueError or TypeError of the library, never
    a raw NumPy/Python one), whose message holds every fragment (the argument's name, the value)."""
    from minilora.errors import MiniLoraError

    with pytest.raises(kind) as info:
        fn()
    err = info.value
    assert isinstance(err, MiniLoraError), f"{type(err).__name__} is not a MiniLoraError: {err}"
    message = str(err)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in error message {message!r}"
    return err
