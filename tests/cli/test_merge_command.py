"""``minilora merge`` / ``minilora inspect`` as a user runs them: output paths checked before any
work, inputs never overwritten, signals and write errors leave no temp file, bad indexes refused
by name, --json, progress on a terminal, ``inspect --base``. NumPy-only fixtures."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import minilora.cli as cli
from minilora.formats import safetensors as st
from minilora.formats.checkpoint import CheckpointError, open_checkpoint
from minilora.peft.files import PeftFileError, save_peft_adapter
from minilora.peft.merge import merge_adapter_file
from minilora.peft.merge_plan import MergeError

REPO = Path(__file__).resolve().parents[2]
RNG = np.random.default_rng(0)
BASE = {"fc.weight": RNG.standard_normal((3, 4)).astype(np.float32), "fc.bias": np.zeros(3, np.float32),
        "head.weight": RNG.standard_normal((2, 3)).astype(np.float32)}


def _setup(tmp: Path) -> tuple[Path, Path]:
    st.save(BASE, tmp / "base.safetensors")
    save_peft_adapter(tmp / "ad", {"fc": {"A": RNG.standard_normal((2, 4)), "B": RNG.standard_normal((3, 2))}},
                      r=2, lora_alpha=4)
    return tmp / "base.safetensors", tmp / "ad"


def _sharded(tmp: Path) -> Path:
    folder = tmp / "sharded"
    folder.mkdir()
    st.save({"fc.weight": BASE["fc.weight"], "fc.bias": BASE["fc.bias"]}, folder / "model-00001-of-00002.safetensors")
    st.save({"head.weight": BASE["head.weight"]}, folder / "model-00002-of-00002.safetensors")
    index = {"metadata": {"total_size": 0}, "weight_map": {"fc.weight": "model-00001-of-00002.safetensors",
                                                           "fc.bias": "model-00001-of-00002.safetensors",
                                                           "head.weight": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def _cli(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "minilora", *args], cwd=tmp, env=env, capture_output=True,
                          text=True, timeout=120)


def _one_line(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("minilora: error:"), proc.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])


def test_sharded_index_and_folder_merge_like_the_single_file(tmp_path: Path) -> None:
    base, ad = _setup(tmp_path)
    merge_adapter_file(base, ad, tmp_path / "single.safetensors")
    folder = _sharded(tmp_path)
    for src in (folder, folder / "model.safetensors.index.json"):
        merge_adapter_file(src, ad, tmp_path / "one.safetensors")
        assert st.load(tmp_path / "one.safetensors").keys() == st.load(tmp_path / "single.safetensors").keys()
        for k, v in st.load(tmp_path / "single.safetensors").items():
            np.testing.assert_array_equal(st.load(tmp_path / "one.safetensors")[k], v)
    merge_adapter_file(folder, ad, tmp_path / "outdir/")
    index = json.loads((tmp_path / "outdir" / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    merged = st.load(tmp_path / "outdir" / "model-00001-of-00002.safetensors")
    np.testing.assert_array_equal(merged["fc.weight"], st.load(tmp_path / "single.safetensors")["fc.weight"])
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in BASE.values())


@pytest.mark.parametrize(("edit", "match"), [
    (lambda f, i: i["weight_map"].update({"head.weight": "model-00003-of-00002.safetensors"}),
     r"shard 'model-00003-of-00002\.safetensors' .* is missing"),
    (lambda f, i: i["weight_map"].pop("fc.bias"), r"holds tensor 'fc\.bias' but the index does not name it"),
    (lambda f, i: i["weight_map"].update({"extra.weight": "model-00002-of-00002.safetensors"}),
     r"lacks tensor 'extra\.weight'"),
    (lambda f, i: st.save({"head.weight": BASE["head.weight"], "fc.bias": BASE["fc.bias"]},
                          f / "model-00002-of-00002.safetensors"), r"tensor 'fc\.bias' is also in"),
    (lambda f, i: i["weight_map"].update({"head.weight": "../x.safetensors"}), "is not a file name"),
])
def test_bad_index_is_refused_by_name(tmp_path: Path, edit: Any, match: str) -> None:
    folder = _sharded(tmp_path)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    edit(folder, index)
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=match):
        open_checkpoint(folder)
    _, ad = _setup(tmp_path)
    _one_line(_cli(tmp_path, "merge", str(folder), str(ad), "o.safetensors"), "sharded")
    assert not (tmp_path / "o.safetensors").exists()


def test_ambiguous_prefix_is_refused(tmp_path: Path) -> None:
    _, ad = _setup(tmp_path)
    st.save({**BASE, "model.fc.weight": BASE["fc.weight"]}, tmp_path / "amb.safetensors")
    with pytest.raises(MergeError, match=r"'fc\.weight' is ambiguous .*'fc\.weight', 'model\.fc\.weight'"):
        merge_adapter_file(tmp_path / "amb.safetensors", ad, tmp_path / "o.safetensors")


@pytest.mark.parametrize("where", ["adapter_file", "adapter_folder", "inside_adapter", "base", "shard"])
def test_out_that_is_an_input_is_refused_before_work(tmp_path: Path, where: str) -> None:
    base, ad = _setup(tmp_path)
    folder = _sharded(tmp_path)
    src = folder if where == "shard" else base
    out = {"adapter_file": ad / "adapter_model.safetensors", "adapter_folder": ad, "inside_adapter": ad / "new.safetensors",
           "base": base, "shard": folder / "model-00002-of-00002.safetensors"}[where]
    before = {p: p.read_bytes() for p in [*ad.iterdir(), base, *folder.iterdir()]}
    proc = _cli(tmp_path, "merge", str(src), str(ad), str(out))
    _one_line(proc, "OUT")
    assert {p: p.read_bytes() for p in before} == before
    assert sorted(ad.iterdir()) == sorted(p for p in before if p.parent == ad)


def test_out_folder_problems_are_one_line_before_work(tmp_path: Path) -> None:
    base, ad = _setup(tmp_path)
    _one_line(_cli(tmp_path, "merge", str(base), str(ad), "missing/o.safetensors"), "missing", "does not exist")
    (tmp_path / "afile").write_text("x")
    _one_line(_cli(tmp_path, "merge", str(base), str(ad), "afile/"), "afile", "not a folder")
    (tmp_path / "ro").mkdir()
    os.chmod(tmp_path / "ro", 0o555)
    try:
        if not os.access(tmp_path / "ro", os.W_OK):  # root can write anywhere
            _one_line(_cli(tmp_path, "merge", str(base), str(ad), "ro/o.safetensors"), "ro", "cannot write in folder")
    finally:
        os.chmod(tmp_path / "ro", 0o755)
    assert _cli(tmp_path, "merge", str(base), str(ad), "newdir/").returncode == 0
    assert st.load(tmp_path / "newdir" / "model.safetensors").keys() == BASE.keys()


def test_adapter_without_lora_tensors_is_an_error(tmp_path: Path) -> None:
    base, ad = _setup(tmp_path)
    st.save({"base_model.model.fc.bias": np.ones(3, np.float32)}, ad / "adapter_model.safetensors")
    cfg = json.loads((ad / "adapter_config.json").read_text())
    (ad / "adapter_config.json").write_text(json.dumps({**cfg, "bias": "all"}))
    with pytest.raises(PeftFileError, match="adapter_model.safetensors: holds no LoRA tensors"):
        merge_adapter_file(base, ad, tmp_path / "o.safetensors")
    assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize(("code", "reason"), [(errno.ENOSPC, "No space left on device"),
                                              (errno.EROFS, "Read-only file system")])
def test_write_error_is_one_line_naming_the_path(tmp_path: Path, code: int, reason: str, monkeypatch: Any,
                                                 capsys: Any) -> None:
    base, ad = _setup(tmp_path)
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"old OUT")
    import minilora.formats.fileio as fileio

    real = fileio.os.fsync

    def fsync(fd: int) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(fileio.os, "fsync", fsync)
    assert cli.main(["merge", str(base), str(ad), str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(out) in err[0] and reason in err[0], err
    monkeypatch.setattr(fileio.os, "fsync", real)
    assert out.read_bytes() == b"old OUT"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad", "base.safetensors", "o.safetensors"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["file", "folder"])
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP", "SIGQUIT", "SIGINT"])
def test_signal_removes_the_temp_file_and_keeps_old_out(tmp_path: Path, sig: str, kind: str) -> None:
    big = {f"l{i}.weight": np.ones((256, 256), np.float32) for i in range(40)} | {"fc.weight": BASE["fc.weight"]}
    st.save(big, tmp_path / "base.safetensors")
    (tmp_path / "x").mkdir()
    _, ad = _setup(tmp_path / "x")
    if kind == "folder":  # OUT a model folder holding an old model.safetensors
        (tmp_path / "o").mkdir()
        out, old = tmp_path / "o", tmp_path / "o" / "model.safetensors"
    else:
        out = old = tmp_path / "o.safetensors"
    old.write_bytes(b"old OUT")
    written = old.parent
    # a merge slowed down inside the write loop, so the signal lands while the temp file exists
    script = ("import time, minilora.peft.merge as m, minilora.cli as cli\n"
              "orig = m.read_tensor\n"
              "def slow(*a):\n    time.sleep(0.05)\n    return orig(*a)\n"
              "m.read_tensor = slow\n"
              f"raise SystemExit(cli.main(['merge', {str(tmp_path / 'base.safetensors')!r}, {str(ad)!r}, {str(out)!r}]))\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not any(p.name.endswith(".tmp") for p in written.iterdir()):
        assert time.time() < deadline and proc.poll() is None, "the merge never started writing"
        time.sleep(0.01)
    proc.send_signal(getattr(signal, sig))
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + getattr(signal, sig), stderr
    assert old.read_bytes() == b"old OUT"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.safetensors", out.name, "x"]
    assert [p.name for p in written.iterdir() if p.name.endswith(".tmp")] == []
    lines = stderr.strip().splitlines()
    assert lines == ["minilora: interrupted" if sig == "SIGINT" else f"minilora: stopped by {sig}"], stderr


def _probe_refused(monkeypatch: Any, code: int) -> None:
    """The create-and-remove probe of an output folder fails with ``code`` (a read-only mount,
    /proc), as it does for root too, where ``os.access`` says the folder is writable."""
    import minilora.formats.fileio as fileio

    real = fileio.tempfile.mkstemp

    def mkstemp(*args: Any, **kwargs: Any) -> Any:
        if str(kwargs.get("prefix", "")).startswith(".minilora-probe-"):
            raise OSError(code, os.strerror(code))
        return real(*args, **kwargs)

    monkeypatch.setattr(fileio.tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr(os, "access", lambda *a, **k: True)


@pytest.mark.parametrize("out", ["o.safetensors", "model/"])
def test_an_unwritable_out_folder_is_refused_before_reading_base(tmp_path: Path, monkeypatch: Any, capsys: Any,
                                                                  out: str) -> None:
    import minilora.peft.merge as m

    base, ad = _setup(tmp_path)
    _probe_refused(monkeypatch, errno.EROFS)
    monkeypatch.setattr(m, "read_tensor", lambda *a: pytest.fail("BASE was read before OUT was checked"))
    assert cli.main(["merge", str(base), str(ad), str(tmp_path / out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"OUT {tmp_path / out}" in err[0] and "Read-only file system" in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad", "base.safetensors"]


def test_a_temp_file_that_cannot_be_made_names_out_not_the_temp(tmp_path: Path, monkeypatch: Any,
                                                                 capsys: Any) -> None:
    import minilora.formats.fileio as fileio

    base, ad = _setup(tmp_path)
    real = fileio.tempfile.mkstemp

    def mkstemp(*args: Any, **kwargs: Any) -> Any:
        if str(kwargs.get("prefix", "")).startswith(".minilora-probe-"):
            return real(*args, **kwargs)
        name = os.path.join(str(kwargs["dir"]), f"{kwargs['prefix']}x1y2z3{kwargs['suffix']}")
        raise OSError(errno.ENOENT, os.strerror(errno.ENOENT), name)  # what /proc answers root

    monkeypatch.setattr(fileio.tempfile, "mkstemp", mkstemp)
    out = tmp_path / "o.safetensors"
    assert cli.main(["merge", str(base), str(ad), str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"minilora: error: {out}: cannot write: "), err
    assert ".tmp" not in err[0], err


def test_a_sharded_index_naming_a_tensor_twice_is_refused(tmp_path: Path) -> None:
    folder = _sharded(tmp_path)
    path = folder / "model.safetensors.index.json"
    text = path.read_text()
    path.write_text(text.replace('"weight_map": {', '"weight_map": {"head.weight": "model-00001-of-00002.safetensors", '))
    with pytest.raises(CheckpointError, match=r"index\.json: corrupt JSON \(the key 'head\.weight' appears twice"):
        open_checkpoint(folder)


def test_json_summary_progress_and_inspect_base(tmp_path: Path, capsys: Any, monkeypatch: Any) -> None:
    base, ad = _setup(tmp_path)
    assert cli.main(["merge", str(base), str(ad), str(tmp_path / "o.safetensors"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["modules"][0]["module"] == "fc" and report["modules"][0]["tensor"] == "fc.weight"
    assert report["tensors"] == 3 and report["files"] == [str(tmp_path / "o.safetensors")]

    class Tty:
        def __init__(self) -> None:
            self.text = ""

        def isatty(self) -> bool:
            return True

        def write(self, s: str) -> None:
            self.text += s

        def flush(self) -> None:
            pass

    tty = Tty()
    monkeypatch.setattr(sys, "stderr", tty)
    assert cli.main(["merge", str(base), str(ad), str(tmp_path / "o2.safetensors")]) == 0
    assert "merging 100%" in tty.text
    monkeypatch.undo()
    capsys.readouterr()
    st.save({**BASE, "fc.weight": np.zeros((5, 5), np.float32)}, tmp_path / "bad.safetensors")
    before = sorted(tmp_path.iterdir())
    assert cli.main(["inspect", str(ad), "--base", str(tmp_path / "bad.safetensors")]) == 1
    text = capsys.readouterr().out
    assert "REFUSED  fc: module 'fc': base tensor 'fc.weight' has shape (5, 5)" in text
    assert cli.main(["inspect", str(ad), "--base", str(base), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [r["module"] for r in info["base"]["merged"]] == ["fc"] and info["base"]["refused"] == []
    assert sorted(tmp_path.iterdir()) == before  # inspect writes nothing


def test_a_product_order_not_reproduced_is_refused_unless_allowed(tmp_path: Path, capsys: Any) -> None:
    """A 5-label head (B (5, r)): torch's MKL sums such a product in an order minilora does not
    reproduce, so bit-equality with PEFT cannot be promised: refused by module and rank, merged
    with --allow-inexact and listed in the summary."""
    rng = np.random.default_rng(3)
    base = {"fc.weight": rng.standard_normal((32, 32)).astype(np.float32),
            "head.weight": rng.standard_normal((5, 32)).astype(np.float32)}
    st.save(base, tmp_path / "base.safetensors")
    factors = {m: {"A": rng.standard_normal((8, 32)), "B": rng.standard_normal((w.shape[0], 8))}
               for m, w in (("fc", base["fc.weight"]), ("head", base["head.weight"]))}
    save_peft_adapter(tmp_path / "ad", factors, r=8, lora_alpha=16)
    proc = _cli(tmp_path, "merge", "base.safetensors", "ad", "o.safetensors")
    _one_line(proc, "module 'head' (r=8)", "(5, 8) x (8, 32) product", "not reproduced", "--allow-inexact")
    assert not (tmp_path / "o.safetensors").exists()
    with pytest.raises(MergeError, match=r"module 'head' \(r=8\)"):
        merge_adapter_file(tmp_path / "base.safetensors", tmp_path / "ad", tmp_path / "o.safetensors")

    assert cli.main(["inspect", str(tmp_path / "ad"), "--base", str(tmp_path / "base.safetensors")]) == 1
    assert "REFUSED  head: module 'head' (r=8)" in capsys.readouterr().out
    assert cli.main(["inspect", str(tmp_path / "ad"), "--base", str(tmp_path / "base.safetensors"),
                     "--allow-inexact"]) == 0
    assert "not bit-equal to PEFT" in capsys.readouterr().out

    assert cli.main(["merge", str(tmp_path / "base.safetensors"), str(tmp_path / "ad"),
                     str(tmp_path / "o.safetensors"), "--allow-inexact", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [(r["tensor"], r["module"]) for r in report["not_bit_equal"]] == [("head.weight", "head")]
    assert "not reproduced" in report["not_bit_equal"][0]["why"]
    assert {r["module"]: r["bit_equal"] for r in report["modules"]} == {"fc": True, "head": False}
    merged = st.load(tmp_path / "o.safetensors")
    for m in ("fc", "head"):  # still the right merge, to float32 rounding
        t = {k: v.astype(np.float32).astype(np.float64) for k, v in factors[m].items()}
        want = base[f"{m}.weight"] + 2.0 * t["B"] @ t["A"]
        assert np.max(np.abs(merged[f"{m}.weight"] - want)) <= 1e-5 * np.max(np.abs(want))
    assert cli.main(["merge", str(tmp_path / "base.safetensors"), str(tmp_path / "ad"),
                     str(tmp_path / "o2.safetensors"), "--allow-inexact"]) == 0
    assert "head.weight" in capsys.readouterr().out.split("not guaranteed bit-equal to PEFT")[0].splitlines()[-1]


def test_one_shard_as_base_says_to_pass_the_folder_or_index(tmp_path: Path) -> None:
    _, ad = _setup(tmp_path)
    folder = _sharded(tmp_path)
    proc = _cli(tmp_path, "merge", str(folder / "model-00002-of-00002.safetensors"), str(ad), "o.safetensors")
    _one_line(proc, "adapter module 'fc' matches no tensor", "BASE is one shard of a sharded checkpoint",
              "pass its folder or its model.safetensors.index.json")
    assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize("out", ["exists", "exists/", "fresh"])
def test_out_folder_existing_or_not_is_written_without_traceback(tmp_path: Path, out: str) -> None:
    base, ad = _setup(tmp_path)
    (tmp_path / "exists").mkdir()
    proc = _cli(tmp_path, "merge", str(base), str(ad), out)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    merged = st.load(tmp_path / out.rstrip("/") / "model.safetensors")
    assert merged.keys() == BASE.keys() and not np.array_equal(merged["fc.weight"], BASE["fc.weight"])


def test_a_late_write_error_leaves_every_file_of_an_old_out_folder(tmp_path: Path, monkeypatch: Any,
                                                                   capsys: Any) -> None:
    """A sharded merge into a folder holding an older merge: ENOSPC at the last file's flush used
    to come after the first shard was renamed (new shard 1 beside old shard 2 and old index)."""
    import minilora.formats.fileio as fileio

    folder = _sharded(tmp_path)
    _, ad = _setup(tmp_path)
    out = tmp_path / "merged"
    assert cli.main(["merge", str(folder), str(ad), str(out)]) == 0
    for p in out.iterdir():
        p.write_bytes(b"old " + p.name.encode())
    old = {p.name: p.read_bytes() for p in out.iterdir()}
    assert len(old) == 3  # two shards and the index
    real, calls = fileio.os.fsync, []

    def fsync(fd: int) -> None:
        calls.append(fd)
        if len(calls) == len(old):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd)

    monkeypatch.setattr(fileio.os, "fsync", fsync)
    capsys.readouterr()
    assert cli.main(["merge", str(folder), str(ad), str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(out) in err[0] and "No space left" in err[0] and ".tmp" not in err[0], err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == old
