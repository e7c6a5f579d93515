"""The transformers configuration of a model that `nas export RUN_DIR --hf` writes.

`nas.hf.export` copies this file unchanged into the exported folder as
`configuration_resformer.py`: it imports transformers only, never nas. Its `config.json` keeps
the run as nas resolved it, so that the exported model needs none of nas.config's logic:

- `model`: every field and derived size (`head_dim`, `ffn`) of the run's
  `nas.config.ModelConfig`;
- `value_residual`: the run config's `value_residual` section, every key;
- `plan`: what `nas.config.ValueResidualConfig` derives from that section for this depth (the
  receiving layers, the number of value-embedding tables and their layout, the keys the mode
  reads), which the model asks for.

The names transformers' own tools read (generate, its caches) are properties over `model`, so a
size is written once.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig


class ResFormerConfig(PretrainedConfig):
    model_type = "resformer_nas"

    def __init__(self, model: dict[str, Any] | None = None,
                 value_residual: dict[str, Any] | None = None,
                 plan: dict[str, Any] | None = None, tie_word_embeddings: bool = False,
                 **kwargs: Any) -> None:
        # transformers builds a config without arguments (to find its defaults): empty sections
        self.model = dict(model or {})
        self.value_residual = dict(value_residual or {})
        self.plan = dict(plan or {})
        # untied input and output embeddings, as the tool's decoder; transformers ties them
        # where a config does not say
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def vocab_size(self) -> int | None:
        return self.model.get("vocab_size")

    @property
    def hidden_size(self) -> int | None:
        return self.model.get("d_model")

    @property
    def num_hidden_layers(self) -> int | None:
        return self.model.get("n_layer")

    @property
    def num_attention_heads(self) -> int | None:
        return self.model.get("n_head")

    @property
    def num_key_value_heads(self) -> int | None:
        return self.model.get("n_head")  # no grouped-query attention

    @property
    def head_dim(self) -> int | None:
        return self.model.get("head_dim")

    @property
    def intermediate_size(self) -> int | None:
        return self.model.get("ffn")

    @property
    def max_position_embeddings(self) -> int | None:
        return self.model.get("seq_len")  # the rotary tables end there
