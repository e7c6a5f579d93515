"""Parameter formulas that need no model: the vanilla model's non-embedding parameters of a
shape, which every token budget (`train.tokens_per_param`) and the compile break-even are
measured against. The model's own count is `nas.model.decoder.count_params` (built on the meta
device); tests check the two agree for vanilla.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nas.config import ModelConfig


def vanilla_non_embedding_params(m: ModelConfig) -> int:
    """Non-embedding parameters of the vanilla model of this shape (the output head counts):
    per layer two norms, Q, K, V, O and the SwiGLU MLP; a final norm; the head."""
    per_layer = 2 * m.d_model + 4 * m.d_model ** 2 + 3 * m.d_model * m.ffn
    return m.n_layer * per_layer + m.d_model + m.vocab_size * m.d_model
