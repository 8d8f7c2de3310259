"""PEFT's target rules, in one place (PEFT 0.21 ``check_target_module_exists``,
``_maybe_include_all_linear_layers``, ``match_target_against_key`` and ``get_pattern_key``):

    targets a str       "all-linear" (any case): every linear layer but the output layer;
                        otherwise the module name must ``re.fullmatch`` the string
    targets a list/set  the name is an entry, or ends with "." + an entry
    exclude             the same two rules; an excluded name is never a target
    rank_pattern, alpha_pattern   the first key k (in order) with
                        ``re.match(rf"(.*\\.)?({k})$", name)`` gives the value

``minilora.peft.models`` chooses layers with these; ``minilora.peft.files`` reads an adapter's
per-module rank and alpha with ``pattern_value``.

Matching in bounded time. PEFT hands these strings to Python's backtracking ``re``, where a
key such as ``(a+)+`` against ``"aaa...a!"`` takes time doubling with each character (a crafted
adapter_config.json hangs ``inspect`` and ``merge``). minilora gives the same answers without
backtracking: the pattern is checked by ``re.compile`` (so a bad regex is refused exactly when
PEFT's ``re`` would refuse it) and parsed by ``re``'s own parser (so every escape, class and
quantifier means what it means to ``re``); the parse tree becomes a Thompson NFA, run over the
name with a set of states (Thompson 1968; Cox, "Regular Expression Matching Can Be Simple And
Fast", 2007). Time is O(len(name) x states), never exponential; lookarounds run a sub-NFA per
position (O(len(name)^2 x states) at worst). Why this rather than refusing "dangerous" patterns:
no syntactic rule catches every blow-up (``(a|a)*``, ``a*a*a*a*$`` are polynomial or exponential
without nesting), and a refusal would also turn away patterns PEFT users write. What a set of
states cannot express is refused with a clear ``MiniLoraValueError``: backreferences,
conditional groups, atomic groups, possessive quantifiers and the flags i, L, m, s, a (a match
would need backtracking, or character semantics we do not reproduce). Limits, each a refusal
naming the pattern: at most ``MAX_STATES`` NFA states (``a{1000}{1000}`` is refused) and
``MAX_STEPS`` state visits per match. A match answers exactly what ``re`` answers (for a regex
without backreferences the existence of a matching path is the whole answer; the tests compare
the two on generated patterns and names).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any

from minilora.errors import MiniLoraValueError

try:  # the parser ``re`` itself uses (Python 3.11+: re._parser; 3.10: sre_parse)
    from re import _parser as _sre  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - Python 3.10
    import sre_parse as _sre

__all__ = ["is_linear", "pattern_value", "target_matches", "targeted_modules", "regex_match", "check_pattern", "pattern_regex",
           "MAX_STATES", "MAX_STEPS"]

MAX_STATES = 5_000
MAX_STEPS = 2_000_000


def is_linear(layer: Any) -> bool:
    """A layer LoRA can target: a dict whose "W" is a 2-D weight."""
    return isinstance(layer, dict) and getattr(layer.get("W"), "ndim", 0) == 2


def _name_matches(name: str, targets: Any, what: str = "targets") -> bool:
    if isinstance(targets, str):
        return regex_match(targets, name, full=True, what="target_modules")
    if not (isinstance(targets, list | tuple | set | frozenset) and all(isinstance(t, str) for t in targets)):
        raise MiniLoraValueError(f"{what} must be a regex string or a list of module names; got {_short(repr(targets))}")
    return name in targets or any(name.endswith(f".{t}") for t in targets)


def target_matches(name: str, targets: Any, *, exclude: Any = None) -> bool:
    """Whether PEFT would put LoRA on module ``name`` (rules in the module docstring; the
    "all-linear" shorthand is resolved by ``targeted_modules``, which knows the model)."""
    if not isinstance(name, str):
        raise MiniLoraValueError(f"name must be a module name (a str); got {type(name).__name__}")
    if exclude is not None and _name_matches(name, exclude, "exclude"):
        return False
    return _name_matches(name, targets)


def targeted_modules(params: dict, targets: Any, *, exclude: Any = None, output_layer: str | None = "auto") -> list[str]:
    """Names of the layers of ``params`` that ``targets`` selects, in model order.

    output_layer: the layer "all-linear" leaves out ("auto": the last layer; None: none).
    Raises MiniLoraValueError when nothing matches (as PEFT does)."""
    if not isinstance(params, dict):
        raise MiniLoraValueError(f"params must be a dict of named layers; got {type(params).__name__}")
    linear = [n for n, layer in params.items() if is_linear(layer)]
    if isinstance(targets, str) and targets.lower() == "all-linear":
        out = linear[-1] if output_layer == "auto" and linear else output_layer
        targets = [n for n in linear if n != out]  # exact names now
        chosen = [n for n in linear if n in targets and not (exclude is not None and _name_matches(n, exclude, "exclude"))]
    else:
        if not isinstance(targets, str | list | tuple | set | frozenset):
            raise MiniLoraValueError(f"targets must be a str or a list of names; got {type(targets).__name__}")
        chosen = [n for n in linear if target_matches(n, targets, exclude=exclude)]
    if not chosen:
        raise MiniLoraValueError(f"targets {targets!r} match no layer of the model; layers are {linear}")
    return chosen


def pattern_regex(key: str) -> str:
    """The regex PEFT's ``get_pattern_key`` builds from a rank_pattern/alpha_pattern key."""
    return rf"(.*\.)?({key})$"


def pattern_value(patterns: dict | None, module: str, default: Any, *, what: str = "pattern key") -> Any:
    """PEFT ``get_pattern_key`` for ``rank_pattern``/``alpha_pattern``: the value of the first key
    k of ``patterns``, in the dict's order, with ``re.match(rf"(.*\\.)?({k})$", module)``; else
    ``default``. Matched in bounded time (see the module docstring); a key that cannot be
    matched raises MiniLoraValueError naming ``what`` and the key."""
    if patterns is not None and not isinstance(patterns, dict):
        raise MiniLoraValueError(f"{what}s must be a dict of regex keys; got {type(patterns).__name__}")
    if not isinstance(module, str):
        raise MiniLoraValueError(f"module must be a module name (a str); got {type(module).__name__}")
    for key, value in (patterns or {}).items():
        if regex_match(pattern_regex(key), module, what=f"{what} {key!r} (matched as)"):
            return value
    return default

# ---------------------------------------------------------------- the linear-time matcher

_CHAR, _SPLIT, _AT, _LOOK, _MATCH = range(5)
_ALLOWED_FLAGS = _sre.SRE_FLAG_UNICODE | _sre.SRE_FLAG_VERBOSE  # VERBOSE acts in the parser only
_REFUSED = {"GROUPREF": "backreferences", "GROUPREF_EXISTS": "conditional groups",
            "ATOMIC_GROUP": "atomic groups", "POSSESSIVE_REPEAT": "possessive quantifiers"}


def _is_word(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


_CATEGORIES: dict[str, Callable[[str], bool]] = {  # re's Unicode categories (str patterns)
    "CATEGORY_DIGIT": str.isdecimal, "CATEGORY_NOT_DIGIT": lambda c: not c.isdecimal(),
    "CATEGORY_SPACE": str.isspace, "CATEGORY_NOT_SPACE": lambda c: not c.isspace(),
    "CATEGORY_WORD": _is_word, "CATEGORY_NOT_WORD": lambda c: not _is_word(c),
}


class _Refused(Exception):
    pass


class _Builder:
    """Parse tree (``re``'s parser) -> NFA nodes, built back to front: ``build(items, nxt)``
    returns the node that matches ``items`` and continues at node ``nxt``."""

    def __init__(self) -> None:
        self.budget = MAX_STATES

    def program(self, items: Any) -> _Program:
        prog = _Program()
        self.nodes = prog.nodes
        prog.start = self.build(items, self.add((_MATCH,)))
        return prog

    def add(self, node: tuple | None) -> int:
        self.spend()
        self.nodes.append(node)  # type: ignore[arg-type]
        return len(self.nodes) - 1

    def spend(self) -> None:
        self.budget -= 1
        if self.budget < 0:
            raise _Refused(f"it needs more than {MAX_STATES} NFA states (a repeat count too large?)")

    def build(self, items: Any, nxt: int) -> int:
        for op, av in reversed(list(items)):
            nxt = self.item(str(op), av, nxt)
        return nxt

    def item(self, op: str, av: Any, nxt: int) -> int:
        if op == "LITERAL":
            c = chr(av)
            return self.add((_CHAR, c.__eq__, nxt))
        if op == "NOT_LITERAL":
            c = chr(av)
            return self.add((_CHAR, c.__ne__, nxt))
        if op == "ANY":  # no DOTALL: anything but a newline
            return self.add((_CHAR, "\n".__ne__, nxt))
        if op == "IN":
            return self.add((_CHAR, _charset(av), nxt))
        if op == "BRANCH":
            alts = av[1]
            s = self.build(alts[-1], nxt)
            for alt in reversed(alts[:-1]):
                s = self.add((_SPLIT, self.build(alt, nxt), s))
            return s
        if op == "SUBPATTERN":
            _, add_flags, del_flags, p = av
            if add_flags & ~_ALLOWED_FLAGS or del_flags:
                raise _Refused("scoped flags other than (?x:...) are not supported")
            return self.build(p, nxt)
        if op in ("MAX_REPEAT", "MIN_REPEAT"):  # greedy or lazy: the same set of matches
            lo, hi, p = av
            if hi == _sre.MAXREPEAT:
                loop = self.add(None)
                self.nodes[loop] = (_SPLIT, self.build(p, loop), nxt)
                s = loop
            else:
                s = nxt
                for _ in range(hi - lo):  # up to hi - lo optional copies
                    s = self.add((_SPLIT, self.build(p, s), nxt))
            for _ in range(lo):
                self.spend()
                s = self.build(p, s)
            return s
        if op == "AT":
            if str(av) not in _AT_TESTS:
                raise _Refused(f"the anchor {av} is not supported")
            return self.add((_AT, _AT_TESTS[str(av)], nxt))
        if op in ("ASSERT", "ASSERT_NOT"):
            direction, p = av
            width = 0
            if direction < 0:
                lo, hi = p.getwidth()
                if lo != hi:
                    raise _Refused("look-behind requires fixed-width pattern")
                width = lo
            outer = self.nodes
            sub = self.program(p)
            self.nodes = outer
            return self.add((_LOOK, sub, op == "ASSERT_NOT", width, nxt))
        raise _Refused(f"{_REFUSED.get(op, op)} cannot be matched without backtracking; minilora refuses them")


def _charset(items: list) -> Callable[[str], bool]:
    negate, chars, ranges, tests = False, set(), [], []
    for op, av in items:
        op = str(op)
        if op == "NEGATE":
            negate = True
        elif op == "LITERAL":
            chars.add(chr(av))
        elif op == "RANGE":
            ranges.append((av[0], av[1]))
        elif op == "CATEGORY" and str(av) in _CATEGORIES:
            tests.append(_CATEGORIES[str(av)])
        else:
            raise _Refused(f"the character-class item {op} {av} is not supported")
    frozen = frozenset(chars)

    def test(ch: str) -> bool:
        cp = ord(ch)
        hit = ch in frozen or any(lo <= cp <= hi for lo, hi in ranges) or any(t(ch) for t in tests)
        return hit != negate

    return test


# (text, position) -> whether the anchor holds; re without MULTILINE (Python 3.11 rules)
_AT_TESTS: dict[str, Callable[[str, int], bool]] = {
    "AT_BEGINNING": lambda s, i: i == 0,
    "AT_BEGINNING_STRING": lambda s, i: i == 0,
    "AT_END": lambda s, i: i == len(s) or (i == len(s) - 1 and s[i] == "\n"),
    "AT_END_STRING": lambda s, i: i == len(s),
    "AT_BOUNDARY": lambda s, i: bool(s) and (i > 0 and _is_word(s[i - 1])) != (i < len(s) and _is_word(s[i])),
    "AT_NON_BOUNDARY": lambda s, i: bool(s) and (i > 0 and _is_word(s[i - 1])) == (i < len(s) and _is_word(s[i])),
}


class _Program:
    """An NFA: ``nodes[i]`` is (_CHAR, test, next) | (_SPLIT, a, b) | (_AT, test, next) |
    (_LOOK, sub-program, negated, look-behind width, next) | (_MATCH,)."""

    def __init__(self) -> None:
        self.nodes: list[tuple] = []
        self.start = 0

    def closure(self, states: Any, text: str, i: int, steps: list[int]) -> list[int]:
        """The _CHAR and _MATCH nodes reachable from ``states`` at position i without consuming."""
        seen: set[int] = set()
        out: list[int] = []
        stack = list(states)[::-1]
        nodes = self.nodes
        while stack:
            k = stack.pop()
            if k in seen:
                continue
            seen.add(k)
            node = nodes[k]
            kind = node[0]
            if kind == _SPLIT:
                stack += (node[2], node[1])
            elif kind == _AT:
                if node[1](text, i):
                    stack.append(node[2])
            elif kind == _LOOK:
                _, sub, negated, width, nxt = node
                if width:
                    hit = i >= width and sub.run(text, i - width, steps, end=i)
                else:
                    hit = sub.run(text, i, steps)
                if hit != negated:
                    stack.append(nxt)
            else:
                out.append(k)
        steps[0] += len(seen)
        if steps[0] > MAX_STEPS:
            raise _Refused(f"matching needs more than {MAX_STEPS} steps")
        return out

    def run(self, text: str, pos: int, steps: list[int], end: int | None = None, full: bool = False) -> bool:
        """Whether a path matches from ``pos``: ending anywhere (``re.match``), at ``end`` (a
        look-behind) or at the end of ``text`` (``full``: ``re.fullmatch``)."""
        stop = len(text) if full else end
        nodes = self.nodes
        current = self.closure([self.start], text, pos, steps)
        i = pos
        while True:
            if any(nodes[k][0] == _MATCH for k in current) and (stop is None or i == stop):
                return True
            if i == len(text) or (stop is not None and i >= stop) or not current:
                return False
            ch = text[i]
            nxt = [nodes[k][2] for k in current if nodes[k][0] == _CHAR and nodes[k][1](ch)]
            i += 1
            current = self.closure(nxt, text, i, steps)


@functools.lru_cache(maxsize=512)
def _compile(pattern: str) -> _Program:
    try:
        re.compile(pattern)  # the errors PEFT's re gives (compiling never runs the pattern)
        tree = _sre.parse(pattern)
    except re.error as exc:
        raise MiniLoraValueError(f"not a valid regular expression ({exc})") from None
    except (RecursionError, OverflowError, MemoryError):
        raise MiniLoraValueError("too deeply nested or too large to compile") from None
    if tree.state.flags & ~_ALLOWED_FLAGS:
        raise MiniLoraValueError("the flags (?i), (?L), (?m), (?s) and (?a) are not supported")
    try:
        return _Builder().program(tree)
    except _Refused as exc:
        raise MiniLoraValueError(str(exc)) from None


def check_pattern(pattern: Any, what: str) -> str:
    """``pattern`` if minilora can match it (a str that ``re`` compiles and the NFA holds); else
    MiniLoraValueError naming ``what`` (e.g. "rank_pattern key") and the pattern."""
    if not isinstance(pattern, str):
        raise MiniLoraValueError(f"{what} must be a string; got {type(pattern).__name__} {pattern!r:.80}")
    try:
        _compile(pattern)
    except MiniLoraValueError as exc:
        raise MiniLoraValueError(f"{what} {_short(pattern)}: {exc}") from None
    return pattern


def _short(text: str) -> str:
    return repr(text) if len(text) <= 80 else f"{text[:80]!r}... ({len(text)} characters)"


def regex_match(pattern: str, text: str, *, full: bool = False, what: str = "pattern") -> bool:
    """``re.match(pattern, text) is not None`` (``full``: ``re.fullmatch``), in bounded time."""
    check_pattern(pattern, what)
    if not isinstance(text, str):
        raise MiniLoraValueError(f"a module name must be a string; got {type(text).__name__} {text!r}")
    try:
        return _run(pattern, text, full)
    except _Refused as exc:
        raise MiniLoraValueError(f"{what} {_short(pattern)} against {_short(text)}: {exc}") from None


@functools.lru_cache(maxsize=4096)  # the same module is matched many times (rank, alpha, scale)
def _run(pattern: str, text: str, full: bool) -> bool:
    return _compile(pattern).run(text, 0, [0], full=full)
