"""PEFT's LoRA variants against real PEFT, one layer at a time, float64 on random shapes:
DoRA (with and without dropout, fan_in_fan_out), lora_bias, the embedding layer (plain and DoRA):
forward and every gradient; merges; the PiSSA / OLoRA / orthogonal inits; LoRA+ steps.

Tolerances as in test_torch_parity.py: norm-wise relative error against a magnitude reference;
1e-10 for float64 computations (observed ~1e-15). PEFT computes the SVD/QR inits in float32
(it refuses float64 weights), so those compare at float32 level: the products B A and the
residual base to 1e-5 relative to ||W|| (float32 SVD/QR of well-conditioned random matrices
is accurate to a few 1e-7), factors up to the sign of each singular/QR component.
"""

from __future__ import annotations

from typing import Any

import autograd.numpy as anp
import numpy as np
import pytest
from helpers import peft_modules, rel_err

import minilora as ml
from minilora import variants as V
from minilora.variants.loraplus import adam_step_lrs, loraplus_lrs

SHAPES = [(5, 7, 2), (9, 4, 3), (16, 16, 4)]  # (d_in, d_out, r)


def _layer(torch: Any, peft: Any, d_in: int, d_out: int, fif: bool = False, seed: int = 0, **config: Any) -> Any:
    """A PEFT-wrapped single layer ``fc`` (nn.Linear, or GPT-2 Conv1D for fan_in_fan_out), random
    non-zero adapter. Returns (model, lora layer)."""
    from transformers.pytorch_utils import Conv1D

    nn = torch.nn
    torch.manual_seed(seed)

    class One(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = Conv1D(d_out, d_in) if fif else nn.Linear(d_in, d_out)

        def forward(self, x: Any) -> Any:
            return self.fc(x)

    net = One().double()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p))
    model = peft.get_peft_model(net, peft.LoraConfig(target_modules=["fc"], fan_in_fan_out=fif, **config))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p) * 0.5 + (2.0 if "magnitude" in n else 0.0))
    return model, model.base_model.model.fc


def _np(t: Any) -> np.ndarray:
    return t.detach().numpy().copy()



@pytest.mark.compare
@pytest.mark.parametrize("fif", [False, True])
@pytest.mark.parametrize("dropout", [False, True])
@pytest.mark.parametrize(("d_in", "d_out", "r"), SHAPES)
def test_dora_forward_and_gradients_match_peft(d_in: int, d_out: int, r: int, dropout: bool, fif: bool) -> None:
    torch, peft = peft_modules()
    model, layer = _layer(torch, peft, d_in, d_out, fif, seed=d_in + r, r=r, lora_alpha=2 * r + 1, use_dora=True,
                          lora_dropout=0.1 if dropout else 0.0)
    rng = np.random.default_rng(d_out)
    x = rng.standard_normal((3, 2, d_in))
    g = rng.standard_normal((3, 2, d_out))
    mask = (rng.random(x.shape) > 0.3) / 0.7 if dropout else None
    if dropout:
        class Mask(torch.nn.Module):
            def forward(self, z: Any) -> Any:
                return z * torch.from_numpy(mask)
        layer.lora_dropout["default"] = Mask()
        model.train()
    xt = torch.from_numpy(x).requires_grad_(True)
    y = model(xt)
    (y * torch.from_numpy(g)).sum().backward()
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    m = layer.lora_magnitude_vector["default"].weight
    base = {"W": _np(layer.base_layer.weight), "b": _np(layer.base_layer.bias)}
    lora = {"A": _np(A), "B": _np(B)}
    s = layer.scaling["default"]

    def f(x_: Any, lora_: Any, m_: Any) -> Any:
        return anp.sum(V.dora_dense(base, lora_, m_, x_, scale=s, fan_in_fan_out=fif, dropout_mask=mask) * g)

    ours_y = V.dora_dense(base, lora, _np(m), x, scale=s, fan_in_fan_out=fif, dropout_mask=mask)
    assert rel_err(ours_y, _np(y)) <= 1e-10
    gx, gl, gm = ml.grad(f, (0, 1, 2))(x, lora, _np(m))
    assert rel_err(gx, _np(xt.grad)) <= 1e-10
    assert rel_err(gl["A"], _np(A.grad)) <= 1e-10
    assert rel_err(gl["B"], _np(B.grad)) <= 1e-10
    assert rel_err(gm, _np(m.grad)) <= 1e-10
    # the magnitude PEFT initialises is ||W + s B A||_row of its own (random) init: check the formula
    assert rel_err(V.dora_magnitude(base, lora, scale=s, fan_in_fan_out=fif),
                   _np(layer.lora_magnitude_vector["default"].get_weight_norm(
                       layer.base_layer.weight, (B @ A).detach(), s))) <= 1e-12
    # merge: PEFT's merged weight, and our unmerge returns to the base
    merged, norm = V.dora_merge(base, lora, _np(m), scale=s, fan_in_fan_out=fif)
    layer.merge()
    assert rel_err(merged["W"], _np(layer.base_layer.weight)) <= 1e-12
    back = V.dora_unmerge(merged, lora, _np(m), norm, scale=s, fan_in_fan_out=fif)
    assert rel_err(back["W"], base["W"]) <= 1e-12


def test_new_primitives_by_finite_differences() -> None:
    """Forward and reverse derivatives against central differences, where they are true
    derivatives: DoRA's norm is detached by design, so W, A and B (which enter the norm) are
    checked with m absent (embedding) or against PEFT above (dora_linear)."""
    from autograd.test_util import check_grads

    from minilora.variants import primitives

    rng = np.random.default_rng(0)
    x, W, b = rng.standard_normal((3, 4)), rng.standard_normal((5, 4)), rng.standard_normal(5)
    A, B, m = rng.standard_normal((2, 4)), rng.standard_normal((5, 2)), rng.random(5) + 1
    mask = (rng.random((3, 4)) > 0.5) * 2.0
    for fif in (False, True):
        Wf = W.T if fif else W
        check_grads(lambda x_, b_, m_, k_, Wf=Wf, fif=fif: primitives.dora_linear(x_, Wf, b_, A, B, m_, k_, scale=1.5,
                                                                               fan_in_fan_out=fif),
                    modes=["fwd", "rev"], order=1)(x, b, m, mask)
    ids = np.array([[1, 3], [3, 0]])
    Ae, Be, We = rng.standard_normal((2, 6)), rng.standard_normal((4, 2)), rng.standard_normal((6, 4))
    check_grads(lambda w_, a_, b_: primitives.lora_embedding(ids, w_, a_, b_, scale=0.7), modes=["fwd", "rev"],
                order=1)(We, Ae, Be)
    check_grads(lambda m_: primitives.lora_embedding(ids, We, Ae, Be, m_, scale=0.7), modes=["fwd", "rev"],
                order=1)(rng.random(4) + 1)


@pytest.mark.compare
@pytest.mark.parametrize(("d_in", "d_out", "r"), SHAPES)
def test_lora_bias_matches_peft(d_in: int, d_out: int, r: int) -> None:
    torch, peft = peft_modules()
    model, layer = _layer(torch, peft, d_in, d_out, r=r, lora_alpha=3, lora_bias=True)
    rng = np.random.default_rng(r)
    x, g = rng.standard_normal((4, d_in)), rng.standard_normal((4, d_out))
    xt = torch.from_numpy(x)
    y = model(xt)
    (y * torch.from_numpy(g)).sum().backward()
    base = {"W": _np(layer.base_layer.weight), "b": _np(layer.base_layer.bias)}
    lB = layer.lora_B["default"]
    lora = {"A": _np(layer.lora_A["default"].weight), "B": _np(lB.weight), "bias": _np(lB.bias)}
    s = layer.scaling["default"]
    assert rel_err(V.lora_bias_dense(base, lora, x, scale=s), _np(y)) <= 1e-10
    gl = ml.grad(lambda l_: anp.sum(V.lora_bias_dense(base, l_, x, scale=s) * g))(lora)
    assert rel_err(gl["bias"], _np(lB.bias.grad)) <= 1e-10
    assert rel_err(gl["B"], _np(lB.weight.grad)) <= 1e-10
    merged = V.lora_bias_merge(base, lora, scale=s)
    layer.merge()
    assert rel_err(merged["b"], _np(layer.base_layer.bias)) <= 1e-12
    assert rel_err(merged["W"], _np(layer.base_layer.weight)) <= 1e-12


@pytest.mark.compare
@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize(("num", "dim", "r"), [(10, 6, 2), (7, 12, 3)])
def test_embedding_matches_peft(num: int, dim: int, r: int, dora: bool) -> None:
    torch, peft = peft_modules()
    nn = torch.nn
    torch.manual_seed(num)

    class Emb(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(num, dim)

        def forward(self, ids: Any) -> Any:
            return self.emb(ids)

    model = peft.get_peft_model(Emb().double(), peft.LoraConfig(target_modules=["emb"], r=r, lora_alpha=5,
                                                                 use_dora=dora))
    layer = model.base_model.model.emb
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p) * 0.5 + (2.0 if "magnitude" in n else 0.0))
    rng = np.random.default_rng(dim)
    ids = rng.integers(0, num, size=(3, 4))
    g = rng.standard_normal((3, 4, dim))
    y = model(torch.from_numpy(ids))
    (y * torch.from_numpy(g)).sum().backward()
    Ae, Be = layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]
    base = {"W": _np(layer.base_layer.weight)}
    lora = {"A": _np(Ae), "B": _np(Be)}
    m = _np(layer.lora_magnitude_vector["default"].weight) if dora else None
    s = layer.scaling["default"]
    assert rel_err(V.lora_embedding(base, lora, ids, scale=s, magnitude=m), _np(y)) <= 1e-10
    if dora:
        gl, gm = ml.grad(lambda l_, m_: anp.sum(V.lora_embedding(base, l_, ids, scale=s, magnitude=m_) * g),
                         (0, 1))(lora, m)
        assert rel_err(gm, _np(layer.lora_magnitude_vector["default"].weight.grad)) <= 1e-10
    else:
        gl = ml.grad(lambda l_: anp.sum(V.lora_embedding(base, l_, ids, scale=s) * g))(lora)
    assert rel_err(gl["A"], _np(Ae.grad)) <= 1e-10
    assert rel_err(gl["B"], _np(Be.grad)) <= 1e-10
    merged = V.embedding_merge(base, lora, scale=s, magnitude=m)
    layer.merge()
    assert rel_err(merged["W"], _np(layer.base_layer.weight)) <= 1e-12
    if not dora:
        assert rel_err(V.embedding_unmerge(merged, lora, scale=s)["W"], base["W"]) <= 1e-12
    init = V.embedding_lora_init(0, num, dim, r)
    assert init["A"].shape == Ae.shape and not init["A"].any() and init["B"].shape == Be.shape


def _align(ours: np.ndarray, theirs: np.ndarray, axis: int) -> np.ndarray:
    """ours with each component (row for axis=0, column for axis=1) sign-flipped to match theirs."""
    dots = np.sum(ours * theirs, axis=1 - axis)
    signs = np.where(dots < 0, -1.0, 1.0)
    return ours * (signs[:, None] if axis == 0 else signs[None, :])


@pytest.mark.compare
@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora"])
@pytest.mark.parametrize(("d_in", "d_out", "r"), SHAPES)
def test_svd_and_qr_inits_match_peft(d_in: int, d_out: int, r: int, init: str) -> None:
    torch, peft = peft_modules()
    from transformers.pytorch_utils import Conv1D  # noqa: F401  (same import cost as the others)

    nn = torch.nn
    torch.manual_seed(d_in)
    net = nn.Sequential()
    net.add_module("fc", nn.Linear(d_in, d_out))
    with torch.no_grad():
        W0 = torch.randn(d_out, d_in)
        if init.startswith("pissa_niter"):  # exactly rank r: the randomized SVD is then exact too
            W0 = torch.randn(d_out, r) @ torch.randn(r, d_in)
        net.fc.weight.copy_(W0)
    model = peft.get_peft_model(net, peft.LoraConfig(target_modules=["fc"], r=r, lora_alpha=2 * r,
                                                     init_lora_weights=init))
    layer = model.base_model.model.fc
    s = layer.scaling["default"]
    W = W0.double().numpy()
    if init == "olora":
        lora, res = V.olora_init(W, r, scale=s)
    else:
        lora, res = V.pissa_init(W, r, scale=s, niter=4 if "niter" in init else None, rng=0)
    A_p, B_p = _np(layer.lora_A["default"].weight), _np(layer.lora_B["default"].weight)
    tol = 1e-5
    assert rel_err(res, _np(layer.base_layer.weight), W) <= tol
    assert rel_err(s * lora["B"] @ lora["A"], s * B_p @ A_p, W) <= tol
    assert rel_err(res + s * lora["B"] @ lora["A"], W) <= 1e-12  # base + adapter = the original W
    if "niter" not in init:  # the factors themselves, up to each component's sign
        assert rel_err(_align(lora["A"], A_p, 0), A_p) <= tol
        assert rel_err(_align(lora["B"], B_p, 1), B_p) <= tol


@pytest.mark.compare
def test_orthogonal_init_replays_peft_draws() -> None:
    torch, peft = peft_modules()
    model, layer = _layer(torch, peft, 6, 5, r=4, lora_alpha=4, init_lora_weights="orthogonal")
    torch.manual_seed(11)
    layer.orthogonal_init("default")
    torch.manual_seed(11)
    normals = (torch.randn(4, 4).numpy(), torch.randn(6, 2).numpy(), torch.randn(2, 5).numpy())
    W = _np(layer.base_layer.weight)
    lora, res = V.orthogonal_init(W, 4, normals=normals)
    A_p, B_p = _np(layer.lora_A["default"].weight), _np(layer.lora_B["default"].weight)
    assert rel_err(lora["A"], A_p) <= 1e-6 and rel_err(lora["B"], B_p) <= 1e-6  # PEFT: float32 QR
    assert np.array_equal(res, W)
    assert np.abs(lora["B"] @ lora["A"]).max() <= 1e-14 * np.abs(lora["B"]).max() * np.abs(lora["A"]).max() * 10
    with pytest.raises(ml.MiniLoraValueError, match="even rank"):
        V.orthogonal_init(W, 3, rng=0)


@pytest.mark.compare
def test_loraplus_steps_match_peft_create_loraplus_optimizer() -> None:
    torch, peft = peft_modules()
    from peft.optimizers import create_loraplus_optimizer

    nn = torch.nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.fc = nn.Embedding(8, 5), nn.Linear(5, 3)

    torch.manual_seed(0)
    model = peft.get_peft_model(Net().double(), peft.LoraConfig(target_modules=["emb", "fc"], r=2, lora_alpha=2,
                                                                 use_dora=True))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p))
    opt = create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-2, loraplus_lr_ratio=16,
                                    loraplus_weight_decay=0.05, loraplus_lr_embedding=1e-3)
    fc, emb = model.base_model.model.fc, model.base_model.model.emb
    handles = {"fc": {"A": fc.lora_A["default"].weight, "B": fc.lora_B["default"].weight,
                      "m": fc.lora_magnitude_vector["default"].weight},
               "emb": {"A": emb.lora_embedding_A["default"], "B": emb.lora_embedding_B["default"],
                       "m": emb.lora_magnitude_vector["default"].weight}}
    params = {k: {n: _np(p) for n, p in d.items()} for k, d in handles.items()}
    lrs, wds = loraplus_lrs(params, 1e-2, 16, lr_embedding=1e-3, weight_decay=0.05, embeddings={"emb"})
    assert lrs["fc"] == {"A": 1e-2, "B": 0.16, "m": 0.16} and lrs["emb"]["B"] == 1e-3
    state = ml.adam_init(params)
    rng = np.random.default_rng(0)
    for _ in range(3):
        grads = {k: {n: rng.standard_normal(p.shape) for n, p in d.items()} for k, d in params.items()}
        for k, d in handles.items():
            for n, p in d.items():
                p.grad = torch.from_numpy(grads[k][n].copy())
        opt.step()
        params, state = adam_step_lrs(params, grads, state, lrs=lrs, weight_decays=wds, decoupled=True)
    for k, d in handles.items():
        for n, p in d.items():
            assert rel_err(params[k][n], _np(p)) <= 1e-12, (k, n)
