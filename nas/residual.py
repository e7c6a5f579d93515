"""Value-residual forms: how a receiving layer mixes earlier values into its own.

Every form is one small class behind one interface (`ValueMix`), named by its entry in
`nas.modes.MODES` and built by its `build(site)`. The attention block calls
`before(v, sources, x, shared)` right after the value projection (heads not yet split) and
`after(u, v, sources)` on the attention output before the output projection. `sources` holds
the values a layer may draw on, oldest first: `sources[0]` is the residual source (the first
layer's values, or the value-embedding row of each token), then the own values of the layers
between. Only `dense` reads more than `sources[0]`.

`ValueResidual` owns one mix per receiving layer plus what they share (the value-embedding
table, learnable_plus's coefficients, which each layer's mix reads through its index), so the
model only asks it for a layer's mix, and `coefficient_parameters()` lists what the optimizer
must not decay and the initialiser must not touch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .config import ModelConfig, ValueResidualConfig
from .modes import MODES, Mode


@dataclass(frozen=True)
class Site:
    """Where a mix sits: the model, the plan, the receiving layer and its index among them."""

    model: ModelConfig
    plan: ValueResidualConfig
    mode: Mode
    layer: int
    slot: int  # its index among the receiving layers
    n_sources: int  # the values available to it (the value embedding and earlier layers)


class ValueMix(nn.Module):
    """Identity mix; subclasses override the hooks they need."""

    @classmethod
    def build(cls, site: Site) -> ValueMix:
        return cls()

    def before(self, v: Tensor | None, sources: list[Tensor], x: Tensor,
               shared: nn.Module | None = None) -> Tensor:
        """V'_n from own values v (B, T, d), earlier values, the normed input x and the
        coefficients the layers share (learnable_plus)."""
        assert v is not None
        return v

    def after(self, u: Tensor, v: Tensor, sources: list[Tensor]) -> Tensor:
        """U_n from the attention output u (B, T, d)."""
        return u

    def coefficients(self, shared: nn.Module | None = None) -> dict[str, float]:
        """Current mixing coefficients, for logging (learned ones change during training)."""
        return {}


def mix_class(name: str) -> type[ValueMix]:
    """The ValueMix class a mode names: any subclass defined, so a new mode needs its class and
    its `nas.modes` entry, nothing else."""
    return {c.__name__: c for c in ValueMix.__subclasses__()}[name]


class LinearMix(ValueMix):
    """V' = lambda1 * V_src + lambda2 * V_n: `resformer` (fixed) and `learnable` (trained)."""

    def __init__(self, lambda1: float, lambda2: float, trainable: bool):
        super().__init__()
        # Fixed coefficients stay Python floats: no parameters, no tensor reads per step.
        self.fixed = None if trainable else (float(lambda1), float(lambda2))
        if trainable:
            self.lambdas = nn.Parameter(torch.tensor([lambda1, lambda2]))

    @classmethod
    def build(cls, site: Site) -> ValueMix:
        return cls(site.plan.lambda1, site.plan.lambda2, trainable=site.mode.learned)

    def before(self, v, sources, x, shared=None):
        if self.fixed is None:
            return self.lambdas[0] * sources[0] + self.lambdas[1] * v
        l1, l2 = self.fixed
        return torch.add(v * l2, sources[0], alpha=l1)

    def coefficients(self, shared=None):
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
    """A receiving layer's view of the shared coefficients (owned by ValueResidual): its slot."""

    def __init__(self, slot: int):
        super().__init__()
        self.slot = slot

    @classmethod
    def build(cls, site: Site) -> ValueMix:
        return cls(site.slot)

    def before(self, v, sources, x, shared=None):
        assert isinstance(shared, LearnablePlusShared)
        return shared.lambda1()[self.slot] * sources[0] + shared.lambda2[self.slot] * v

    def coefficients(self, shared=None):
        assert isinstance(shared, LearnablePlusShared)
        return {"lambda1": shared.lambda1()[self.slot].item(),
                "lambda2": shared.lambda2[self.slot].item()}


class DenseMix(ValueMix):
    """V' = sum_i lambda_i * sources_i + lambda_own * V_n, all trainable.

    Starts at lambda1 on the residual source, lambda2 on the own values and 0 elsewhere.
    """

    def __init__(self, n_sources: int, lambda1: float, lambda2: float):
        super().__init__()
        init = torch.zeros(n_sources + 1)
        init[0], init[-1] = lambda1, lambda2
        self.weights = nn.Parameter(init)

    @classmethod
    def build(cls, site: Site) -> ValueMix:
        return cls(site.n_sources, site.plan.lambda1, site.plan.lambda2)

    def before(self, v, sources, x, shared=None):
        out = self.weights[-1] * v
        for w, s in zip(self.weights[:-1], sources, strict=True):
            out = out + w * s
        return out

    def coefficients(self, shared=None):
        w = self.weights.tolist()
        return {"lambda1": w[0], "lambda2": w[-1],
                **{f"from{i}": wi for i, wi in enumerate(w[1:-1], start=1)}}


class SVFormerMix(ValueMix):
    """The layer has no value projection of its own and attends over the source values."""

    def before(self, v, sources, x, shared=None):
        return sources[0]


class NeuTRENOMix(ValueMix):
    """U_n = A_n V_n + lambda * (V_src - V_n), added after attention (arXiv 2312.00751)."""

    def __init__(self, lam: float):
        super().__init__()
        self.lam = float(lam)

    @classmethod
    def build(cls, site: Site) -> ValueMix:
        return cls(site.plan.lambda1)

    def after(self, u, v, sources):
        return torch.add(u, sources[0] - v, alpha=self.lam)

    def coefficients(self, shared=None):
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

    @classmethod
    def build(cls, site: Site) -> ValueMix:
        return cls(site.model.d_model, site.model.n_head)

    def before(self, v, sources, x, shared=None):
        B, T, C = v.shape
        g = torch.sigmoid(self.gate(x)).unsqueeze(-1)  # (B, T, H, 1)
        delta = (sources[0] - v).view(B, T, self.n_head, C // self.n_head)
        return v + (g * delta).view(B, T, C)

    def coefficients(self, shared=None):
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
        mode = MODES[cfg.mode]
        self.mixes = nn.ModuleDict({
            str(layer): mix_class(mode.mix).build(
                Site(model, cfg, mode, layer, slot, n_sources=layer + offset))
            for slot, layer in enumerate(self.receiving)
        })

    def mix(self, layer: int) -> ValueMix | None:
        return self.mixes[str(layer)] if str(layer) in self.mixes else None

    def before(self, layer: int, v: Tensor | None, sources: list[Tensor], x: Tensor
               ) -> Tensor | None:
        """The values layer `layer` attends over (its own where it does not receive)."""
        mix = self.mix(layer)
        return v if mix is None else mix.before(v, sources, x, self.shared)

    def after(self, layer: int, u: Tensor, v: Tensor, sources: list[Tensor]) -> Tensor:
        mix = self.mix(layer)
        return u if mix is None else mix.after(u, v, sources)

    def has_value_proj(self, layer: int) -> bool:
        """svformer's receiving layers have no W_V: that is its parameter saving."""
        return MODES[self.cfg.mode].own_values or layer not in self.receiving

    def coefficient_parameters(self) -> list[nn.Parameter]:
        """Every mixing coefficient (lambdas, dense weights, gates, learnable_plus's shared
        ones): not weight-decayed, and initialised by their form, not by the model."""
        table = set() if self.value_embedding is None else set(
            self.value_embedding.parameters())
        return [p for p in self.parameters() if p not in table]

    def initial_sources(self, idx: Tensor) -> list[Tensor]:
        """Sources available before layer 0: the value-embedding rows, if that is the source."""
        if self.value_embedding is None:
            return []
        return [self.value_embedding(idx)]

    def coefficients(self) -> dict[str, float]:
        """Every coefficient by name, e.g. `L3.lambda1`; empty for vanilla."""
        return {f"L{layer}.{name}": value
                for layer, mix in self.mixes.items()
                for name, value in mix.coefficients(self.shared).items()}

