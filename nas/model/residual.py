"""Value-residual forms: how a receiving layer mixes earlier values into its own.

Every form is one small class behind one interface (`ValueMix`), named by its entry in
`nas.modes.MODES` and built by its `build(site)`. The attention block calls
`before(v, sources, x, shared)` right after the value projection (heads not yet split) and
`after(u, v, sources)` on the attention output before the output projection. `sources` holds
the values a layer may draw on, oldest first: each token's row of every value-embedding table
the plan has (`ValueResidualConfig.tables`), then the own values of the layers before. So
`sources[0]` is the residual source (the first layer's values, or the value-embedding row of
each token); only `dense` reads more than it, and the value-embedding family reads its layer's
table among the first K.

`ValueResidual` owns one mix per receiving layer plus what they share (the value-embedding
tables, learnable_plus's coefficients, which each layer's mix reads through its index), so the
model only asks it for a layer's mix, and `coefficient_parameters()` lists what the optimizer
must not decay and the initialiser must not touch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from nas.config import ModelConfig, ValueResidualConfig
from nas.modes import MODES, Mode


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
    """The ValueMix class a mode names: any subclass defined (a subclass's too), so a new mode
    needs its class and its `nas.modes` entry, nothing else."""
    found, todo = {}, [ValueMix]
    while todo:
        for sub in todo.pop().__subclasses__():
            found[sub.__name__] = sub
            todo.append(sub)
    return found[name]


def per_head(gates: Tensor, t: Tensor) -> Tensor:
    """t (B, T, C) with head h's slice of C scaled by gates[..., h] (B, T, H)."""
    B, T, C = t.shape
    H = gates.shape[-1]
    return (gates.unsqueeze(-1) * t.view(B, T, H, C // H)).view(B, T, C)


class LinearMix(ValueMix):
    """V' = lambda1 * V_src + lambda2 * V_n: `resformer` (fixed) and `learnable` (trained)."""

    def __init__(self, lambda1: float, lambda2: float, trainable: bool):
        super().__init__()
        self.trainable = trainable
        values = torch.tensor([float(lambda1), float(lambda2)])
        if trainable:
            self.lambdas = nn.Parameter(values)
        else:
            # Fixed coefficients are a tensor too: torch.compile bakes a Python float attribute
            # into the graph as a constant, so each lambda a search tries would compile the
            # model again (benchmarks/compile.py); a tensor is an input of the one graph. Not
            # in the state dict: the config sets it. The record keeps the configured values,
            # not their float32 roundings.
            self.register_buffer("lambdas", values, persistent=False)
            self.configured = (float(lambda1), float(lambda2))

    @classmethod
    def build(cls, site: Site) -> ValueMix:
        return cls(site.plan.lambda1, site.plan.lambda2, trainable=site.mode.learned)

    def before(self, v, sources, x, shared=None):
        return torch.addcmul(v * self.lambdas[1], sources[0], self.lambdas[0])

    def coefficients(self, shared=None):
        l1, l2 = self.lambdas.tolist() if self.trainable else self.configured
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
    """U_n = A_n V_n + neutreno_lambda * (V_src - V_n), added after attention (arXiv
    2312.00751)."""

    def __init__(self, lam: float):
        super().__init__()
        self.lam = float(lam)  # for the record; the graph reads the tensor (see LinearMix)
        self.register_buffer("lam_tensor", torch.tensor(self.lam), persistent=False)

    @classmethod
    def build(cls, site: Site) -> ValueMix:
        return cls(site.plan.neutreno_lambda)

    def after(self, u, v, sources):
        return torch.addcmul(u, sources[0] - v, self.lam_tensor)

    def coefficients(self, shared=None):
        return {"neutreno_lambda": self.lam}


class GatedMix(ValueMix):
    """V' = V_n + g(x) * (V_src - V_n), g = sigmoid(x W_g) per head (x-transformers, RWKV-7).

    W_g starts at zero, so every gate starts at 0.5 (the Identity ResFormer).
    """

    def __init__(self, d_model: int, n_head: int):
        super().__init__()
        self.gate = nn.Linear(d_model, n_head, bias=False)
        nn.init.zeros_(self.gate.weight)

    @classmethod
    def build(cls, site: Site) -> ValueMix:
        return cls(site.model.d_model, site.model.n_head)

    def before(self, v, sources, x, shared=None):
        return v + per_head(torch.sigmoid(self.gate(x)), sources[0] - v)

    def coefficients(self, shared=None):
        # The gate depends on the token; log its norm as a summary of how far it moved.
        return {"gate_norm": self.gate.weight.norm().item()}


class ValueEmbeddingMix(ValueMix):
    """V' = v_lambda * V_n + ve_lambda * VE_t: `ve_unet`, modded-nanogpt's value embeddings.

    VE_t is the token's row of table t, the layer's in the U-net layout
    (`ValueResidualConfig.table_layout`: table i serves layer i and layer n_layer-1-i); the
    tables are the first sources, so it is sources[t]. Both weights train, per layer, from
    the config's v_lambda and ve_lambda (modded-nanogpt's attention lambdas, 0.5 and 0.5).
    """

    def __init__(self, table: int, v_lambda: float, ve_lambda: float):
        super().__init__()
        self.table = table
        self.lambdas = nn.Parameter(torch.tensor([v_lambda, ve_lambda]))

    @classmethod
    def build(cls, site: Site) -> ValueMix:
        return cls(*cls.table_and_weights(site))

    @staticmethod
    def table_and_weights(site: Site) -> tuple[int, float, float]:
        """The layer's table and the initial weights."""
        table = site.plan.table_layout(site.model.n_layer)[site.layer]
        return table, site.plan.v_lambda, site.plan.ve_lambda

    def embedding(self, sources: list[Tensor], x: Tensor) -> Tensor:
        """The embedding term before its weight: the table's rows."""
        return sources[self.table]

    def before(self, v, sources, x, shared=None):
        return self.lambdas[0] * v + self.lambdas[1] * self.embedding(sources, x)

    def coefficients(self, shared=None):
        v_lambda, ve_lambda = self.lambdas.tolist()
        return {"v_lambda": v_lambda, "ve_lambda": ve_lambda}


class GatedValueEmbeddingMix(ValueEmbeddingMix):
    """`ve_unet_gated`: the rows also pass a per-head gate of the token's normed hidden state,
    V' = v_lambda * V_n + ve_lambda * g(x) * VE_t with g = 2 sigmoid(x W_g) (nanochat's
    ve_gate, over all of x rather than its first channels). W_g starts at zero, so g starts at
    1 and the mode starts as `ve_unet`.
    """

    def __init__(self, table: int, v_lambda: float, ve_lambda: float, d_model: int,
                 n_head: int):
        super().__init__(table, v_lambda, ve_lambda)
        self.gate = nn.Linear(d_model, n_head, bias=False)
        nn.init.zeros_(self.gate.weight)

    @classmethod
    def build(cls, site: Site) -> ValueMix:
        return cls(*cls.table_and_weights(site), site.model.d_model, site.model.n_head)

    def embedding(self, sources, x):
        return per_head(2 * torch.sigmoid(self.gate(x)), super().embedding(sources, x))

    def coefficients(self, shared=None):
        # as `gated`: the gate depends on the token, its weight norm summarises it
        return {**super().coefficients(), "gate_norm": self.gate.weight.norm().item()}


class ValueResidual(nn.Module):
    """All value-residual state of one model: the per-layer mixes and their shared parts."""

    def __init__(self, model: ModelConfig, cfg: ValueResidualConfig):
        super().__init__()
        self.cfg = cfg
        self.receiving = cfg.receiving(model.n_layer)
        n_tables = cfg.tables(model.n_layer)
        family = cfg.reads("value_embeddings")
        # The residual source's table, and the value-embedding family's (empty otherwise):
        # kept apart, so that a source table keeps its name in saved weights.
        self.value_embedding = (
            nn.Embedding(model.vocab_size, model.d_model) if n_tables and not family else None)
        self.value_embeddings = nn.ModuleList(
            nn.Embedding(model.vocab_size, model.d_model) for _ in range(n_tables if family else 0))
        self.shared = (
            LearnablePlusShared(len(self.receiving), cfg.lambda2)
            if cfg.mode == "learnable_plus" and self.receiving else None
        )
        mode = MODES[cfg.mode]
        self.mixes = nn.ModuleDict({
            str(layer): mix_class(mode.mix).build(
                Site(model, cfg, mode, layer, slot, n_sources=layer + n_tables))
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
        """svformer's receiving layers have no W_V: that is its parameter saving. Such a layer
        attends over V_src itself, so a KV cache stores no values for it
        (`nas.model.decoder.KVCache` relies on this)."""
        return MODES[self.cfg.mode].own_values or layer not in self.receiving

    def coefficient_parameters(self) -> list[nn.Parameter]:
        """Every mixing coefficient (lambdas, dense weights, gates, learnable_plus's shared
        ones): not weight-decayed, and initialised by their form, not by the model."""
        tables = {p for table in self.tables() for p in table.parameters()}
        return [p for p in self.parameters() if p not in tables]

    def tables(self) -> list[nn.Embedding]:
        """Every value-embedding table, in source order."""
        source = [] if self.value_embedding is None else [self.value_embedding]
        return [*source, *self.value_embeddings]

    def initial_sources(self, idx: Tensor) -> list[Tensor]:
        """Sources available before layer 0: each table's rows for the tokens idx."""
        return [table(idx) for table in self.tables()]

    def coefficients(self) -> dict[str, float]:
        """Every coefficient by name, e.g. `L3.lambda1`; empty for vanilla."""
        return {f"L{layer}.{name}": value
                for layer, mix in self.mixes.items()
                for name, value in mix.coefficients(self.shared).items()}

