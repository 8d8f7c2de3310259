"""PEFT's target and pattern rules matched in bounded time (``minilora.peft.targets``): the
same answers as Python's ``re`` (which PEFT uses) on generated patterns and names, crafted
patterns that make ``re`` backtrack exponentially finish at once, and what cannot be matched
without backtracking is refused with an error naming the pattern."""

from __future__ import annotations

import re
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minilora.errors import MiniLoraValueError
from minilora.peft.targets import (
    MAX_STATES,
    check_pattern,
    pattern_regex,
    pattern_value,
    regex_match,
    target_matches,
    targeted_modules,
)

ATOMS = ["a", "b", ".", r"\.", "[ab]", "[^a]", r"[a-c\d]", r"\d", r"\w", r"\W", r"\s", "_", "1", r"\b", r"\B",
         "^", "$", r"\Z", r"\A", "()", "\n"]


def _regex(draw: st.DrawFn, depth: int = 0) -> str:
    kind = draw(st.integers(0, 8 if depth < 3 else 0))
    if kind <= 2:
        return draw(st.sampled_from(ATOMS))
    if kind == 3:
        return _regex(draw, depth + 1) + _regex(draw, depth + 1)
    if kind == 4:
        return _regex(draw, depth + 1) + "|" + _regex(draw, depth + 1)
    if kind == 5:
        return draw(st.sampled_from(["(", "(?:"])) + _regex(draw, depth + 1) + ")"
    if kind == 6:
        return "(" + _regex(draw, depth + 1) + ")" + draw(st.sampled_from(["*", "+", "?", "{0,2}", "{2}", "*?",
                                                                          "+?", "{1,}"]))
    if kind == 7:
        return draw(st.sampled_from(["(?=", "(?!"])) + _regex(draw, depth + 1) + ")"
    return draw(st.sampled_from(["(?<=", "(?<!"])) + draw(st.sampled_from(["a", r"\.", "[ab]", "a.", r"\w"])) + ")"


regexes = st.composite(_regex)()
names = st.text(alphabet="ab.1_ \n", max_size=8)


@settings(max_examples=300, deadline=2000)
@given(regexes, names, st.booleans())
def test_answers_what_re_answers(pattern: str, name: str, full: bool) -> None:
    try:
        re.compile(pattern)
    except re.error:
        with pytest.raises(MiniLoraValueError, match="not a valid regular expression"):
            regex_match(pattern, name)
        return
    expected = (re.fullmatch if full else re.match)(pattern, name) is not None
    assert regex_match(pattern, name, full=full) == expected, (pattern, name, full)


@settings(max_examples=100, deadline=2000)
@given(regexes, names)
def test_pattern_value_is_peft_get_pattern_key(key: str, name: str) -> None:
    """PEFT ``get_pattern_key`` in its own words (``re.match(rf"(.*\\.)?({key})$", name)``)."""
    try:
        hit = re.match(rf"(.*\.)?({key})$", name) is not None
    except re.error:
        with pytest.raises(MiniLoraValueError, match="pattern key"):
            pattern_value({key: 1}, name, 0)
        return
    assert pattern_value({key: 1, "zzz": 2}, name, 0) == (1 if hit else 0)


@pytest.mark.parametrize(("key", "name"), [
    ("(a+)+", "a" * 40 + "!"), ("(a|a)*", "a" * 40 + "!"), ("(a|aa)+", "a" * 60 + "!"),
    ("a*" * 12, "a" * 60 + "!"), ("(.*)*x", "y" * 200), (r"(\w+\.?)+q", "a.b" * 50),
    ("(?=(a+)+b)a", "a" * 40),
])
def test_catastrophic_patterns_finish_at_once(key: str, name: str) -> None:
    t = time.perf_counter()
    assert pattern_value({key: 2}, name, 8) == 8
    assert time.perf_counter() - t < 1.0


def test_peft_semantics_on_usual_patterns() -> None:
    patterns = {"q_proj": 1, r"layers\.1\..*": 2, "self_attn.v_proj": 3, "proj": 4}
    assert pattern_value(patterns, "layers.0.self_attn.q_proj", 0) == 1
    assert pattern_value(patterns, "layers.1.mlp.down", 0) == 2
    assert pattern_value(patterns, "layers.0.self_attn.v_proj", 0) == 3
    assert pattern_value(patterns, "x.proj", 0) == 4
    assert pattern_value(patterns, "x.k_proj", 0) == 0  # a key matches whole dotted components
    assert pattern_value(patterns, "xq_proj", 0) == 0
    assert target_matches("model.layers.3.self_attn.q_proj", r".*\.(q|v)_proj")
    assert not target_matches("model.layers.3.self_attn.k_proj", r".*\.(q|v)_proj")
    assert not target_matches("a.vision.q_proj", r"^(?!.*vision).*q_proj$")
    assert target_matches("a.text.q_proj", r"^(?!.*vision).*q_proj$")


@pytest.mark.parametrize(("pattern", "reason"), [
    (r"(a)\1", "backreferences"), (r"(a)?(?(1)b|c)", "conditional groups"), ("(?>a+)", "atomic groups"),
    ("a++", "possessive quantifiers"), ("(?i)proj", "flags"), ("(?s:.)", "scoped flags"),
    ("[", "not a valid regular expression"), ("(?<=a+)b", "fixed-width"),
    ("(?:a{1000}){10}", f"more than {MAX_STATES} NFA states"), ("(" * 2000 + ")" * 2000, "pattern"),
])
def test_unmatchable_patterns_are_refused_by_name(pattern: str, reason: str) -> None:
    with pytest.raises(MiniLoraValueError, match=re.escape(reason)) as info:
        check_pattern(pattern, "rank_pattern key")
    assert "rank_pattern key" in str(info.value)
    with pytest.raises(MiniLoraValueError, match="alpha_pattern key"):
        pattern_value({pattern: 2}, "fc", 8, what="alpha_pattern key")


@pytest.mark.parametrize("bad", [None, 3, b"fc", ["fc"]])
def test_a_pattern_must_be_a_string(bad: object) -> None:
    with pytest.raises(MiniLoraValueError, match="target_modules must be a string"):
        check_pattern(bad, "target_modules")


def test_pattern_regex_is_pefts_wrapping() -> None:
    assert pattern_regex("fc") == r"(.*\.)?(fc)$"


@pytest.mark.parametrize(("call", "fragment"), [
    (lambda: target_matches("fc", {"fc": 1}), "targets must be a regex string or a list"),
    (lambda: target_matches("fc", [1, 2]), "targets must be a regex string or a list"),
    (lambda: target_matches("fc", ["fc"], exclude=3), "exclude must be"),
    (lambda: target_matches(None, ["fc"]), "name must be a module name"),
    (lambda: targeted_modules("x", ["fc"]), "params must be a dict"),
    (lambda: pattern_value([1], "fc", 2), "must be a dict"),
    (lambda: pattern_value({"fc": 2}, 3, 2), "module must be a module name"),
])
def test_junk_targets_are_refused_by_name(call: object, fragment: str) -> None:
    """A dict, a list of ints, a non-str name used to be TypeError/AttributeError/ambiguous-truth."""
    with pytest.raises(MiniLoraValueError, match=re.escape(fragment)):
        call()  # type: ignore[operator]
