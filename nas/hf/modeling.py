"""The transformers model of a run that `nas export RUN_DIR --hf` writes: a `PreTrainedModel`
around the tool's own `Decoder`.

`nas.hf.export` writes this module's source into the exported `modeling_resformer.py`, after the
sources of nas.modes, nas.model.residual and nas.model.decoder; there its imports of those are
dropped and its import of nas.hf.configuration reads `configuration_resformer` instead. Inside nas
it runs as well (the export builds the model it saves through it), so the exported model and the
one the export checks it against are built by the same code.

The decoder reads two of nas.config's objects, a ModelConfig and a ValueResidualConfig; the
exported file has no pydantic and no nas.config, so they are stood in for by what config.json
holds (`nas.hf.configuration`): the model section's resolved values, and the plan with what nas
derived from it at export.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from nas.hf.configuration import ResFormerConfig
from nas.model.decoder import Decoder

# transformers 5 renamed the cache a model's output carries from past_key_values to cache
CACHE_FIELD = ("cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__
               else "past_key_values")


class ExportedPlan:
    """`nas.config.ValueResidualConfig` as the model reads it: the section's keys as attributes,
    and what its methods return for this model's depth (config.json's `plan`, computed by nas at
    export: the depth is fixed, so the methods ignore their `n_layer`)."""

    def __init__(self, section: dict[str, Any], plan: dict[str, Any]) -> None:
        self.__dict__.update(section)
        self._receiving = [int(layer) for layer in plan["receiving"]]
        self._tables = int(plan["tables"])
        # JSON has no integer keys: the layout is stored as [layer, table] pairs
        self._layout = {int(layer): int(table) for layer, table in plan["table_layout"]}
        self._reads = frozenset(plan["reads"])

    def receiving(self, n_layer: int) -> list[int]:
        return list(self._receiving)

    def tables(self, n_layer: int) -> int:
        return self._tables

    def table_layout(self, n_layer: int) -> dict[int, int]:
        return dict(self._layout)

    def reads(self, key: str) -> bool:
        return key in self._reads


class CacheView:
    """What `Decoder.forward` asks of its cache (`nas.model.decoder.KVCache`: `advance`, `append`),
    answered by a transformers `Cache`, so that `generate()` decodes through transformers' own
    caches (and reorders them for beam search). Each layer keeps its keys and the values its
    attention reads; a layer without values of its own (svformer's receiving layers) keeps its
    V_src there as well, so the tool's KVCache saving is not this cache's."""

    def __init__(self, cache: Cache, seq_len: int) -> None:
        self.cache = cache
        self.seq_len = seq_len

    def advance(self, idx: Tensor) -> int:
        start = self.cache.get_seq_length()
        if start + idx.shape[1] > self.seq_len:
            raise ValueError(f"{start} cached + {idx.shape[1]} new tokens exceed the model's "
                             f"context of {self.seq_len} (seq_len: the rotary tables end there)")
        return start

    def append(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.cache.update(k, v, layer)


class ResFormerForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = ResFormerConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]

    def __init__(self, config: ResFormerConfig) -> None:
        super().__init__(config)
        self.model = self.decoder(config)
        # transformers 5 builds a model to load on the meta device (see _init_weights)
        self.built_on_meta = self.model.lm_head.weight.is_meta
        self.post_init()

    @staticmethod
    def decoder(config: ResFormerConfig) -> Decoder:
        return Decoder(SimpleNamespace(**config.model),
                       ExportedPlan(config.value_residual, config.plan))

    def _init_weights(self, module: nn.Module) -> None:
        """The weights come from model.safetensors, and `Decoder` initialised itself at
        construction as the tool does: they need nothing. The buffers the decoder computes
        from its config (rotary tables, fixed coefficients) are not saved, so where transformers
        built the model on the meta device it leaves them empty: they are taken from a decoder
        built again on the CPU, by the same code from the same config."""
        if module is not self.model or not self.built_on_meta:
            return
        saved = module.state_dict().keys()
        computed = {name: b for name, b in module.named_buffers() if name not in saved}
        if any(b.is_meta for b in computed.values()):
            return  # not placed yet: transformers calls again once it has loaded the weights
        with torch.device("cpu"):
            reference = dict(self.decoder(self.config).named_buffers())
        with torch.no_grad():
            for name, buffer in computed.items():
                buffer.copy_(reference[name])

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.tok_emb

    def get_output_embeddings(self) -> nn.Linear:
        return self.model.lm_head

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                cache: Cache | None = None, past_key_values: Cache | None = None,
                labels: Tensor | None = None, **kwargs: Any) -> CausalLMOutputWithPast:
        """Logits of every position of input_ids (B, T), as `Decoder.forward` computes them;
        with a cache, input_ids follow the tokens it holds. attention_mask (B, cached + T),
        0 at padding, lets left-padded rows give the logits of each row alone. With labels
        (input_ids, or -100 to skip), the mean next-token cross-entropy as the tool trains it.
        Without a cache the context is at most seq_len tokens; `generate` goes past it with
        its cache (see prepare_inputs_for_generation)."""
        if input_ids is None:
            raise ValueError("input_ids are required (inputs_embeds are not supported)")
        cache = cache if cache is not None else past_key_values  # its older name
        seq_len = self.config.model["seq_len"]
        if cache is None and input_ids.shape[1] > seq_len:
            raise ValueError(f"{input_ids.shape[1]} tokens exceed the model's context of "
                             f"{seq_len} (max_position_embeddings); generate() continues past "
                             "it through its cache (use_cache=True, the default)")
        view = None if cache is None else CacheView(cache, seq_len)
        if attention_mask is not None:
            # after a context shift the cache holds the window only: the mask's last columns
            held = 0 if cache is None else cache.get_seq_length()
            attention_mask = attention_mask[:, -(held + input_ids.shape[1]):]
            if bool(attention_mask.all()):
                attention_mask = None  # no padding: the decoder's own causal path
        logits = self.model(input_ids, cache=view, attention_mask=attention_mask)
        loss = None if labels is None else F.cross_entropy(
            logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: cache})

    def prepare_inputs_for_generation(self, input_ids: Tensor, *args: Any,
                                      **kwargs: Any) -> dict[str, Any]:
        """transformers' inputs for the next step of `generate`, with `Decoder.generate`'s
        context shift: where the cache is full (seq_len tokens: the rotary tables end there)
        it is emptied and refilled by one forward over the last seq_len / 2 tokens, so that
        positions start at 0 again; a prompt longer than seq_len is read from its last seq_len
        tokens. Greedy decoding therefore gives `nas generate --top-k 1`'s tokens at any
        length. In a padded batch the window is the batch's, not each row's."""
        inputs = super().prepare_inputs_for_generation(input_ids, *args, **kwargs)
        cache = inputs.get(CACHE_FIELD)
        if cache is not None:
            window = self.config.model["seq_len"]
            held = cache.get_seq_length()
            if held + inputs["input_ids"].shape[1] > window:
                if held:
                    cache.crop(-held)  # a negative count: remove that many (transformers 5)
                inputs["input_ids"] = input_ids[:, -(window if held == 0
                                                     else max(1, window // 2)):]
        return inputs
