"""The named-layer models (``minilora.peft.models``, ``multi_adapter``) called with junk (found by
fuzzing their public functions): a model that is not a dict of layers, sizes that are not
widths, factor lists that are not lists of {"A", "B"}, weights that are not numbers. Each is a
MiniLoraError naming the argument (was ``'str' object has no attribute 'items'``, KeyError,
``int()`` errors). Last, a bounded hypothesis fuzz: only the library's errors escape."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from helpers import expect_error
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minilora.errors import MiniLoraError, MiniLoraTypeError, ShapeError
from minilora.peft import models as M
from minilora.peft import multi_adapter as MA

RNG = np.random.default_rng(0)
NET = M.mlp_init(0, [4, 3, 2])
LORA = {"A": RNG.standard_normal((2, 4)), "B": RNG.standard_normal((3, 2))}


@pytest.mark.parametrize("fn", [M.adapter_names, M.merge_all, M.unmerge_all, M.lora_state, M.split_trainable,
                                M.peft_modules])
@pytest.mark.parametrize("params", ["x", [1, 2], np.ones(3), None])
def test_a_model_that_is_not_a_dict_names_params(fn: Any, params: Any) -> None:
    expect_error(lambda: fn(params), MiniLoraTypeError, "params must be a model")


@pytest.mark.parametrize(("call", "kind", "fragment"), [
    (lambda: M.mlp_init(0, True), MiniLoraTypeError, "sizes"),
    (lambda: M.mlp_init(0, [4, "A"]), MiniLoraTypeError, "sizes[1]"),
    (lambda: M.attention_init(0, "8", 2), MiniLoraTypeError, "d_model"),
    (lambda: M.layer_forward("x", np.ones((2, 4))), MiniLoraTypeError, "layer"),
    (lambda: M.layer_forward({"b": np.ones(3)}, np.ones((2, 4))), MiniLoraError, "'W'"),
    (lambda: M.mlp_forward([1, 2], np.ones((2, 4))), MiniLoraTypeError, "params must be a model"),
    (lambda: M.attention_forward(NET, np.ones((2, 3, 4))), MiniLoraError, "attn.q_proj"),
    (lambda: M.attention_forward(M.attention_init(0, 4, 2), np.ones((2, 4))), ShapeError, "(batch, seq, d_model)"),
    (lambda: M.split_trainable({"fc": np.ones(3)}), MiniLoraTypeError, "params['fc']"),
    (lambda: M.attach_peft_adapter(NET, {"A": 1}), MiniLoraTypeError, "PeftAdapter"),
    (lambda: MA.combine_factors({"A": 1}, [1.0], [1.0]), MiniLoraTypeError, "factors must be a list"),
    (lambda: MA.combine_factors([LORA], [1.0], ["x"]), MiniLoraTypeError, "weights[0]"),
    (lambda: MA.combine_factors([{"A": LORA["A"]}], [1.0], [1.0]), MiniLoraError, "'B'"),
    (lambda: MA.combine_factors([{"A": np.ones(3), "B": LORA["B"]}], [1.0], [1.0]), ShapeError, 'lora["A"]'),
    (lambda: MA.combine_adapters(NET, "default", [1.0], "new"), MiniLoraTypeError, "adapters must be a list"),
    (lambda: MA.combine_adapters(NET, ["default"], [1.0], 3), MiniLoraTypeError, "new_name"),
])
def test_junk_is_refused_naming_the_argument(call: Any, kind: type, fragment: str) -> None:
    expect_error(call, kind, fragment)


def test_the_checked_models_still_work() -> None:
    net = M.add_lora(NET, ["layers.0"], 2, 4.0, rng=1, init="gaussian")
    x = RNG.standard_normal((5, 4))
    merged = M.merge_all(net)
    assert np.allclose(M.mlp_forward(merged, x), M.mlp_forward(net, x))
    both = MA.add_adapter(net, "second", ["layers.0"], 2, 4.0, rng=2, init="gaussian")
    combined = MA.combine_adapters(both, ["default", "second"], [1.0, 0.5], "mix", method="cat")
    assert M.adapter_names(combined) == ["default", "second", "mix"]


JUNK = st.sampled_from([
    None, "x", "", 1, 0, -1, 1.5, float("nan"), True, [], {}, (3, 4), [4, 3, 2], np.ones(3), np.ones((2, 4)),
    np.ones((2, 3, 4)), NET, {"fc": np.ones(3)}, {"fc": {"W": "x"}}, LORA, [LORA], ["default"], [1.0], object(),
])
CALLS = {
    "mlp_init": lambda a, b: M.mlp_init(0, a),
    "attention_init": lambda a, b: M.attention_init(0, a, b),
    "layer_forward": lambda a, b: M.layer_forward(a, b),
    "mlp_forward": lambda a, b: M.mlp_forward(a, b),
    "attention_forward": lambda a, b: M.attention_forward(a, b),
    "adapter_names": lambda a, b: M.adapter_names(a),
    "merge_all": lambda a, b: M.merge_all(a, b),
    "unmerge_all": lambda a, b: M.unmerge_all(a, b),
    "lora_state": lambda a, b: M.lora_state(a, b),
    "split_trainable": lambda a, b: M.split_trainable(a, adapters=b),
    "peft_modules": lambda a, b: M.peft_modules(a),
    "add_lora": lambda a, b: M.add_lora(a, b, 2, 4.0, rng=0),
    "combine_factors": lambda a, b: MA.combine_factors(a, b, b),
    "combine_adapters": lambda a, b: MA.combine_adapters(a, b, [1.0], "new"),
    "delete_adapter": lambda a, b: MA.delete_adapter(a, b),
}


@settings(max_examples=300, deadline=2000, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(CALLS)), JUNK, JUNK)
def test_junk_arguments_raise_only_library_errors(name: str, a: Any, b: Any) -> None:
    with np.errstate(all="ignore"):
        try:
            CALLS[name](a, b)
        except MiniLoraError:
            pass
