"""Per-layer analyses of a trained model, as the ResFormer paper makes them.

- attention entropy: how spread each query's attention is over the keys it may see (nats,
  averaged over queries, heads and sequences). Attention concentration in deep layers shows as
  low entropy; a uniform causal attention has the maximum, the mean of log(t + 1).
- value cosine: the cosine similarity of each layer's own values V_n to the first layer's V_1,
  per token, averaged; `mixed_value_cosine` does the same for the values attention uses, V'_n
  (after the residual mix), which is where value residuals act.

Plain PyTorch on a `Decoder`'s trace; nothing here knows of Lightning or Optuna.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from nas.model.decoder import Decoder


def causal_attention(q: Tensor, k: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(d)) under the causal mask: (..., T, d) -> (..., T, T)."""
    T = q.shape[-2]
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
    return scores.masked_fill(future, float("-inf")).softmax(dim=-1)


def attention_entropy(probs: Tensor) -> float:
    """Mean entropy (nats) of the attention rows in `probs` (..., T, T)."""
    plogp = torch.where(probs > 0, probs * probs.clamp_min(1e-30).log(), 0.0)
    return float(-plogp.sum(-1).mean())


def uniform_entropy(seq_len: int) -> float:
    """The entropy of uniform causal attention: query t spreads over t + 1 keys."""
    return float(torch.log(torch.arange(1, seq_len + 1, dtype=torch.float64)).mean())


def value_cosine(values: Tensor, first: Tensor) -> float:
    """Mean over tokens of cos(values_t, first_t); both (B, T, d)."""
    return float(F.cosine_similarity(values, first, dim=-1).mean())


@torch.no_grad()
def analyze(model: Decoder, idx: Tensor) -> dict[str, list[float] | float]:
    """Per-layer attention entropy and value cosines of `model` on token windows idx (B, T).

    Attention probabilities are formed one sequence at a time, so long contexts fit."""
    was_training = model.training
    model.eval()
    trace: list[dict[str, Tensor]] = []
    try:
        model(idx.to(next(model.parameters()).device), trace=trace)
    finally:
        model.train(was_training)
    first = trace[0]["values"]
    entropy = []
    for layer in trace:
        per_sequence = [attention_entropy(causal_attention(q.float(), k.float()))
                        for q, k in zip(layer["q"], layer["k"], strict=True)]
        entropy.append(sum(per_sequence) / len(per_sequence))
    return {
        "attention_entropy": entropy,
        "uniform_entropy": uniform_entropy(idx.shape[1]),
        "value_cosine": [value_cosine(t["values"], first) for t in trace],
        "mixed_value_cosine": [value_cosine(t["mixed_values"], first) for t in trace],
    }


def analysis_table(analysis: dict[str, Any], coefficients: dict[str, float],
                   receiving: list[int]) -> str:
    """The per-layer analysis and coefficients as a terminal table."""
    names = sorted({k.partition(".")[2] for k in coefficients})
    head = (f"{'layer':>5}  {'receives':>8}  {'attn entropy':>12}  {'cos(Vn,V1)':>10}  "
            f"{'cos(Vn_mixed,V1)':>16}" + "".join(f"  {n:>9}" for n in names))
    lines = [head, "-" * len(head)]
    for i, entropy in enumerate(analysis["attention_entropy"]):
        coefs = "".join(f"  {coefficients[f'L{i}.{n}']:>9.3f}" if f"L{i}.{n}" in coefficients
                        else f"  {'-':>9}" for n in names)
        lines.append(f"{i:>5}  {'yes' if i in receiving else '-':>8}  {entropy:>12.4f}  "
                     f"{analysis['value_cosine'][i]:>10.4f}  "
                     f"{analysis['mixed_value_cosine'][i]:>16.4f}" + coefs)
    lines.append(f"attention entropy is in nats; uniform causal attention over "
                 f"these windows: {analysis['uniform_entropy']:.4f}")
    return "\n".join(lines)
