"""Properties of the model for every value-residual mode, on the `device` fixture's device
(NAS_TEST_DEVICE; the CPU by default)."""

import pytest
import torch

from nas import build_model
from nas.config import SOURCES
from nas.model.decoder import count_params
from nas.modes import MODES
from tests.helpers import ALL, FAMILY, randomize_coefficients, tiny

# (mode, n_layer, tables) plans of the value-embedding family: one table, as many as fit in
# an even and in an odd depth (the middle layer then reads none).
FAMILY_PLANS = [(m, n, k) for m in FAMILY for n, k in ((4, 1), (4, 2), (5, 2))]


@pytest.mark.parametrize("mode,source", ALL)
def test_shapes_and_causality(mode, source, device):
    torch.manual_seed(0)
    model = build_model(tiny(mode, source=source)).to(device).eval()
    randomize_coefficients(model)
    idx = torch.randint(0, 256, (2, 16), device=device)
    logits = model(idx)
    assert logits.shape == (2, 16, 256)
    changed = idx.clone()
    changed[:, 10:] = torch.randint(0, 256, (2, 6), device=device)
    out2 = model(changed)
    # Positions before the change must not see it; the changed position itself must.
    torch.testing.assert_close(out2[:, :10], logits[:, :10])
    assert not torch.allclose(out2[:, 10], logits[:, 10])


@pytest.mark.parametrize("source", SOURCES)
def test_resformer_with_zero_source_weight_equals_vanilla(source, device):
    vanilla = build_model(tiny("vanilla")).to(device)
    res = build_model(tiny("resformer", lambda1=0.0, lambda2=1.0, source=source)).to(device)
    missing, unexpected = res.load_state_dict(vanilla.state_dict(), strict=False)
    assert unexpected == []
    assert all("value_embedding" in k for k in missing)
    idx = torch.randint(0, 256, (2, 16), device=device)
    torch.testing.assert_close(res(idx), vanilla(idx))


@pytest.mark.parametrize("mode", ["learnable", "dense", "neutreno", *FAMILY])
def test_other_modes_reduce_to_vanilla(mode, device):
    """learnable/dense with (0, 1), neutreno with lambda 0 and the value-embedding family with
    v_lambda 1, ve_lambda 0 are vanilla too."""
    vanilla = build_model(tiny("vanilla")).to(device)
    other = build_model(tiny(mode, lambda1=0.0, lambda2=1.0, neutreno_lambda=0.0,
                             v_lambda=1.0, ve_lambda=0.0)).to(device)
    other.load_state_dict(vanilla.state_dict(), strict=False)
    idx = torch.randint(0, 256, (2, 16), device=device)
    torch.testing.assert_close(other(idx), vanilla(idx))


def test_resformer_differs_from_vanilla(device):
    vanilla = build_model(tiny("vanilla")).to(device)
    res = build_model(tiny("resformer")).to(device)
    res.load_state_dict(vanilla.state_dict())
    idx = torch.randint(0, 256, (2, 16), device=device)
    assert not torch.allclose(res(idx), vanilla(idx))


@pytest.mark.parametrize("mode", [m for m in MODES if "layers" in MODES[m].keys])
def test_layer_mask_is_honoured(mode, device):
    """With only layer 2 receiving, layers 0 and 1 compute exactly what vanilla does."""
    cfg = tiny(mode, layers=[2], n_layer=3, lambda1=0.7, neutreno_lambda=0.7)
    model = build_model(cfg).to(device)
    randomize_coefficients(model)
    assert list(model.residual.mixes) == ["2"]
    vanilla = build_model(tiny("vanilla", n_layer=3)).to(device)
    vanilla.load_state_dict(model.state_dict(), strict=False)
    if mode == "svformer":
        assert model.blocks[2].attn.wv is None and model.blocks[1].attn.wv is not None
    idx = torch.randint(0, 256, (2, 16), device=device)
    hidden = {}
    for name, m in (("mask", model), ("vanilla", vanilla)):
        m.blocks[1].register_forward_hook(lambda mod, i, o, n=name: hidden.__setitem__(n, o[0]))
        out = m(idx)
        hidden[name + "_out"] = out
    torch.testing.assert_close(hidden["mask"], hidden["vanilla"])
    assert not torch.allclose(hidden["mask_out"], hidden["vanilla_out"])


def _formula(mode, source, n_layer, d, ffn, vocab, receiving, value_embeddings=0):
    """Parameter count from the formula in DESIGN.md section 2 (and for the value-embedding
    family, modded-nanogpt's: K tables on 2K layers), written out independently."""
    per_layer = 2 * d + 4 * d * d + 3 * d * ffn
    total = 2 * vocab * d + d + n_layer * per_layer
    r = len(receiving)
    if r and source == "value_embedding":
        total += vocab * d
    if mode in FAMILY:
        r = 2 * value_embeddings
        total += value_embeddings * vocab * d
    n_sources = (lambda layer: layer + 1) if source == "value_embedding" else (lambda layer: layer)
    total += {
        "vanilla": 0,
        "resformer": 0,
        "neutreno": 0,
        "learnable": 2 * r,
        "learnable_plus": (1 + 2 * r) if r else 0,
        "dense": sum(n_sources(layer) + 1 for layer in receiving),
        "svformer": -d * d * r,
        "gated": d * 4 * r,  # d * n_head per receiving layer, n_head = 4
        "ve_unet": 2 * r,  # v_lambda and ve_lambda per layer that reads a table
        "ve_unet_gated": (2 + d * 4) * r,  # and a gate, d * n_head
    }[mode]
    return total


@pytest.mark.parametrize("mode,source", [(m, s) for m, s in ALL if m not in FAMILY])
@pytest.mark.parametrize("layers", ["all", [2, 3]])
def test_parameter_counts_match_formula(mode, source, layers):
    cfg = tiny(mode, source=source, layers=layers, n_layer=4)
    model = build_model(cfg)
    receiving = cfg.value_residual.receiving(4)
    expected = _formula(mode, source, 4, 32, cfg.model.ffn, 256, receiving)
    actual = sum(p.numel() for p in model.parameters())
    assert actual == expected
    counts = count_params(cfg)
    assert counts["n_params"] == actual
    emb = 256 * 32 * (2 if source == "value_embedding" and receiving else 1)
    assert counts["n_params_non_embedding"] == actual - emb


@pytest.mark.parametrize("mode,n_layer,k", FAMILY_PLANS)
def test_value_embedding_family_parameter_counts_match_formula(mode, n_layer, k):
    cfg = tiny(mode, value_embeddings=k, n_layer=n_layer)
    model = build_model(cfg)
    expected = _formula(mode, "first_layer", n_layer, 32, cfg.model.ffn, 256, [], k)
    actual = sum(p.numel() for p in model.parameters())
    assert actual == expected
    assert len(model.residual.value_embeddings) == k and model.residual.value_embedding is None
    counts = count_params(cfg)
    assert counts["n_params"] == actual
    assert counts["n_params_non_embedding"] == actual - 256 * 32 * (1 + k)


def test_zero_parameter_modes_add_nothing():
    base = count_params(tiny("vanilla"))["n_params"]
    assert count_params(tiny("resformer"))["n_params"] == base
    assert count_params(tiny("neutreno"))["n_params"] == base
    assert count_params(tiny("learnable"))["n_params"] == base + 2 * 2
    assert count_params(tiny("svformer"))["n_params"] == base - 2 * 32 * 32


@pytest.mark.parametrize("mode,source", ALL)
def test_gradient_reaches_every_trainable_tensor(mode, source, device):
    torch.manual_seed(0)
    model = build_model(tiny(mode, source=source)).to(device)
    randomize_coefficients(model)
    idx = torch.randint(0, 256, (4, 16), device=device)
    loss = torch.nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.flatten())
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert p.grad.abs().sum() > 0, f"{name} got a zero gradient"


@pytest.mark.parametrize("mode", [m for m in MODES if "source" in MODES[m].keys])
def test_first_layer_values_are_not_detached(mode, device):
    """Every receiving layer sends gradient into W_V of layer 0 (as the official code). With
    layer 0's output projection zeroed, its own attention passes no gradient back to its
    values: what reaches its W_V came through the receiving layers, and would be exactly zero
    if the source values were detached."""
    torch.manual_seed(0)
    model = build_model(tiny(mode, n_layer=3)).to(device)
    randomize_coefficients(model)
    with torch.no_grad():
        model.blocks[0].attn.wo.weight.zero_()
    idx = torch.randint(0, 256, (2, 16), device=device)
    model(idx).pow(2).sum().backward()
    assert model.blocks[0].attn.wv.weight.grad.abs().sum() > 0


def test_the_mode_table_counts_parameters_exactly():
    """The mode's formula plus vocab x d_model per value-embedding table (the sources before
    layer 0, `ValueResidualConfig.tables`) is what the built model adds to vanilla."""
    plans = [(mode, {"source": source, "layers": layers}, 4)
             for mode, source in ALL for layers in ("all", [2, 3])]
    plans += [(mode, {"value_embeddings": k}, n) for mode, n, k in FAMILY_PLANS]
    for mode, plan, n_layer in plans:
        cfg = tiny(mode, n_layer=n_layer, **plan)
        vr = cfg.value_residual
        tables = vr.tables(n_layer)
        extra = MODES[mode].extra_params(32, 4, vr.receiving(n_layer), tables) + tables * 256 * 32
        vanilla = count_params(tiny("vanilla", n_layer=n_layer))["n_params"]
        assert count_params(cfg)["n_params"] == vanilla + extra, (mode, plan, n_layer)


@pytest.mark.parametrize("mode,n_layer,k", FAMILY_PLANS)
def test_each_value_embedding_table_gets_gradient_exactly_from_the_layers_that_use_it(
        mode, n_layer, k, device):
    """Table i serves layer i and its mirror, layer n_layer-1-i. With every other layer's
    ve_lambda at zero, one layer alone reads its table: exactly that table gets a gradient,
    and a layer outside the layout reads none."""
    users = {i: {i, n_layer - 1 - i} for i in range(k)}  # the layout, written out
    idx = torch.randint(0, 256, (2, 16), device=device)
    for layer in range(n_layer):
        torch.manual_seed(0)
        model = build_model(tiny(mode, value_embeddings=k, n_layer=n_layer)).to(device)
        randomize_coefficients(model)
        with torch.no_grad():
            for other, mix in model.residual.mixes.items():
                if int(other) != layer:
                    mix.lambdas[1] = 0.0
        model(idx).pow(2).sum().backward()
        got = {i for i, table in enumerate(model.residual.value_embeddings)
               if table.weight.grad is not None and table.weight.grad.abs().sum() > 0}
        assert got == {i for i, used_by in users.items() if layer in used_by}, layer
    # the layers with a mix are the layout's
    assert {int(layer) for layer in model.residual.mixes} == set().union(*users.values())


def test_the_gated_value_embedding_mode_starts_as_the_ungated_one(device):
    plain = build_model(tiny("ve_unet", n_layer=4)).to(device)
    gated = build_model(tiny("ve_unet_gated", n_layer=4)).to(device)
    missing, unexpected = gated.load_state_dict(plain.state_dict(), strict=False)
    assert unexpected == [] and missing and all(k.endswith("gate.weight") for k in missing)
    idx = torch.randint(0, 256, (2, 16), device=device)
    torch.testing.assert_close(gated(idx), plain(idx))


def test_a_new_mode_is_one_registry_entry_and_one_mix_class(monkeypatch, device):
    """What docs/ARCHITECTURE.md shows: a mode registered here builds, trains a step and is
    counted, with nothing else changed."""
    from nas import modes
    from nas.config import from_dict
    from nas.model import residual
    from nas.training.lit import LitDecoder

    class HalfMix(residual.ValueMix):
        """V' = (V_src + V_n) / 2, fixed."""

        def before(self, v, sources, x, shared=None):
            return 0.5 * (sources[0] + v)

    monkeypatch.setitem(modes.MODES, "half", modes.Mode(
        "half", modes.SOURCE_KEYS, False, "HalfMix", lambda d, h, r, s: 0, "(V_src + V_n) / 2"))
    cfg = from_dict({"model": {"n_layer": 3, "d_model": 32, "n_head": 4, "seq_len": 16},
                     "value_residual": {"mode": "half"}, "train": {"steps": 1}})
    model = build_model(cfg)
    assert count_params(cfg)["n_params"] == count_params(tiny("vanilla"))["n_params"]
    assert isinstance(model.residual.mix(1), HalfMix) and model.residual.mix(0) is None
    lit = LitDecoder(cfg).to(device)
    optimizer = lit.configure_optimizers()["optimizer"]
    idx = torch.randint(0, 256, (2, 16), device=device)
    before = [p.detach().clone() for p in lit.model.parameters()]
    loss = torch.nn.functional.cross_entropy(lit(idx).flatten(0, 1), idx.flatten())
    loss.backward()
    optimizer.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, lit.model.parameters(),
                                                      strict=True))


def test_neutreno_reads_its_own_coefficient_and_refuses_lambda1():
    from nas.config import from_dict
    from nas.errors import ConfigError

    cfg = tiny("neutreno", neutreno_lambda=0.3)
    assert build_model(cfg).residual.coefficients() == {"L1.neutreno_lambda": 0.3,
                                                        "L2.neutreno_lambda": 0.3}
    record = cfg.to_dict()
    assert "lambda1" not in record["value_residual"] and from_dict(record) == cfg
    assert "neutreno_lambda" not in tiny("resformer").to_dict()["value_residual"]
    old = {**record, "value_residual": {"mode": "neutreno", "lambda1": 0.3}}
    with pytest.raises(ConfigError, match="value_residual.lambda1: .*neutreno_lambda"):
        from_dict(old)


def test_the_family_records_its_keys_where_they_differ_from_their_defaults():
    """Records of every other mode stay as they were before the keys existed."""
    from nas.config import from_dict

    cfg = tiny("ve_unet_gated", n_layer=4, value_embeddings=2, ve_lambda=0.3)
    record = cfg.to_dict()
    assert record["value_residual"]["value_embeddings"] == 2
    assert record["value_residual"]["ve_lambda"] == 0.3
    assert "v_lambda" not in record["value_residual"] and from_dict(record) == cfg
    assert build_model(cfg).residual.coefficients()["L3.ve_lambda"] == pytest.approx(0.3)
    for mode in ("vanilla", "learnable"):
        assert not {"value_embeddings", "v_lambda", "ve_lambda"} & set(
            tiny(mode).to_dict()["value_residual"])


def test_learnable_plus_starts_at_lambda1_one():
    model = build_model(tiny("learnable_plus", lambda2=0.5, n_layer=4))
    coefs = model.residual.coefficients()
    assert coefs == pytest.approx({f"L{i}.{k}": v for i in (1, 2, 3)
                                   for k, v in (("lambda1", 1.0), ("lambda2", 0.5))})


def test_sequence_longer_than_model_is_refused(device):
    model = build_model(tiny("vanilla")).to(device)
    with pytest.raises(ValueError, match="seq_len"):
        model(torch.zeros(1, 17, dtype=torch.long, device=device))


def test_the_configuration_page_mode_table_lists_every_registered_mode():
    from tests.helpers import ROOT

    lines = (ROOT / "docs" / "configuration.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| `mode` |"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(line.split("`")[1])
    assert rows == list(MODES)
