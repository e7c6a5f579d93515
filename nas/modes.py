"""The value-residual modes: one table that the config, the search space, the model, the analysis
and the docs read. Adding a mode is one entry here and its mix class in `nas.residual`
(docs/ARCHITECTURE.md shows the whole diff of an example).

Each entry says which `value_residual` keys the mode reads (the space suggests only these),
whether its coefficients train, which `ValueMix` class builds a receiving layer's mix, whether
a receiving layer keeps its own value projection, and how many parameters the mode adds to
vanilla (exact; tests compare it with the built model). Knows nothing of torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

# (d_model, n_head, receiving layers, sources before layer 0) -> parameters added to vanilla
ParamFormula = Callable[[int, int, Sequence[int], int], int]


@dataclass(frozen=True)
class Mode:
    name: str
    keys: tuple[str, ...]  # the value_residual keys it reads
    learned: bool  # its coefficients train
    mix: str  # the name of its ValueMix class in nas.residual
    extra_params: ParamFormula
    value: str  # what a receiving layer attends over (the docs' table)
    own_values: bool = True  # a receiving layer keeps its own W_V


SOURCE_KEYS = ("layers", "source")

MODES: dict[str, Mode] = {m.name: m for m in (
    Mode("vanilla", (), False, "", lambda d, h, r, s: 0, "V_n"),
    Mode("resformer", (*SOURCE_KEYS, "lambda1", "lambda2"), False, "LinearMix",
         lambda d, h, r, s: 0, "lambda1 V_src + lambda2 V_n, fixed"),
    Mode("learnable", (*SOURCE_KEYS, "lambda1", "lambda2"), True, "LinearMix",
         lambda d, h, r, s: 2 * len(r), "the same, both trained per layer"),
    Mode("learnable_plus", (*SOURCE_KEYS, "lambda2"), True, "LearnablePlusMix",
         lambda d, h, r, s: 1 + 2 * len(r) if r else 0,
         "lambda1_n = s softmax(w)_n V_src + lambda2_n V_n, trained"),
    Mode("dense", (*SOURCE_KEYS, "lambda1", "lambda2"), True, "DenseMix",
         lambda d, h, r, s: sum(layer + s + 1 for layer in r),
         "a trained weighted sum of V_src, every earlier layer's values and V_n"),
    Mode("svformer", SOURCE_KEYS, False, "SVFormerMix",
         lambda d, h, r, s: -d * d * len(r), "V_src; the layer has no W_V", own_values=False),
    Mode("neutreno", (*SOURCE_KEYS, "lambda1"), False, "NeuTRENOMix",
         lambda d, h, r, s: 0, "after attention: U_n = A_n V_n + lambda1 (V_src - V_n)"),
    Mode("gated", SOURCE_KEYS, True, "GatedMix",
         lambda d, h, r, s: d * h * len(r), "V_n + g(x) (V_src - V_n), g per head"),
)}

LEARNED = tuple(name for name, m in MODES.items() if m.learned)
