"""The variants' public functions called with junk (found by fuzzing them with None, strings,
dicts, arrays of other shapes and dtypes): a MiniLoraError naming the argument, not NumPy's raw
IndexError/KeyError/TypeError from inside the arithmetic. Last, a bounded hypothesis fuzz: only
the library's errors escape."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from helpers import expect_error
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minilora import variants as V
from minilora.errors import MiniLoraError, MiniLoraTypeError, MiniLoraValueError, ShapeError

RNG = np.random.default_rng(0)
W = RNG.standard_normal((3, 4))
LORA = {"A": RNG.standard_normal((2, 4)), "B": RNG.standard_normal((3, 2))}
M = np.ones(3)


@pytest.mark.parametrize(("call", "kind", "fragment"), [
    (lambda: V.embedding_delta({"A": LORA["A"]}), MiniLoraError, "'B'"),
    (lambda: V.embedding_delta(np.ones(3)), MiniLoraError, "lora"),
    (lambda: V.embedding_delta({"A": np.ones(3), "B": LORA["B"]}), ShapeError, 'lora["A"]'),
    (lambda: V.lora_bias_merge({"W": W, "b": np.ones(3)}, LORA), MiniLoraError, "'bias'"),
    (lambda: V.lora_bias_merge({"W": W}, {**LORA, "bias": np.ones(3)}), MiniLoraError, "'b'"),
    (lambda: V.lora_bias_merge({"W": W, "b": np.ones(3)}, {**LORA, "bias": np.ones(2)}), ShapeError, 'lora["bias"]'),
    (lambda: V.lora_bias_merge({"W": W, "b": np.ones(3)}, {**LORA, "bias": np.ones(3)}, sign=2.0), MiniLoraValueError,
     "sign"),
    (lambda: V.dora_unmerge({"W": W}, {"A": LORA["A"]}, M, M), MiniLoraError, "'B'"),
    (lambda: V.dora_unmerge({"W": W}, LORA, "x", M), MiniLoraError, "magnitude"),
    (lambda: V.dora_unmerge({"W": W}, LORA, M, np.ones(2)), ShapeError, "weight_norm"),
    (lambda: V.dora_unmerge({"W": np.ones(3)}, LORA, M, M), ShapeError, 'params["W"]'),
    (lambda: V.dora_magnitude({"W": np.ones(3)}, LORA), ShapeError, 'params["W"]'),
    (lambda: V.pissa_init({"W": W}, 2), MiniLoraTypeError, "W"),
    (lambda: V.olora_init("", 2), MiniLoraTypeError, "W"),
    (lambda: V.randomized_svd(None, 2, 1, 0), MiniLoraTypeError, "M"),
    (lambda: V.randomized_svd(np.ones(3), 2, 1, 0), ShapeError, "M"),
    (lambda: V.randomized_svd(W, "q", 1, 0), MiniLoraError, "rank"),
    (lambda: V.randomized_svd(W, 2, -1, 0), MiniLoraError, "niter"),
    (lambda: V.embedding_lora_init(0, (3, 4), 4, 2), MiniLoraTypeError, "num_embeddings"),
    (lambda: V.embedding_lora_init(0, 3, "4", 2), MiniLoraTypeError, "dim"),
    (lambda: V.loraplus_lrs(LORA, "x", 16.0), MiniLoraTypeError, "lr"),
    (lambda: V.loraplus_lrs(LORA, 1e-3, np.ones(2)), MiniLoraTypeError, "ratio"),
    (lambda: V.loraplus_lrs(LORA, 1e-3, 16.0, embeddings="emb"), MiniLoraTypeError, "embeddings"),
])
def test_junk_is_refused_naming_the_argument(call: Any, kind: type, fragment: str) -> None:
    expect_error(call, kind, fragment)


def test_the_checked_paths_still_give_the_same_answers() -> None:
    lb = {**LORA, "bias": np.arange(3.0)}
    out = V.lora_bias_merge({"W": W, "b": np.ones(3)}, lb, scale=2.0)
    assert np.array_equal(out["b"], np.ones(3) + 2.0 * np.arange(3.0))
    back = V.lora_bias_merge(out, lb, scale=2.0, sign=-1.0)
    assert np.allclose(back["W"], W) and np.allclose(back["b"], np.ones(3))
    assert np.array_equal(V.embedding_delta(LORA, scale=0.5), 0.5 * (LORA["B"] @ LORA["A"]).T)
    m = V.dora_magnitude({"W": W}, LORA)
    merged, norm = V.dora_merge({"W": W}, LORA, m)
    assert np.allclose(V.dora_unmerge(merged, LORA, m, norm)["W"], W)
    lrs, wds = V.loraplus_lrs(LORA, 1e-3, 16.0)
    assert lrs == {"A": 1e-3, "B": 16e-3} and wds == {"A": 0.0, "B": 0.0}


JUNK = st.sampled_from([
    None, "x", "", 1, 0, -1, 2, 1.5, float("nan"), True, [], {}, (3, 4), np.float64(2), np.ones(3), np.ones(4),
    np.ones((3, 4), np.int64), np.ones((3, 4), complex), np.ones((0, 4)), np.ones((3, 4, 1)), W, LORA, {"W": W},
    {"W": W, "b": np.ones(3)}, {"A": LORA["A"]}, {**LORA, "bias": np.ones(3)}, {**LORA, "bias": "x"}, object(),
])
CALLS = {
    "dora_magnitude": lambda a, b, c, d: V.dora_magnitude(a, b, scale=c),
    "dora_dense": lambda a, b, c, d: V.dora_dense(a, b, c, d),
    "dora_merge": lambda a, b, c, d: V.dora_merge(a, b, c, scale=d),
    "dora_unmerge": lambda a, b, c, d: V.dora_unmerge(a, b, c, d),
    "lora_bias_dense": lambda a, b, c, d: V.lora_bias_dense(a, b, c, scale=d),
    "lora_bias_merge": lambda a, b, c, d: V.lora_bias_merge(a, b, scale=c, sign=d),
    "embedding_lora_init": lambda a, b, c, d: V.embedding_lora_init(a, b, c, d),
    "lora_embedding": lambda a, b, c, d: V.lora_embedding(a, b, c, scale=d),
    "embedding_delta": lambda a, b, c, d: V.embedding_delta(a, scale=b),
    "embedding_merge": lambda a, b, c, d: V.embedding_merge(a, b, scale=c, magnitude=d),
    "embedding_unmerge": lambda a, b, c, d: V.embedding_unmerge(a, b, scale=c),
    "pissa_init": lambda a, b, c, d: V.pissa_init(a, b, scale=c),
    "olora_init": lambda a, b, c, d: V.olora_init(a, b, scale=c),
    "orthogonal_init": lambda a, b, c, d: V.orthogonal_init(a, b, c),
    "randomized_svd": lambda a, b, c, d: V.randomized_svd(a, b, c, d),
    "loraplus_lrs": lambda a, b, c, d: V.loraplus_lrs(a, b, c),
    "adam_step_lrs": lambda a, b, c, d: V.adam_step_lrs(a, b, c, lrs=d),
}


@settings(max_examples=400, deadline=2000, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(CALLS)), JUNK, JUNK, JUNK, JUNK)
def test_junk_arguments_raise_only_library_errors(name: str, a: Any, b: Any, c: Any, d: Any) -> None:
    with np.errstate(all="ignore"):
        try:
            CALLS[name](a, b, c, d)
        except MiniLoraError:
            pass
