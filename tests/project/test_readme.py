"""The README's set-up commands are the ones CI runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _sh_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return [b.strip() for b in re.findall(r"```sh\n(.*?)```", text, flags=re.S)]


def test_readme_has_two_setup_commands() -> None:
    blocks = _sh_blocks()
    assert len(blocks) >= 2, blocks
    demo, tests = blocks[0], blocks[1]
    assert demo.startswith("python3 -m venv .venv") and demo.endswith("minilora demo")
    assert tests.startswith("python3 -m venv .venv") and "pytest" in tests
    for extra in ("test", "compare", "plot", "sweep"):  # everything the full suite needs
        assert re.search(rf"\[[a-z,]*\b{extra}\b[a-z,]*\]", tests), extra


def test_ci_runs_the_readme_test_command() -> None:
    test_command = _sh_blocks()[1]
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_command in ci_lines, f"{test_command!r} not found verbatim in .ci/run"


def test_compare_extra_pins_torch() -> None:
    # any other spelling pulls a multi-GB CUDA build on the CI machines
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"torch==2.13.0"' in pyproject
