"""Golden vectors: export then verify round-trips, export is deterministic, the documented
plain-Python reader (run verbatim from docs/vectors.md) and the safetensors package read the same
arrays, an independent torch computation meets the stored bounds, and every broken folder gives
one clear line naming the file."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import assert_one_line_error, require, run_cli

import minilora
from minilora.formats.safetensors import load, save
from minilora.testing import round_to
from minilora.testing.vectors import SCHEMA_VERSION, VectorsError, export, verify

ROOT = Path(__file__).resolve().parents[2]
GROUPS = ["forward", "gradients", "merge", "adam", "dora", "embedding", "invalid"]


@pytest.fixture(scope="module")
def vectors(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("golden") / "vectors"
    written = export(folder)
    assert sorted(Path(p).name for p in written) == sorted([f"{g}.safetensors" for g in GROUPS] + ["manifest.json"])
    return folder


def copy_of(vectors: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(vectors, target)
    return target


def manifest_of(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


# --------------------------------------------------------------------------- the round trip


@pytest.mark.slow
def test_export_then_verify_on_the_command_line(tmp_path: Path) -> None:
    folder = tmp_path / "v"
    out = run_cli("vectors", "export", str(folder))
    assert out.returncode == 0 and out.stderr == "", out.stderr
    assert "wrote 8 files" in out.stdout
    out = run_cli("vectors", "verify", str(folder))
    assert out.returncode == 0 and out.stderr == "", out.stderr
    cases = sum(len(g["cases"]) for g in manifest_of(folder)["groups"])
    assert f"all {cases} cases (" in out.stdout and f"in 7 groups agree with minilora {minilora.__version__}" in out.stdout


def test_export_is_deterministic(vectors: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    export(again)
    for path in sorted(vectors.iterdir()):
        assert (again / path.name).read_bytes() == path.read_bytes(), path.name


def test_manifest_describes_every_case(vectors: Path) -> None:
    manifest = manifest_of(vectors)
    assert manifest["schema_version"] == SCHEMA_VERSION == 1
    assert manifest["minilora_version"] == minilora.__version__
    assert [g["name"] for g in manifest["groups"]] == GROUPS
    for name, info in manifest["files"].items():
        data = (vectors / name).read_bytes()
        assert info == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    ids = [c["id"] for g in manifest["groups"] for c in g["cases"]]
    assert len(ids) == len(set(ids))
    for group in manifest["groups"]:
        tensors = load(vectors / group["file"])
        assert group["comment"] and group["cases"]
        for case in group["cases"]:
            assert case["id"].startswith(group["name"] + "/") and case["comment"]
            for key, tensor_name in case["inputs"].items():
                assert list(tensors[tensor_name].shape) == case["shapes"][key]
            if case["expect"] == "error":
                assert group["name"] == "invalid" and case["error"] in ("shape", "non_finite")
                assert case["outputs"] == {}
                continue
            assert case["expect"] == "ok" and case["outputs"]
            for entry in case["outputs"].values():
                expected = tensors[entry["tensor"]]
                # a bound is 0 only where the answer is an exact 0 (a row of A no id selects)
                nonzero = expected != 0
                for dt in ("float64", "float32"):
                    bound = tensors[entry["bound"][dt]]
                    assert bound.shape == expected.shape and np.all(bound[nonzero] > 0) and np.all(bound >= 0)
                assert np.all(tensors[entry["bound"]["float32"]][nonzero] > tensors[entry["bound"]["float64"]][nonzero])
            for tensor_name in case["inputs"].values():  # exact in every float dtype
                value = tensors[tensor_name]
                for dt in ("float16", "bfloat16", "float32"):
                    np.testing.assert_array_equal(round_to(value, dt), value)
    kinds = {c["error"] for c in manifest["groups"][-1]["cases"]}
    assert kinds == {"shape", "non_finite"}


def test_verify_in_process_counts_everything(vectors: Path) -> None:
    report = verify(vectors)
    assert report.passed and report.groups == 7 and report.outputs > report.cases
    assert report.cases == sum(len(g["cases"]) for g in manifest_of(vectors)["groups"])


# --------------------------------------------------------------------------- readers without minilora


def docs_snippet() -> str:
    text = (ROOT / "docs" / "vectors.md").read_text()
    section = text.split("## Reading it without minilora", 1)[1]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1
    return blocks[0]


def test_the_documented_reader_gives_the_same_arrays(vectors: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture) -> None:
    code = docs_snippet()
    assert "minilora" not in code.replace("minilora vectors export", "")  # plain Python and NumPy only
    assert 'FOLDER = "vectors"' in code
    monkeypatch.chdir(vectors.parent)
    namespace: dict[str, Any] = {}
    exec(compile(code, "docs/vectors.md", "exec"), namespace)
    forward_cases = len(manifest_of(vectors)["groups"][0]["cases"])
    assert capsys.readouterr().out.strip() == f"{forward_cases} forward cases agree in float32"
    read = namespace["tensors"]
    assert set(read) == {f"{g}.safetensors" for g in GROUPS}
    for filename, arrays in read.items():
        ours = load(vectors / filename)
        assert set(arrays) == set(ours)
        for name, value in arrays.items():
            assert value.dtype == ours[name].dtype and value.shape == ours[name].shape
            np.testing.assert_array_equal(value.view(np.uint64), ours[name].view(np.uint64))  # NaN-safe


def test_the_safetensors_package_gives_the_same_arrays(vectors: Path) -> None:
    st_numpy = require("safetensors.numpy")
    for group in GROUPS:
        theirs = st_numpy.load_file(str(vectors / f"{group}.safetensors"))
        ours = load(vectors / f"{group}.safetensors")
        assert set(theirs) == set(ours)
        for name in ours:
            np.testing.assert_array_equal(np.asarray(theirs[name]).view(np.uint64), ours[name].view(np.uint64))
    nan_case = load(vectors / "invalid.safetensors")["invalid/merge_nan/A"]
    assert np.isnan(nan_case).sum() == 1


@pytest.mark.compare
def test_torch_meets_the_stored_bounds(vectors: Path) -> None:
    """An independent implementation (torch autograd, float32 and float64) against the vectors."""
    torch = require("torch")
    F = torch.nn.functional
    manifest = manifest_of(vectors)
    group = next(g for g in manifest["groups"] if g["name"] == "gradients")
    t = load(vectors / group["file"])
    for dtype in ("float64", "float32"):
        for case in group["cases"]:
            a = {k: torch.tensor(t[n], dtype=getattr(torch, dtype), requires_grad=k in ("x", "A", "B"))
                 for k, n in case["inputs"].items()}
            o = case["options"]
            W = a["W"].T if o["fan_in_fan_out"] else a["W"]
            xm = a["x"] * a["mask"] if "mask" in a else a["x"]
            y = F.linear(a["x"], W, a.get("b")) + F.linear(F.linear(xm, a["A"]), a["B"]) * o["scale"]
            (y * a["g"]).sum().backward()
            for name, key in (("dx", "x"), ("dA", "A"), ("dB", "B")):
                out = case["outputs"][name]
                err = np.abs(a[key].grad.double().numpy() - t[out["tensor"]])
                assert np.all(err <= t[out["bound"][dtype]]), (case["id"], name, dtype)


# --------------------------------------------------------------------------- broken folders


def rewrite_manifest(folder: Path, change: Any) -> None:
    manifest = manifest_of(folder)
    change(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def truncate(folder: Path) -> None:
    path = folder / "forward.safetensors"
    path.write_bytes(path.read_bytes()[:1000])


def corrupt_header(folder: Path) -> None:
    path = folder / "merge.safetensors"
    data = bytearray(path.read_bytes())
    data[8:12] = b"\x00\xff\x00\xff"
    path.write_bytes(bytes(data))


def flip_a_data_byte(folder: Path) -> None:
    path = folder / "adam.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40
    path.write_bytes(bytes(data))


BROKEN = [
    ("missing manifest", lambda f: (f / "manifest.json").unlink(), "manifest.json: missing"),
    ("manifest not JSON", lambda f: (f / "manifest.json").write_text("{not json"), "manifest.json: not valid JSON"),
    ("other schema version", lambda f: rewrite_manifest(f, lambda m: m.update(schema_version=2)),
     "manifest.json: schema version 2 is not supported: this minilora reads version 1"),
    ("missing file", lambda f: (f / "gradients.safetensors").unlink(),
     "gradients.safetensors: missing (listed in manifest.json)"),
    ("truncated file", truncate, "forward.safetensors: truncated"),
    ("corrupted header", corrupt_header, "merge.safetensors: corrupted header"),
    ("hash mismatch", flip_a_data_byte, "adam.safetensors: SHA-256 mismatch"),
]


@pytest.mark.parametrize(("what", "damage", "message"), BROKEN, ids=[b[0] for b in BROKEN])
def test_a_broken_folder_gives_one_line_naming_the_file(vectors: Path, tmp_path: Path, what: str, damage: Any,
                                                        message: str) -> None:
    folder = copy_of(vectors, tmp_path)
    damage(folder)
    with pytest.raises(VectorsError, match=re.escape(message)):
        verify(folder)
    line = assert_one_line_error(run_cli("vectors", "verify", str(folder)), message)
    assert str(folder) in line


def test_verify_of_a_missing_folder(tmp_path: Path) -> None:
    assert_one_line_error(run_cli("vectors", "verify", str(tmp_path / "nothing")), "no such folder")


def test_export_into_a_missing_parent(tmp_path: Path) -> None:
    assert_one_line_error(run_cli("vectors", "export", str(tmp_path / "a" / "b")), "does not exist")


def test_verify_reports_a_wrong_expected_value(vectors: Path, tmp_path: Path) -> None:
    """A consistent but wrong vector set (values edited, hash updated): verify names the case."""
    folder = copy_of(vectors, tmp_path)
    path = folder / "forward.safetensors"
    tensors = load(path)
    tensors["forward/rslora/out/y"] = tensors["forward/rslora/out/y"] * 1.001
    save(tensors, path, {"minilora_version": minilora.__version__, "group": "forward"})
    data = path.read_bytes()
    rewrite_manifest(folder, lambda m: m["files"]["forward.safetensors"].update(
        sha256=hashlib.sha256(data).hexdigest(), bytes=len(data)))
    report = verify(folder)
    assert len(report.failures) == 1 and report.failures[0].startswith("forward/rslora: y:")
    assert "worst element y[" in report.failures[0]
    out = run_cli("vectors", "verify", str(folder))
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stdout.startswith("FAIL forward/rslora: y:")
    assert_one_line_error(out, "1 of", "disagree with minilora")


def test_verify_reports_an_accepted_invalid_case(vectors: Path, tmp_path: Path) -> None:
    """An 'invalid' case whose inputs were made valid: minilora accepts them, verify says so."""
    folder = copy_of(vectors, tmp_path)
    path = folder / "invalid.safetensors"
    tensors = load(path)
    tensors["invalid/merge_nan/A"] = np.nan_to_num(tensors["invalid/merge_nan/A"])
    save(tensors, path)
    data = path.read_bytes()
    rewrite_manifest(folder, lambda m: m["files"]["invalid.safetensors"].update(
        sha256=hashlib.sha256(data).hexdigest(), bytes=len(data)))
    report = verify(folder)
    assert report.failures == [
        "invalid/merge_nan: minilora accepted it; expected a non_finite error "
        "(A holds a NaN: the merged W would hold NaNs)"
    ]


def test_header_length_is_little_endian(vectors: Path) -> None:
    data = (vectors / "forward.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    assert data[8:9] == b"{" and n % 8 == 0


# --------------------------------------------------------------------------- a set with nothing to check


def _consistent(folder: Path, change: Any) -> Path:
    """The folder with its manifest changed (the hashes still match: only the manifest moved)."""
    rewrite_manifest(folder, change)
    return folder


def _empty_outputs(m: dict) -> None:
    for g in m["groups"]:
        for c in g["cases"]:
            c["outputs"] = {}


def _drop_group(name: str) -> Any:
    def change(m: dict) -> None:
        m["groups"] = [g for g in m["groups"] if g["name"] != name]
    return change


def _empty_group(m: dict) -> None:
    m["groups"][0]["cases"] = []


NOTHING = [
    # refused by the manifest's schema already, naming the field (before verify counts anything)
    ("every case's outputs empty", _empty_outputs, "outputs is empty"),
    ("no groups", lambda m: m.update(groups=[]), "nothing to check: 0 groups"),
    ("invalid group removed", _drop_group("invalid"), "the required group 'invalid' is missing"),
    ("adam group removed", _drop_group("adam"), "the required group 'adam' is missing"),
    ("a group without cases", _empty_group, "group 'forward'"),
]


@pytest.mark.parametrize(("what", "change", "message"), NOTHING, ids=[n[0] for n in NOTHING])
def test_verify_fails_a_set_with_nothing_to_check(vectors: Path, tmp_path: Path, what: str, change: Any,
                                                  message: str) -> None:
    folder = _consistent(copy_of(vectors, tmp_path), change)
    try:
        report = verify(folder)
    except VectorsError as e:
        assert message in str(e), str(e)
        return
    assert not report.passed
    assert any(message in f for f in report.failures), report.failures


@pytest.mark.slow
def test_the_cli_fails_a_set_with_nothing_to_check(vectors: Path, tmp_path: Path) -> None:
    folder = _consistent(copy_of(vectors, tmp_path), _drop_group("invalid"))
    out = run_cli("vectors", "verify", str(folder))
    assert out.returncode == 1 and "Traceback" not in out.stderr and "agree with" not in out.stdout
    assert "the required group 'invalid' is missing" in out.stdout + out.stderr
