"""The package's tree is its architecture (docs/architecture.md): these rules keep it so.

- dependencies point one way: core <- formats <- variants <- peft <- {testing, study} <- cli;
- nothing outside ``minilora.cli`` imports it (``__main__`` excepted: it is the entry point);
- no underscored name crosses a folder (the core's ``_checks`` and ``_tree`` are its shared
  validation and tree helpers and may be imported from anywhere below ``cli``);
- at most 12 modules at the top of ``minilora/`` and none over 400 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "minilora"
# rank of each folder: a module may import only from its own folder or lower ranks
RANK = {"core": 0, "formats": 1, "variants": 2, "peft": 3, "testing": 4, "study": 4, "cli": 5}
SHARED_PRIVATE = {"minilora._checks", "minilora._tree"}


def _folder(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) >= 2 and parts[1] in RANK else "core"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        out[name] = path
    return out


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(module, names, line) for every import of a minilora module, at any depth in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("minilora"):
            found.append((node.module, [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name.startswith("minilora")]
    return found


MODULES = _modules()


def test_the_rules_see_every_folder() -> None:
    folders = {_folder(m) for m in MODULES}
    assert folders == set(RANK), folders


@pytest.mark.parametrize("module", sorted(MODULES))
def test_dependencies_point_one_way(module: str) -> None:
    here = _folder(module)
    for target, names, line in _imports(MODULES[module]):
        for full in [target] + [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]:
            there = _folder(full)
            if module == "minilora.__main__" and there == "cli":
                continue
            assert there == here or RANK[there] < RANK[here], (
                f"{module} (line {line}) imports {full}: {here} may not depend on {there}")


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_private_name_crosses_a_folder(module: str) -> None:
    here = _folder(module)
    for target, names, line in _imports(MODULES[module]):
        if _folder(target) == here or target in SHARED_PRIVATE:
            continue
        private = [n for n in names if n.startswith("_") and not n.endswith("__")]
        if any(part.startswith("_") for part in target.split(".")[1:]):
            private.append(target)
        assert not private, f"{module} (line {line}) imports private {private} from {target}"


def test_at_most_twelve_top_level_modules() -> None:
    top = sorted(p.stem for p in PKG.glob("*.py") if p.stem != "__main__")
    assert len(top) <= 12, top


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_over_400_lines(module: str) -> None:
    n = len(MODULES[module].read_text().splitlines())
    assert n <= 400, f"{module} has {n} lines"


def test_import_minilora_loads_the_core_only() -> None:
    import subprocess
    import sys

    code = ("import sys, minilora; print(' '.join(sorted(m for m in sys.modules if m.startswith('minilora'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert [m for m in out if _folder(m) != "core"] == [], out
