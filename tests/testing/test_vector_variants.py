"""The golden vectors' dora and embedding groups: verify recomputes them (a changed expected value
or a dropped group fails), ids that are not integers in range are refused, and an independent
torch implementation meets the stored float32 and float64 bounds."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import require

from minilora.formats.safetensors import load, save
from minilora.testing.vectors import export, verify


@pytest.fixture(scope="module")
def vectors(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("golden") / "vectors"
    export(folder)
    return folder


def _copy(vectors: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(vectors, target)
    return target


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def _group(folder: Path, name: str) -> dict:
    return next(g for g in _manifest(folder)["groups"] if g["name"] == name)


def _rewrite(folder: Path, filename: str, change: dict) -> None:
    """Replace tensors in one file and refresh its hash, so only the numbers are wrong."""
    import hashlib

    tensors = {**load(folder / filename), **change}
    save(tensors, folder / filename, {"group": filename.split(".")[0]})
    m = _manifest(folder)
    data = (folder / filename).read_bytes()
    m["files"][filename] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (folder / "manifest.json").write_text(json.dumps(m))


def test_the_groups_hold_every_operation(vectors: Path) -> None:
    ops = {g: {c["operation"] for c in _group(vectors, g)["cases"]} for g in ("dora", "embedding")}
    assert ops == {"dora": {"dora_dense", "dora_dense_vjp", "dora_merge"},
                   "embedding": {"embedding", "embedding_vjp", "embedding_merge"}}
    vjp = next(c for c in _group(vectors, "dora")["cases"] if c["operation"] == "dora_dense_vjp")
    assert set(vjp["outputs"]) == {"dx", "dA", "dB", "dm"}
    t = load(vectors / "dora.safetensors")
    for case in _group(vectors, "dora")["cases"]:  # the magnitude is off the row norm: c != 1
        if case["operation"] == "dora_merge":
            W, A, B, m = (t[case["inputs"][k]] for k in ("W", "A", "B", "m"))
            W = W.T if case["options"]["fan_in_fan_out"] else W
            c = m / np.linalg.norm(W + case["options"]["scale"] * B @ A, axis=1)
            assert np.max(np.abs(c - 1)) > 0.1, case["id"]


@pytest.mark.parametrize(("filename", "output"), [("dora.safetensors", "dm"), ("embedding.safetensors", "y")])
def test_verify_fails_a_changed_expected_value(vectors: Path, tmp_path: Path, filename: str, output: str) -> None:
    folder = _copy(vectors, tmp_path)
    group = _group(folder, filename.split(".")[0])
    case = next(c for c in group["cases"] if output in c["outputs"])
    name = case["outputs"][output]["tensor"]
    value = load(folder / filename)[name].copy()
    value.reshape(-1)[0] *= 1.0001  # far beyond the float64 bound
    _rewrite(folder, filename, {name: value})
    report = verify(folder)
    assert not report.passed and any(f.startswith(case["id"] + ":") for f in report.failures), report.failures


def test_verify_fails_a_set_without_the_variant_groups(vectors: Path, tmp_path: Path) -> None:
    folder = _copy(vectors, tmp_path)
    m = _manifest(folder)
    m["groups"] = [g for g in m["groups"] if g["name"] != "dora"]
    (folder / "manifest.json").write_text(json.dumps(m))
    report = verify(folder)
    assert not report.passed and any("the required group 'dora' is missing" in f for f in report.failures)


def test_ids_must_be_integers_in_range(vectors: Path, tmp_path: Path) -> None:
    folder = _copy(vectors, tmp_path)
    case = next(c for c in _group(folder, "embedding")["cases"] if c["operation"] == "embedding")
    name = case["inputs"]["ids"]
    ids = load(folder / "embedding.safetensors")[name].copy()
    ids.reshape(-1)[0] = 0.5
    _rewrite(folder, "embedding.safetensors", {name: ids})
    report = verify(folder)  # a failure of that case, naming it, not a crash
    assert not report.passed
    assert any(f.startswith(case["id"] + ":") and "ids must be integers in [0, 6)" in f for f in report.failures)


@pytest.mark.compare
def test_torch_meets_the_stored_variant_bounds(vectors: Path) -> None:
    """DoRA and the LoRA embedding written in torch from the documented formulas, in float32 and
    float64, against every case of both groups."""
    torch = require("torch")
    F = torch.nn.functional
    for gname in ("dora", "embedding"):
        t = load(vectors / f"{gname}.safetensors")
        for dtype in ("float64", "float32"):
            dt = getattr(torch, dtype)
            for case in _group(vectors, gname)["cases"]:
                op, o = case["operation"], case["options"]
                a = {k: torch.tensor(t[n], dtype=dt, requires_grad=k in ("x", "A", "B", "m"))
                     for k, n in case["inputs"].items() if k != "ids"}
                s = o["scale"]
                if gname == "dora":
                    W = a["W"].T if o["fan_in_fan_out"] else a["W"]
                    n = torch.linalg.norm(W + s * a["B"] @ a["A"], dim=1).detach()
                    c = a["m"] / n
                    if op == "dora_merge":
                        merged = c[:, None] * (W + s * a["B"] @ a["A"])
                        got = {"W": merged.T if o["fan_in_fan_out"] else merged}
                    else:
                        xm = a["x"] * a["mask"] if "mask" in a else a["x"]
                        y = (F.linear(a["x"], W) + (c - 1) * F.linear(xm, W)
                             + c * s * F.linear(F.linear(xm, a["A"]), a["B"]))
                        y = y + a["b"] if "b" in a else y
                        got = {"y": y}
                        if op == "dora_dense_vjp":
                            (y * a["g"]).sum().backward()
                            got = {"dx": a["x"].grad, "dA": a["A"].grad, "dB": a["B"].grad, "dm": a["m"].grad}
                else:
                    if op == "embedding_merge":
                        got = {"W": a["W"] + s * (a["B"] @ a["A"]).T}
                    else:
                        ids = torch.from_numpy(t[case["inputs"]["ids"]].astype(np.int64))
                        y = F.embedding(ids, a["W"]) + s * F.embedding(ids, a["A"].T) @ a["B"].T
                        got = {"y": y}
                        if op == "embedding_vjp":
                            (y * a["g"]).sum().backward()
                            got = {"dA": a["A"].grad, "dB": a["B"].grad}
                for name, out in case["outputs"].items():
                    err = np.abs(got[name].detach().double().numpy() - t[out["tensor"]])
                    assert np.all(err <= t[out["bound"][dtype]]), (case["id"], name, dtype)
