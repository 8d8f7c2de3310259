"""A golden-vector manifest is validated before use: each malformed field is a VectorsError that
names the manifest and the field, and fuzzed manifests (and fuzzed tensors with a matching
SHA-256) let nothing but the library's errors escape ``verify``, each example within a deadline."""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import assert_one_line_error, run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minilora.errors import MiniLoraError
from minilora.formats.safetensors import load_bytes, save
from minilora.testing.vectors import VectorsError, export, verify


@pytest.fixture(scope="module")
def vectors(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("schema") / "vectors"
    export(folder)
    return folder


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def _copy(vectors: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "v"
    shutil.copytree(vectors, folder)
    return folder


def _case(m: dict, group: str, i: int = 0) -> dict:
    return next(g for g in m["groups"] if g["name"] == group)["cases"][i]


# each: (what, the change to a good manifest, the field the error must name)
MALFORMED: list[tuple[str, Any, str]] = [
    ("cases of numbers", lambda m: m["groups"][0].update(cases=[1]), "groups[0].cases[0]"),
    ("cases not a list", lambda m: m["groups"][1].update(cases={"a": 1}), "groups[1].cases"),
    ("no cases", lambda m: m["groups"][1].pop("cases"), "groups[1].cases"),
    ("a group of a string", lambda m: m["groups"].__setitem__(0, "forward"), "groups[0]"),
    ("a group's file unlisted", lambda m: m["groups"][0].update(file="other.safetensors"), "groups[0].file"),
    ("a group's file a list", lambda m: m["groups"][0].update(file=["x"]), "groups[0].file"),
    ("sha256 not hex", lambda m: m["files"]["forward.safetensors"].update(sha256="zz"), "files.forward.safetensors.sha256"),
    ("bytes negative", lambda m: m["files"]["forward.safetensors"].update(bytes=-1), "files.forward.safetensors.bytes"),
    ("a file entry of a number", lambda m: m["files"].update({"forward.safetensors": 3}), "files.forward.safetensors"),
    ("an unknown operation", lambda m: _case(m, "forward").update(operation="fold"), "groups[0].cases[0].operation"),
    ("an operation of null", lambda m: _case(m, "forward").update(operation=None), "groups[0].cases[0].operation"),
    ("no id", lambda m: _case(m, "forward").pop("id"), "groups[0].cases[0].id"),
    ("inputs a list", lambda m: _case(m, "forward").update(inputs=["x"]), "groups[0].cases[0].inputs"),
    ("an input name a number", lambda m: _case(m, "forward")["inputs"].update(x=3), "groups[0].cases[0].inputs.x"),
    ("a needed input missing", lambda m: _case(m, "forward")["inputs"].pop("W"), "groups[0].cases[0].inputs"),
    ("an input the operation does not take", lambda m: _case(m, "merge")["inputs"].update(z="a"),
     "groups[2].cases[0].inputs"),
    ("options a string", lambda m: _case(m, "forward").update(options="fast"), "groups[0].cases[0].options"),
    ("scale a string", lambda m: _case(m, "forward")["options"].update(scale="2"), "groups[0].cases[0].options.scale"),
    ("scale a bool", lambda m: _case(m, "forward")["options"].update(scale=True), "groups[0].cases[0].options.scale"),
    ("scale infinite", lambda m: _case(m, "forward")["options"].update(scale=float("inf")),
     "groups[0].cases[0].options.scale"),
    ("scale a huge integer", lambda m: _case(m, "forward")["options"].update(scale=10**400),
     "groups[0].cases[0].options.scale"),
    ("fan_in_fan_out a string", lambda m: _case(m, "forward")["options"].update(fan_in_fan_out="no"),
     "groups[0].cases[0].options.fan_in_fan_out"),
    ("shapes a number", lambda m: _case(m, "forward").update(shapes=3), "groups[0].cases[0].shapes"),
    ("a shape of strings", lambda m: _case(m, "forward")["shapes"].update(x=["a"]), "groups[0].cases[0].shapes.x[0]"),
    ("a shape of 65 dimensions", lambda m: _case(m, "forward")["shapes"].update(x=[1] * 65),
     "groups[0].cases[0].shapes.x"),
    ("outputs a list", lambda m: _case(m, "forward").update(outputs=[]), "groups[0].cases[0].outputs"),
    ("an ok case without outputs", lambda m: _case(m, "forward").update(outputs={}), "groups[0].cases[0].outputs"),
    ("an output the operation lacks", lambda m: _case(m, "forward")["outputs"].update(z={}),
     "groups[0].cases[0].outputs.z"),
    ("an output without tensor", lambda m: _case(m, "forward")["outputs"]["y"].pop("tensor"),
     "groups[0].cases[0].outputs.y.tensor"),
    ("a bound without float64", lambda m: _case(m, "forward")["outputs"]["y"]["bound"].pop("float64"),
     "groups[0].cases[0].outputs.y.bound"),
    ("a bound a string", lambda m: _case(m, "forward")["outputs"]["y"].update(bound="x"),
     "groups[0].cases[0].outputs.y.bound"),
    ("expect unknown", lambda m: _case(m, "forward").update(expect="maybe"), "groups[0].cases[0].expect"),
    ("an unknown error kind", lambda m: _case(m, "invalid").update(error="boom"), "groups[6].cases[0].error"),
    ("adam steps a string", lambda m: _case(m, "adam")["options"].update(steps="5"), "groups[3].cases[0].options.steps"),
    ("adam steps huge", lambda m: _case(m, "adam")["options"].update(steps=10**12), "groups[3].cases[0].options.steps"),
    ("adam steps beyond its gradients", lambda m: _case(m, "adam")["options"].update(steps=50),
     "groups[3].cases[0].inputs"),
    ("adam lr negative", lambda m: _case(m, "adam")["options"].update(lr=-1), "groups[3].cases[0].options.lr"),
    ("adam betas of three", lambda m: _case(m, "adam")["options"].update(betas=[0.9, 0.9, 0.9]),
     "groups[3].cases[0].options.betas"),
    ("adam beta of 1", lambda m: _case(m, "adam")["options"].update(betas=[1.0, 0.9]),
     "groups[3].cases[0].options.betas[0]"),
    ("adam amsgrad a string", lambda m: _case(m, "adam")["options"].update(amsgrad="false"),
     "groups[3].cases[0].options.amsgrad"),
]


@pytest.mark.parametrize(("what", "change", "field"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_a_malformed_manifest_names_the_field(vectors: Path, tmp_path: Path, what: str, change: Any,
                                              field: str) -> None:
    folder = _copy(vectors, tmp_path)
    m = _manifest(folder)
    change(m)
    (folder / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(VectorsError) as info:
        verify(folder)
    message = str(info.value)
    assert "manifest.json" in message and field in message, message


def test_the_group_order_of_the_field_names_is_the_exported_one(vectors: Path) -> None:
    assert [g["name"] for g in _manifest(vectors)["groups"]] == ["forward", "gradients", "merge", "adam", "dora",
                                                                 "embedding", "invalid"]


def test_a_missing_amsgrad_option_takes_its_default(vectors: Path, tmp_path: Path) -> None:
    """Adam options may be left out (they default as in adam_kwargs); this used to be a KeyError."""
    folder = _copy(vectors, tmp_path)
    m = _manifest(folder)
    case = _case(m, "adam")
    assert case["options"]["amsgrad"] is False
    del case["options"]["amsgrad"]
    (folder / "manifest.json").write_text(json.dumps(m))
    assert verify(folder).passed


def test_a_deeply_nested_manifest_is_a_clear_error(vectors: Path, tmp_path: Path) -> None:
    folder = _copy(vectors, tmp_path)
    (folder / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(VectorsError, match="manifest.json: not valid JSON"):
        verify(folder)


@pytest.mark.slow
def test_a_malformed_manifest_is_one_line_on_the_command_line(vectors: Path, tmp_path: Path) -> None:
    folder = _copy(vectors, tmp_path)
    m = _manifest(folder)
    m["groups"][0]["cases"] = [1]
    (folder / "manifest.json").write_text(json.dumps(m))
    assert_one_line_error(run_cli("vectors", "verify", str(folder)), "groups[0].cases[0]")


# ---------------------------------------------------------------- fuzzing

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(10**30), max_value=10**30) | st.floats()
    | st.text(max_size=8) | st.sampled_from(["ok", "error", "shape", "non_finite", "lora_dense", "adam_steps",
                                             "merge", "float64", "forward.safetensors", "x", "A"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)


def _paths(tree: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(tree, dict):
        for k, v in tree.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            out += _paths(v, (*prefix, i))
    return out


@st.composite
def mutated_manifests(draw: Any, base: dict) -> dict:
    m = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(_paths(m)[1:]))
        parent = m
        for key in path[:-1]:
            parent = parent[key]
        if isinstance(parent, dict) and draw(st.booleans()) and draw(st.booleans()):
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(JSON_VALUES)
    return m


def _small(vectors: Path) -> dict:
    """The manifest with two cases per group: every operation and field, at a fraction of the cost."""
    m = _manifest(vectors)
    for g in m["groups"]:
        g["cases"] = g["cases"][:2]
    return m


def _only_library_errors(folder: Path) -> None:
    try:
        with np.errstate(all="ignore"):
            verify(folder)
    except MiniLoraError:
        pass


@pytest.mark.slow
def test_fuzzed_manifests_raise_only_library_errors(vectors: Path, tmp_path: Path) -> None:
    folder = _copy(vectors, tmp_path)
    base = _small(vectors)

    @settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.too_slow], database=None)
    @given(mutated_manifests(base))
    def run(m: dict) -> None:
        (folder / "manifest.json").write_text(json.dumps(m))
        _only_library_errors(folder)

    run()


def test_fuzzed_tensors_with_a_matching_hash_raise_only_library_errors(vectors: Path, tmp_path: Path) -> None:
    folder = _copy(vectors, tmp_path)
    base = _small(vectors)
    (folder / "manifest.json").write_text(json.dumps(base))
    files = {f: load_bytes((vectors / f).read_bytes()) for f in base["files"]}
    names = [(f, k) for f, tensors in files.items() for k in tensors]

    @settings(max_examples=60, deadline=2000, suppress_health_check=[HealthCheck.too_slow], database=None)
    @given(st.sampled_from(names), st.lists(st.integers(0, 4), max_size=3),
           st.sampled_from(["float64", "float32", "float16", "int64", "int8", "bool", "uint8"]),
           st.sampled_from([0.0, 1.0, np.inf, np.nan]))
    def run(name: tuple[str, str], shape: list[int], dtype: str, fill: float) -> None:
        f, key = name
        tensors = dict(files[f])
        with np.errstate(all="ignore"):
            tensors[key] = np.full(shape, fill).astype(dtype)
        save(tensors, folder / f, {})
        m = copy.deepcopy(base)
        m["files"][f]["sha256"] = hashlib.sha256((folder / f).read_bytes()).hexdigest()
        (folder / "manifest.json").write_text(json.dumps(m))
        try:
            _only_library_errors(folder)
        finally:
            shutil.copyfile(vectors / f, folder / f)

    run()
