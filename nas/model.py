"""A Llama-style decoder whose value-residual plan is data.

RMSNorm, rotary position embeddings on Q and K, SwiGLU MLP, causal scaled-dot-product
attention, untied input and output embeddings, no biases, as in the ResFormer paper. The value
residual (`nas.residual`) hooks into attention right after the value projection and after
attention; with `mode: vanilla` this is a plain Llama. Plain PyTorch: nothing here knows of
Lightning or Optuna.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig, RunConfig, ValueResidualConfig
from .residual import ValueResidual


def rotary_tables(head_dim: int, seq_len: int, theta: float) -> tuple[Tensor, Tensor]:
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()  # (T, head_dim / 2)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x1, x2) of the last dim of x (B, H, T, hd) by the position's angle."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


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
                trace: list[dict[str, Tensor]] | None = None) -> tuple[Tensor, Tensor]:
        """Returns the block output and this layer's values (a source for later layers).
        With `trace`, appends this layer's rotated queries and keys, own values V_n and the
        values attention uses V'_n (for `nas.analysis`)."""
        B, T, C = x.shape
        H = self.n_head
        v = self.wv(x) if self.wv is not None else None
        v_mixed = residual.before(layer, v, sources, x)
        q = apply_rotary(self.wq(x).view(B, T, H, -1).transpose(1, 2), cos, sin)
        k = apply_rotary(self.wk(x).view(B, T, H, -1).transpose(1, 2), cos, sin)
        u = F.scaled_dot_product_attention(
            q, k, v_mixed.view(B, T, H, -1).transpose(1, 2), is_causal=True
        )
        u = u.transpose(1, 2).reshape(B, T, C)
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
                trace: list[dict[str, Tensor]] | None = None) -> tuple[Tensor, Tensor]:
        a, v = self.attn(self.attn_norm(h), cos, sin, sources, residual, layer, trace)
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

    def forward(self, idx: Tensor, trace: list[dict[str, Tensor]] | None = None) -> Tensor:
        """idx (B, T) int64 -> logits (B, T, vocab_size). `trace`, a list, receives one entry
        per layer (see Attention.forward)."""
        T = idx.shape[1]
        if T > self.cfg.seq_len:
            raise ValueError(f"sequence length {T} exceeds model.seq_len={self.cfg.seq_len}")
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        h = self.tok_emb(idx)
        sources = self.residual.initial_sources(idx)
        for i, block in enumerate(self.blocks):
            h, v = block(h, cos, sin, sources, self.residual, i, trace)
            sources.append(v)
        return self.lm_head(self.norm(h))

    def embedding_params(self) -> int:
        """Input lookup tables (token and value embeddings): no FLOPs per token."""
        n = self.tok_emb.weight.numel()
        if self.residual.value_embedding is not None:
            n += self.residual.value_embedding.weight.numel()
        return n


def build_model(cfg: RunConfig) -> Decoder:
    """The model for a run config; `n_params` is `sum(p.numel() for p in model.parameters())`."""
    return Decoder(cfg.model, cfg.value_residual)


def count_params(cfg: RunConfig) -> dict[str, int]:
    """Exact parameter counts without allocating weights (built on the meta device)."""
    with torch.device("meta"):
        model = build_model(cfg)
    total = sum(p.numel() for p in model.parameters())
    return {"n_params": total, "n_params_non_embedding": total - model.embedding_params()}
