"""Value-residual forms: how a receiving layer mixes earlier values into its own.

Every form is one small class behind one interface (`ValueMix`). The attention block calls
`before(v, sources, x)` right after the value projection (heads not yet split) and
`after(u, v, sources)` on the attention output before the output projection. `sources` holds
the values a layer may draw on, oldest first: `sources[0]` is the residual source (the first
layer's values, or the value-embedding row of each token), then the own values of the layers
between. Only `dense` reads more than `sources[0]`.

`ValueResidual` owns one mix per receiving layer plus what they share (the value-embedding
table, learnable_plus's softmax weights), so the model only asks it for a layer's mix.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .config import ModelConfig, ValueResidualConfig


class ValueMix(nn.Module):
    """Identity mix; subclasses override the hooks they need."""

    def before(self, v: Tensor | None, sources: list[Tensor], x: Tensor) -> Tensor:
        """V'_n from own values v (B, T, d), earlier values and the normed input x."""
        assert v is not None
        return v

    def after(self, u: Tensor, v: Tensor, sources: list[Tensor]) -> Tensor:
        """U_n from the attention output u (B, T, d)."""
        return u

    def coefficients(self) -> dict[str, float]:
        """Current mixing coefficients, for logging (learned ones change during training)."""
        return {}


class LinearMix(ValueMix):
    """V' = lambda1 * V_src + lambda2 * V_n: `resformer` (fixed) and `learnable` (trained)."""

    def __init__(self, lambda1: float, lambda2: float, trainable: bool):
        super().__init__()
        # Fixed coefficients stay Python floats: no parameters, no tensor reads per step.
        self.fixed = None if trainable else (float(lambda1), float(lambda2))
        if trainable:
            self.lambdas = nn.Parameter(torch.tensor([lambda1, lambda2]))

    def before(self, v, sources, x):
        if self.fixed is None:
            return self.lambdas[0] * sources[0] + self.lambdas[1] * v
        l1, l2 = self.fixed
        return torch.add(v * l2, sources[0], alpha=l1)

    def coefficients(self):
        l1, l2 = self.fixed if self.fixed is not None else self.lambdas.tolist()
        return {"lambda1": l1, "lambda2": l2}


class LearnablePlusShared(nn.Module):
    """Learnable-ResFormer-Plus: lambda1_n = s * softmax(w)_n over the receiving layers.

    s starts at the number of receiving layers and w at zero, so every lambda1 starts at 1;
    each lambda2_n starts at `lambda2` (0.5 by default). The paper does not publish its init;
    this one makes the start equal to the Constant ResFormer (lambda1 = 1) up to lambda2.
    """

    def __init__(self, n_receiving: int, lambda2: float):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(n_receiving)))
        self.logits = nn.Parameter(torch.zeros(n_receiving))
        self.lambda2 = nn.Parameter(torch.full((n_receiving,), float(lambda2)))

    def lambda1(self) -> Tensor:
        return self.scale * torch.softmax(self.logits, dim=0)


class LearnablePlusMix(ValueMix):
    def __init__(self, shared: LearnablePlusShared, slot: int):
        super().__init__()
        # Not registered as a submodule: ValueResidual owns it, so parameters appear once.
        object.__setattr__(self, "shared", shared)
        self.slot = slot

    def before(self, v, sources, x):
        l1 = self.shared.lambda1()[self.slot]
        return l1 * sources[0] + self.shared.lambda2[self.slot] * v

    def coefficients(self):
        return {"lambda1": self.shared.lambda1()[self.slot].item(),
                "lambda2": self.shared.lambda2[self.slot].item()}


class DenseMix(ValueMix):
    """V' = sum_i lambda_i * sources_i + lambda_own * V_n, all trainable.

    Starts at lambda1 on the residual source, lambda2 on the own values and 0 elsewhere.
    """

    def __init__(self, n_sources: int, lambda1: float, lambda2: float):
        super().__init__()
        init = torch.zeros(n_sources + 1)
        init[0], init[-1] = lambda1, lambda2
        self.weights = nn.Parameter(init)

    def before(self, v, sources, x):
        out = self.weights[-1] * v
        for w, s in zip(self.weights[:-1], sources, strict=True):
            out = out + w * s
        return out

    def coefficients(self):
        w = self.weights.tolist()
        return {"lambda1": w[0], "lambda2": w[-1],
                **{f"from{i}": wi for i, wi in enumerate(w[1:-1], start=1)}}


class SVFormerMix(ValueMix):
    """The layer has no value projection of its own and attends over the source values."""

    def before(self, v, sources, x):
        return sources[0]


class NeuTRENOMix(ValueMix):
    """U_n = A_n V_n + lambda * (V_src - V_n), added after attention (arXiv 2312.00751)."""

    def __init__(self, lam: float):
        super().__init__()
        self.lam = float(lam)

    def after(self, u, v, sources):
        return torch.add(u, sources[0] - v, alpha=self.lam)

    def coefficients(self):
        return {"lambda1": self.lam}


class GatedMix(ValueMix):
    """V' = V_n + g(x) * (V_src - V_n), g = sigmoid(x W_g) per head (x-transformers, RWKV-7).

    W_g starts at zero, so every gate starts at 0.5 (the Identity ResFormer).
    """

    def __init__(self, d_model: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.gate = nn.Linear(d_model, n_head, bias=False)
        nn.init.zeros_(self.gate.weight)

    def before(self, v, sources, x):
        B, T, C = v.shape
        g = torch.sigmoid(self.gate(x)).unsqueeze(-1)  # (B, T, H, 1)
        delta = (sources[0] - v).view(B, T, self.n_head, C // self.n_head)
        return v + (g * delta).view(B, T, C)

    def coefficients(self):
        # The gate depends on the token; log its norm as a summary of how far it moved.
        return {"gate_norm": self.gate.weight.norm().item()}


class ValueResidual(nn.Module):
    """All value-residual state of one model: the per-layer mixes and their shared parts."""

    def __init__(self, model: ModelConfig, cfg: ValueResidualConfig):
        super().__init__()
        self.cfg = cfg
        self.receiving = cfg.receiving(model.n_layer)
        self.value_embedding = (
            nn.Embedding(model.vocab_size, model.d_model)
            if cfg.source == "value_embedding" and self.receiving else None
        )
        self.shared = (
            LearnablePlusShared(len(self.receiving), cfg.lambda2)
            if cfg.mode == "learnable_plus" and self.receiving else None
        )
        offset = 1 if self.value_embedding is not None else 0
        self.mixes = nn.ModuleDict({
            str(layer): self._make_mix(model, cfg, layer, slot, n_sources=layer + offset)
            for slot, layer in enumerate(self.receiving)
        })

    def _make_mix(self, model: ModelConfig, cfg: ValueResidualConfig, layer: int, slot: int,
                  n_sources: int) -> ValueMix:
        mode = cfg.mode
        if mode == "resformer":
            return LinearMix(cfg.lambda1, cfg.lambda2, trainable=False)
        if mode == "learnable":
            return LinearMix(cfg.lambda1, cfg.lambda2, trainable=True)
        if mode == "learnable_plus":
            assert self.shared is not None
            return LearnablePlusMix(self.shared, slot)
        if mode == "dense":
            return DenseMix(n_sources, cfg.lambda1, cfg.lambda2)
        if mode == "svformer":
            return SVFormerMix()
        if mode == "neutreno":
            return NeuTRENOMix(cfg.lambda1)
        if mode == "gated":
            return GatedMix(model.d_model, model.n_head)
        raise ValueError(f"unknown value_residual.mode {mode!r}")

    def mix(self, layer: int) -> ValueMix | None:
        return self.mixes[str(layer)] if str(layer) in self.mixes else None

    def has_value_proj(self, layer: int) -> bool:
        """svformer's receiving layers have no W_V: that is its parameter saving."""
        return not (self.cfg.mode == "svformer" and layer in self.receiving)

    def initial_sources(self, idx: Tensor) -> list[Tensor]:
        """Sources available before layer 0: the value-embedding rows, if that is the source."""
        if self.value_embedding is None:
            return []
        return [self.value_embedding(idx)]

    def coefficients(self) -> dict[str, float]:
        """Every coefficient by name, e.g. `L3.lambda1`; empty for vanilla."""
        return {f"L{layer}.{name}": value
                for layer, mix in self.mixes.items()
                for name, value in mix.coefficients().items()}

