"""The value-residual modes: one table that the config, the search space, the model, the analysis
and the docs read. Adding a mode is one entry here and its mix class in `nas.model.residual`
(docs/ARCHITECTURE.md shows the whole diff of an example).

Each entry says which `value_residual` keys the mode reads (the space suggests only these),
whether its coefficients train, which `ValueMix` class builds a receiving layer's mix, whether
a receiving layer keeps its own value projection, and how many parameters the mode adds to
vanilla (exact; tests compare it with the built model). Knows nothing of torch.

The value-embedding family (`ve_unet`, `ve_unet_gated`; modded-nanogpt's records from
2024-12-04 on) is a pair of modes rather than a third `source`: its K tables
(`value_embeddings`) feed layers in a fixed U-net layout that includes layer 0 (table i serves
layer i and its mirror, layer n_layer-1-i), which no `layers` mask can express since layer 0 is
every other mode's source; its weights `v_lambda` and `ve_lambda` are coefficients of their own,
not lambda1/lambda2 on V_src; and no other mix would know which of K sources to read. As a mode
it reuses the rest: the space suggests its keys, the tables count as sources before layer 0
(`ValueResidualConfig.tables`), the KV cache keeps its mixed values as any mode's. The per-head
gate on the embedding is the second mode, as `gated` is beside `learnable`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

# The plan without a value residual: what every variant is paired with, and the baselines run.
BASELINE_MODE = "vanilla"

# (d_model, n_head, receiving layers, sources before layer 0) -> parameters added to vanilla,
# less the value-embedding tables (the sources before layer 0: vocab_size x d_model each)
ParamFormula = Callable[[int, int, Sequence[int], int], int]


@dataclass(frozen=True)
class Mode:
    name: str
    keys: tuple[str, ...]  # the value_residual keys it reads
    learned: bool  # its coefficients train
    mix: str  # the name of its ValueMix class in nas.model.residual
    extra_params: ParamFormula
    value: str  # what a receiving layer attends over (the docs' table)
    own_values: bool = True  # a receiving layer keeps its own W_V


SOURCE_KEYS = ("layers", "source")
# the value-embedding family reads its number of tables and their initial weights
VE_KEYS = ("value_embeddings", "v_lambda", "ve_lambda")

MODES: dict[str, Mode] = {m.name: m for m in (
    Mode(BASELINE_MODE, (), False, "", lambda d, h, r, s: 0, "V_n"),
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
    Mode("neutreno", (*SOURCE_KEYS, "neutreno_lambda"), False, "NeuTRENOMix",
         lambda d, h, r, s: 0,
         "after attention: U_n = A_n V_n + neutreno_lambda (V_src - V_n)"),
    Mode("gated", SOURCE_KEYS, True, "GatedMix",
         lambda d, h, r, s: d * h * len(r), "V_n + g(x) (V_src - V_n), g per head"),
    Mode("ve_unet", VE_KEYS, True, "ValueEmbeddingMix", lambda d, h, r, s: 2 * len(r),
         "v_lambda V_n + ve_lambda VE_i, both trained per layer; table i on layers i and "
         "n_layer-1-i"),
    Mode("ve_unet_gated", VE_KEYS, True, "GatedValueEmbeddingMix",
         lambda d, h, r, s: (2 + d * h) * len(r), "v_lambda V_n + ve_lambda g(x) VE_i, g per head"),
)}

LEARNED = tuple(name for name, m in MODES.items() if m.learned)
