"""minilora as an oracle: tolerances, strategies, adapters and a conformance suite.

    from minilora.testing import lora_bounds, assert_lora_close

    bounds = lora_bounds(params, lora, x, scale=s, dtype="float32", cotangent=g)
    assert_lora_close(my_y, oracle_y, bound=bounds["y"], dtype="float32")

The tolerance model (``tolerance``) is the standard floating-point bound for dot products,
|fl(x . w) - x . w| <= gamma_k |x| . |w| with gamma_k = k u / (1 - k u), carried through the
LoRA layer (docs/tolerance.md has the derivation); ``compare`` applies it and says where an answer
is off. ``problems`` holds LoRA problems as plain data, ``strategies`` has hypothesis strategies for
LoRA problems (imported on use: hypothesis is needed only there), ``adapters`` drives PyTorch,
PEFT, loralib or your own class through one protocol, ``conformance.check`` runs the properties
(``minilora check TARGET`` on the command line; the DoRA, embedding and trainable-set ones live in
``variant_checks``, with ``variant_problems`` and ``variant_bounds``), and ``pytest_plugin`` runs
them inside pytest.
"""

from __future__ import annotations

from minilora.testing.adam_tolerance import adam_bounds
from minilora.testing.compare import Comparison, ToleranceError, assert_lora_close, compare
from minilora.testing.tolerance import (
    SAFETY,
    UNIT_ROUNDOFF,
    dot_bound,
    dtype_name,
    gamma,
    lora_bounds,
    lora_magnitudes,
    probable_gamma,
    round_to,
    unit_roundoff,
)

__all__ = [
    "UNIT_ROUNDOFF",
    "SAFETY",
    "dtype_name",
    "unit_roundoff",
    "gamma",
    "probable_gamma",
    "dot_bound",
    "lora_magnitudes",
    "lora_bounds",
    "adam_bounds",
    "round_to",
    "Comparison",
    "compare",
    "assert_lora_close",
    "ToleranceError",
]
