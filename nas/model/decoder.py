"""A Llama-style decoder whose value-residual plan is data.

RMSNorm, rotary position embeddings on Q and K, SwiGLU MLP, causal scaled-dot-product
attention, untied input and output embeddings, no biases, as in the ResFormer paper. The value
residual (`nas.model.residual`) hooks into attention right after the value projection and after
attention; with `mode: vanilla` this is a plain Llama. `Decoder.generate` samples through a
key/value cache (`KVCache`) that the same forward fills. Plain PyTorch: nothing here knows of
Lightning or Optuna. One piece (about 420 lines), as nanoGPT's model.py: the blocks, the cache
that their forward fills and the formulas sized from them read best side by side.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nas.config import ModelConfig, RunConfig, ValueResidualConfig
from nas.model.residual import ValueResidual
from nas.modes import MODES

TOKEN_DTYPE = torch.long  # token ids, as the cache keeps them where a plan looks values up


def rotary_tables(head_dim: int, seq_len: int, theta: float) -> tuple[Tensor, Tensor]:
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()  # (T, head_dim / 2)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x1, x2) of the last dim of x (B, H, T, hd) by the position's angle."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


def heads(x: Tensor, n_head: int) -> Tensor:
    """(B, T, C) -> (B, H, T, C / H)."""
    B, T, _ = x.shape
    return x.view(B, T, n_head, -1).transpose(1, 2)


def causal_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """Each query attends over the keys at or before its position. The queries are the last
    q.shape[-2] of the key positions: all of them in training, the new ones with a cache.
    `mask` (B, 1, n_q, n_k), from `padding_mask`, replaces that rule for a padded batch."""
    n_q, n_k = q.shape[-2], k.shape[-2]
    if mask is None and n_q == n_k:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if mask is None:
        # is_causal aligns the mask to the first key; query i sits at key position n_k - n_q + i
        mask = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril(n_k - n_q)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def padding_mask(tokens: Tensor, n_q: int) -> Tensor:
    """tokens (B, n_k): True (or 1) where a position holds a token, False at padding (the
    `attention_mask` of transformers) -> (B, 1, n_q, n_k): what each of the last n_q positions
    attends to, the tokens at or before it, and itself. A padding query's row must not be
    empty: its output is never read, but a NaN from an empty softmax would reach the real
    tokens through the values the later layers read at its position."""
    n_k = tokens.shape[1]
    ones = torch.ones(n_q, n_k, dtype=torch.bool, device=tokens.device)
    causal = ones.tril(n_k - n_q)
    itself = causal & ~ones.tril(n_k - n_q - 1)
    return (causal & (tokens.bool()[:, None, None, :] | itself)).contiguous()


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, has_value_proj: bool):
        super().__init__()
        d = cfg.d_model
        self.n_head = cfg.n_head
        self.wq = nn.Linear(d, d, bias=False)
        self.wk = nn.Linear(d, d, bias=False)
        self.wv = nn.Linear(d, d, bias=False) if has_value_proj else None
        self.wo = nn.Linear(d, d, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, sources: list[Tensor],
                residual: ValueResidual, layer: int,
                trace: list[dict[str, Tensor]] | None = None,
                cache: KVCache | None = None, mask: Tensor | None = None
                ) -> tuple[Tensor, Tensor]:
        """Returns the block output and this layer's values (a source for later layers).
        With `trace`, appends this layer's rotated queries and keys, own values V_n and the
        values attention uses V'_n (for `nas.model.analysis`). With `cache`, x holds the new
        positions only and attention also reads the cached ones. `mask`: see
        `causal_attention`."""
        B, T, C = x.shape
        H = self.n_head
        v = self.wv(x) if self.wv is not None else None
        v_mixed = residual.before(layer, v, sources, x)
        q = apply_rotary(heads(self.wq(x), H), cos, sin)
        k = apply_rotary(heads(self.wk(x), H), cos, sin)
        v_heads = heads(v_mixed, H)
        # with a cache: the keys and values of every position so far, the new ones last
        keys, values = (k, v_heads) if cache is None else cache.append(layer, k, v_heads)
        u = causal_attention(q, keys, values, mask).transpose(1, 2).reshape(B, T, C)
        own = v if v is not None else v_mixed
        if trace is not None:
            trace.append({"q": q.detach(), "k": k.detach(), "values": own.detach(),
                          "mixed_values": v_mixed.detach()})
        return self.wo(residual.after(layer, u, own, sources)), own


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w_gate = nn.Linear(cfg.d_model, cfg.ffn, bias=False)
        self.w_up = nn.Linear(cfg.d_model, cfg.ffn, bias=False)
        self.w_down = nn.Linear(cfg.ffn, cfg.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, has_value_proj: bool):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg, has_value_proj)
        self.mlp_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, h: Tensor, cos: Tensor, sin: Tensor, sources: list[Tensor],
                residual: ValueResidual, layer: int,
                trace: list[dict[str, Tensor]] | None = None,
                cache: KVCache | None = None, mask: Tensor | None = None
                ) -> tuple[Tensor, Tensor]:
        a, v = self.attn(self.attn_norm(h), cos, sin, sources, residual, layer, trace, cache,
                         mask)
        h = h + a
        return h + self.mlp(self.mlp_norm(h)), v


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig, value_residual: ValueResidualConfig | None = None):
        super().__init__()
        self.cfg = cfg
        self.residual = ValueResidual(cfg, value_residual or ValueResidualConfig())
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(
            Block(cfg, self.residual.has_value_proj(i)) for i in range(cfg.n_layer)
        )
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        cos, sin = rotary_tables(cfg.head_dim, cfg.seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self._init_weights()

    def _init_weights(self) -> None:
        """GPT-2 init: N(0, 0.02), residual-branch outputs scaled by 1/sqrt(2 * n_layer)."""
        coefficients = set(self.residual.coefficient_parameters())
        for name, p in self.named_parameters():
            if p in coefficients:
                continue  # mixing coefficients keep the init their form chose
            if p.dim() == 2:
                std = 0.02
                if name.endswith(("wo.weight", "w_down.weight")):
                    std /= math.sqrt(2 * self.cfg.n_layer)
                nn.init.normal_(p, mean=0.0, std=std)

    def forward(self, idx: Tensor, trace: list[dict[str, Tensor]] | None = None,
                cache: KVCache | None = None, attention_mask: Tensor | None = None) -> Tensor:
        """idx (B, T) int64 -> logits (B, T, vocab_size). `trace`, a list, receives one entry
        per layer (see Attention.forward). With `cache`, idx are the tokens that follow the
        ones it holds: they attend over those too, and the cache then holds them as well.

        `attention_mask` (B, cached + T), 1 where a position holds a token and 0 at padding
        (transformers' convention; left padding, as for generation): padding is attended by
        no token, and each row's positions count its own tokens only, so a padded row's
        logits at its tokens are those of the row alone."""
        B, T = idx.shape
        if T > self.cfg.seq_len:
            raise ValueError(f"sequence length {T} exceeds model.seq_len={self.cfg.seq_len}")
        start = 0 if cache is None else cache.advance(idx)
        mask = None
        if attention_mask is None:
            cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]
        else:
            if attention_mask.shape != (B, start + T):
                raise ValueError(f"attention_mask of shape {tuple(attention_mask.shape)}: must "
                                 f"be {(B, start + T)}, the cached and new positions")
            positions = (attention_mask.long().cumsum(1) - 1).clamp(min=0)[:, start:]
            cos, sin = self.rope_cos[positions][:, None], self.rope_sin[positions][:, None]
            mask = padding_mask(attention_mask, T)
        h = self.tok_emb(idx)
        # Every mix reads other layers' values at the same position only: the sources of the
        # new positions, computed here, are all a cached forward needs.
        sources = self.residual.initial_sources(idx)
        for i, block in enumerate(self.blocks):
            h, v = block(h, cos, sin, sources, self.residual, i, trace, cache, mask)
            sources.append(v)
        return self.lm_head(self.norm(h))

    @torch.no_grad()
    def generate(self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None) -> Tensor:
        """idx (B, T) followed by `max_new_tokens` sampled tokens (nanoGPT's signature and
        sampling rule, see `sample`); each new token goes through the model alone, attending
        over a `KVCache` of the earlier ones.

        The context is at most seq_len tokens (the rotary tables end there). A full cache is
        rebuilt from the last half window of tokens by one forward over them, so positions
        start at 0 again and the context holds seq_len / 2 to seq_len tokens: llama.cpp's
        context shift, but recomputed, since every layer above the first reads all earlier
        positions through the layers below.
        """
        window = self.cfg.seq_len
        cache: KVCache | None = None
        for left in range(max_new_tokens, 0, -1):
            if cache is None or cache.length == cache.capacity:
                context = idx[:, -window:] if cache is None else idx[:, -max(1, window // 2):]
                # room for every token still to be fed: all but the last one sampled
                cache = KVCache(self, idx.shape[0], min(window, context.shape[1] + left - 1))
                logits = self(context, cache=cache)
            else:
                logits = self(idx[:, -1:], cache=cache)
            idx = torch.cat((idx, sample(logits[:, -1], temperature, top_k)), dim=1)
        return idx

    def embedding_params(self) -> int:
        """Input lookup tables (token and value embeddings): no FLOPs per token."""
        return self.tok_emb.weight.numel() + sum(
            table.weight.numel() for table in self.residual.tables())


class KVCache:
    """What `Decoder.forward(idx, cache=...)` keeps of the positions already fed, so that a new
    token attends over them without recomputing them.

    Per layer, allocated up front for `capacity` positions at the dtype attention reads them in
    (the model's, or the autocast dtype where it is on: a mixed precision): the rotated
    keys and the values attention reads (V'_n, after the mix). A layer without a value
    projection of its own (`Mode.own_values` False: svformer's receiving layers) attends over
    V_src itself, which is there already: layer 0's cached values, or rows of the value-embedding
    table, looked up by the token ids the cache then keeps. Such a layer caches keys only.
    Nothing else is cached (see `kv_bytes_per_token`, which counts the same tensors from the
    config).
    """

    def __init__(self, model: Decoder, batch_size: int, capacity: int):
        cfg = model.cfg
        if not 1 <= capacity <= cfg.seq_len:
            raise ValueError(f"cache capacity {capacity}: must be in 1..{cfg.seq_len} "
                             "(model.seq_len)")
        weight = model.lm_head.weight
        device = weight.device
        # Under autocast attention casts K and V to the half type anyway (as kv_bytes_per_token
        # counts them); the float32 weights of a mixed precision would double the cache.
        dtype = (torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type)
                 else weight.dtype)
        shape = (batch_size, cfg.n_head, capacity, cfg.head_dim)
        self.capacity, self.length = capacity, 0
        self.n_head = cfg.n_head
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(cfg.n_layer)]
        self.values = [torch.empty(shape, dtype=dtype, device=device)
                       if model.residual.has_value_proj(i) else None for i in range(cfg.n_layer)]
        # A keys-only layer whose source is the value embedding reads the table by token.
        self.table = (model.residual.value_embedding
                      if any(v is None for v in self.values) else None)
        self.tokens = None if self.table is None else torch.empty(
            batch_size, capacity, dtype=TOKEN_DTYPE, device=device)

    def advance(self, idx: Tensor) -> int:
        """Take the tokens idx (B, T) after the cached ones; returns the first one's position."""
        start = self.length
        if start + idx.shape[1] > self.capacity:
            raise ValueError(f"{start} cached + {idx.shape[1]} new tokens exceed the cache's "
                             f"capacity {self.capacity}")
        self.length += idx.shape[1]
        if self.tokens is not None:
            self.tokens[:, start:self.length] = idx
        return start

    def append(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store `layer`'s keys and values (B, H, T, hd) of the T positions last advanced over;
        returns those of every position so far."""
        own = self.values[layer]
        values = self._store(own, v) if own is not None else self.source_values()
        return self._store(self.keys[layer], k), values

    def _store(self, buffer: Tensor, new: Tensor) -> Tensor:
        buffer[:, :, self.length - new.shape[2]:self.length] = new
        return buffer[:, :, :self.length]

    def source_values(self) -> Tensor:
        """V_src at every position so far, in heads: layer 0's cached values, or the
        value-embedding rows of the tokens."""
        if self.table is None:
            return self.values[0][:, :, :self.length]
        return heads(self.table(self.tokens[:, :self.length]), self.n_head)

    @property
    def nbytes(self) -> int:
        """Bytes the cache holds (for all `capacity` positions)."""
        return sum(t.nbytes for t in (*self.keys, *self.values, self.tokens) if t is not None)


def sample(logits: Tensor, temperature: float = 1.0, top_k: int | None = None) -> Tensor:
    """One token per row of logits (B, vocab) -> (B, 1), drawn from softmax(logits /
    temperature) restricted to the `top_k` most likely tokens where given (nanoGPT's rule);
    temperature 0 is its limit, the most likely token (greedy, as in Hugging Face's and
    llama.cpp's tools)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, dim=-1), num_samples=1)


def build_model(cfg: RunConfig) -> Decoder:
    """The model for a run config; `n_params` is `sum(p.numel() for p in model.parameters())`."""
    return Decoder(cfg.model, cfg.value_residual)


def count_params(cfg: RunConfig) -> dict[str, int]:
    """Exact parameter counts without allocating weights (built on the meta device)."""
    with torch.device("meta"):
        model = build_model(cfg)
    total = sum(p.numel() for p in model.parameters())
    return {"n_params": total, "n_params_non_embedding": total - model.embedding_params()}


# Lightning's `train.precision` names (less "-true" or "-mixed") -> the dtype K and V are
# computed in: a mixed precision runs the projections in the half type under autocast.
PRECISION_DTYPES = {
    "64": torch.float64, "32": torch.float32, "16": torch.float16, "bf16": torch.bfloat16,
    "transformer-engine": torch.bfloat16, "transformer-engine-float16": torch.float16,
}


def precision_dtype(precision: str) -> torch.dtype:
    """The activation dtype of a Lightning precision: "32-true" -> float32, "bf16-mixed" ->
    bfloat16, "16-mixed" -> float16."""
    name = precision.removesuffix("-true").removesuffix("-mixed")
    if name not in PRECISION_DTYPES:
        raise ValueError(f"train.precision {precision!r}: unknown; allowed: "
                         f"{', '.join(PRECISION_DTYPES)} (with -true or -mixed)")
    return PRECISION_DTYPES[name]


def training_bytes(cfg: RunConfig, attention_weights: bool) -> int:
    """A rough estimate of a training run's peak memory from its config alone (the model is
    built on the meta device to count its parameters): float32 weights, gradients and AdamW's
    two moments, 16 bytes a parameter; the activations a step keeps for its backward pass, at
    the training dtype: per token and layer the norms, Q, K, V, the attention output and the
    SwiGLU's four, about 10 d_model + 4 ffn numbers, and with `attention_weights` (the CPU's
    math kernel keeps them; the GPU's fused kernels do not) seq_len numbers per head; and the
    float32 logits, their softmax and its gradient. Raises ValueError for an unknown
    precision."""
    m, t = cfg.model, cfg.train
    tokens = t.batch_size * m.seq_len
    per_layer = tokens * (10 * m.d_model + 4 * m.ffn + (m.n_head * m.seq_len
                                                         if attention_weights else 0))
    activations = m.n_layer * per_layer * precision_dtype(t.precision).itemsize
    return 16 * count_params(cfg)["n_params"] + activations + 3 * 4 * tokens * m.vocab_size


def kv_bytes_per_token(cfg: RunConfig) -> int:
    """Bytes a `KVCache` holds per token of one sequence, at the training dtype: for every
    layer its keys and its values, n_head x head_dim = d_model numbers each (no grouped-query
    attention here), less the values of the layers without a value projection of their own.

    Per mode: vanilla, resformer, learnable, learnable_plus, gated and dense cache K and the
    mixed values V'_n of every layer, nothing more: a mix reads V_src and (dense) every earlier
    layer's values at the new token's position only, and the forward computes those for the
    new token anyway. neutreno caches K and V_n; its correction after attention reads V_src and
    V_n of the new position only. svformer's receiving layers cache K only and attend over
    V_src: layer 0's values, cached already, or with a value-embedding source the table's rows
    for the tokens so far, a lookup for which the cache keeps the token ids (int64, whatever the
    dtype). Otherwise a value-embedding source costs nothing per token: the mixes look up the
    new token's row. So do the value-embedding family's tables (ve_unet, ve_unet_gated): a layer
    that reads one caches its mixed values V'_n, K and V' as every layer.
    """
    m, vr = cfg.model, cfg.value_residual
    keys_only = [] if MODES[vr.mode].own_values else vr.receiving(m.n_layer)
    row = m.d_model * precision_dtype(cfg.train.precision).itemsize
    token_ids = TOKEN_DTYPE.itemsize if keys_only and vr.source == "value_embedding" else 0
    return (2 * m.n_layer - len(keys_only)) * row + token_ids


# The fixed decode measurement (`decode_tokens_per_s`): the same prompt and length for every
# trial, so that trials of one study compare; short, so that it costs tiny trials little.
DECODE_PROMPT, DECODE_TOKENS, DECODE_REPEATS = 8, 32, 3


@torch.no_grad()
def decode_tokens_per_s(model: Decoder, precision: str = "32-true",
                        repeats: int = DECODE_REPEATS) -> float:
    """Tokens a second that `Decoder.generate` produces through its cache for one sequence on
    the model's device: after a fixed prompt of DECODE_PROMPT tokens (its prefill counted in
    the time), DECODE_TOKENS new ones (fewer where seq_len leaves no room: a full cache would
    be rebuilt, which is not the steady state measured here). One untimed warm-up, then the
    best of `repeats` runs: the least disturbed by whatever else the machine does. Computed as
    training computed it, under autocast for a mixed precision. Leaves the global random state
    and the model's train/eval mode as they were."""
    cfg = model.cfg
    prompt_len = min(DECODE_PROMPT, cfg.seq_len // 2)
    new = min(DECODE_TOKENS, cfg.seq_len - prompt_len)
    device = model.lm_head.weight.device
    prompt = (torch.arange(prompt_len, device=device) % cfg.vocab_size).unsqueeze(0)
    mixed = precision.endswith("-mixed")
    autocast = torch.autocast(device.type, dtype=precision_dtype(precision), enabled=mixed)
    was_training = model.training
    model.eval()
    best = math.inf
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), autocast:
            for run in range(repeats + 1):
                start = time.perf_counter()
                model.generate(prompt, new, top_k=1)  # top_k 1: the same tokens every run
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if run:  # run 0 warms up (allocations, kernel selection)
                    best = min(best, time.perf_counter() - start)
    finally:
        model.train(was_training)
    return new / best
