"""Search spaces: conditional parameters, layer patterns and bad spaces (no training)."""

import optuna
import pytest
from optuna.distributions import CategoricalDistribution

from nas.config import from_dict
from nas.errors import ConfigError
from nas.search.space import check_space, mode_params, sample

optuna.logging.set_verbosity(optuna.logging.WARNING)

SPACE = {
    "model": {"n_layer": [2, 6], "d_model": 32, "n_head": 2, "seq_len": 16},
    "value_residual": {
        "mode": ["vanilla", "resformer", "learnable_plus", "svformer", "neutreno"],
        "layers": {"pattern": ["subset", "last_k", "unet", "all"]},
        "lambda1": {"low": 0.1, "high": 5.0},
        "lambda2": {"low": 0.1, "high": 1.0, "step": 0.1},
        "neutreno_lambda": {"low": 0.1, "high": 5.0},
        "source": ["first_layer", "value_embedding"],
    },
    "train": {"lr": {"low": 1e-4, "high": 1e-2, "log": True}, "steps": 10},
}


def draws(space, n=300):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    out = []
    for _ in range(n):
        trial = study.ask()
        raw = sample(space, trial)
        out.append((trial.params, raw))
        study.tell(trial, 0.0)
    return out


def test_conditional_parameters_appear_only_where_they_apply():
    seen_modes = set()
    for params, raw in draws(check_space(SPACE, "space")):
        cfg = from_dict(raw)  # every draw is a valid run config
        mode, n_layer = cfg.value_residual.mode, cfg.model.n_layer
        seen_modes.add(mode)
        vr_params = {k for k in params
                     if k.startswith("value_residual.") and k != "value_residual.mode"}
        if mode == "vanilla":
            assert vr_params == set()
            continue
        assert ("value_residual.lambda1" in params) == (mode == "resformer")
        assert ("value_residual.neutreno_lambda" in params) == (mode == "neutreno")
        assert ("value_residual.lambda2" in params) == (mode in ("resformer", "learnable_plus"))
        assert "value_residual.source" in params
        pattern = params["value_residual.layers.pattern"]
        per_layer = sorted(int(k.rsplit(".", 1)[1]) for k in params
                           if k.rsplit(".", 1)[1].isdigit())
        receiving = cfg.value_residual.receiving(n_layer)
        if pattern == "subset":
            assert per_layer == list(range(1, n_layer))  # never beyond n_layer
            assert receiving == [i for i in per_layer if params[f"value_residual.layers.{i}"]]
        else:
            assert per_layer == []
        if pattern == "last_k":
            k = params["value_residual.layers.last_k"]
            assert receiving == list(range(n_layer - k, n_layer))
        if pattern == "unet":
            k = params["value_residual.layers.unet"]
            assert receiving == sorted(set(range(1, k + 1)) | set(range(n_layer - k, n_layer)))
        if pattern == "all":
            assert receiving == list(range(1, n_layer))
    assert seen_modes == set(SPACE["value_residual"]["mode"])


def test_a_preset_sets_the_layers_a_subset_draws():
    space = {"model": {"preset": "nano"}, "value_residual": {
        "mode": "resformer", "layers": {"pattern": "subset"}}}
    params, raw = draws(check_space(space, "space"), n=1)[0]
    assert sorted(int(k.rsplit(".", 1)[1]) for k in params if k[-1].isdigit()) == [1, 2, 3]
    assert from_dict(raw).model.n_layer == 4


def test_fixed_values_are_not_searched():
    params, raw = draws(SPACE, n=1)[0]
    assert "model.d_model" not in params and raw["model"]["d_model"] == 32
    assert "train.lr" in params and 1e-4 <= raw["train"]["lr"] <= 1e-2


def test_a_forced_mode_is_recorded_with_the_spaces_distribution():
    # as the baselines are queued (nas.search.study.enqueue_baselines): its keys none
    study = optuna.create_study()
    study.enqueue_trial(mode_params(SPACE, "vanilla"))
    trial = study.ask()
    raw = sample(SPACE, trial, force_mode="vanilla")
    assert raw["value_residual"] == {"mode": "vanilla"}
    assert trial.params["value_residual.mode"] == "vanilla"
    assert trial.distributions["value_residual.mode"] == CategoricalDistribution(
        SPACE["value_residual"]["mode"])
    assert not any(k.startswith("value_residual.") and k != "value_residual.mode"
                   for k in trial.params)


@pytest.mark.parametrize("space,fragment", [
    ({"modle": {}}, "modle: unknown section"),
    ({"model": {"widht": [1]}}, "model.widht: unknown key"),
    ({"model": {"n_layer": []}}, "empty list"),
    ({"train": {"lr": {"low": 1, "hi": 2}}}, "a range needs low and high"),
    ({"train": {"lr": {"low": 2.0, "high": 1.0}}}, "low 2.0 is above high 1.0"),
    ({"train": {"lr": {"low": 0.0, "high": 1.0, "log": True}}}, "log range needs low > 0"),
    ({"value_residual": {"layers": {"pattern": "diagonal"}}}, "unknown pattern 'diagonal'"),
    ({"value_residual": {"layers": "some"}}, "expected 'all'"),
])
def test_bad_spaces_are_refused(space, fragment):
    with pytest.raises(ConfigError, match=fragment):
        check_space(space, "space.yaml")


def test_named_variants_override_value_residual_and_fix_k():
    space = check_space({
        "model": {"n_layer": [4, 8], "d_model": 32, "n_head": 2},
        "value_residual": {"lambda2": 0.5},
        "variants": {"vanilla": {"mode": "vanilla"},
                     "sparse": {"mode": "resformer", "lambda1": 5.0,
                                "layers": {"pattern": "last_k", "k": 0.375}},
                     "last2": {"mode": "learnable", "layers": {"pattern": "last_k", "k": 2}}},
    }, "space")
    seen = set()
    for params, raw in draws(space, 60):
        cfg = from_dict(raw)
        name, n_layer, vr = params["variant"], cfg.model.n_layer, cfg.value_residual
        seen.add(name)
        assert not any(k.startswith("value_residual.") for k in params)  # nothing searched
        if name == "vanilla":
            assert vr.mode == "vanilla"
        elif name == "sparse":
            assert (vr.mode, vr.lambda1, vr.lambda2) == ("resformer", 5.0, 0.5)
            assert vr.layers == ([5, 6, 7] if n_layer == 8 else [2, 3])  # 3 of 8, 2 of 4
        else:
            assert vr.mode == "learnable" and vr.layers == [n_layer - 2, n_layer - 1]
    assert seen == {"vanilla", "sparse", "last2"}
    # A baseline picks the variant that runs vanilla, as its queue entry holds it.
    study = optuna.create_study()
    study.enqueue_trial(mode_params(space, "vanilla"))
    trial = study.ask()
    assert sample(space, trial, force_mode="vanilla")["value_residual"] == {"mode": "vanilla"}
    assert trial.params["variant"] == "vanilla"


VANILLA_OR_RESFORMER = {"mode": ["vanilla", "resformer"]}


@pytest.mark.parametrize("space, params", [
    ({"value_residual": VANILLA_OR_RESFORMER}, {"value_residual.mode": "vanilla"}),
    ({}, {}),  # vanilla by default: no choice to record
    ({"value_residual": {"mode": "vanilla"}}, {}),
    ({"value_residual": {"mode": ["resformer", "svformer"]}}, {}),  # no distribution holds it
    ({"variants": {"id": {"mode": "resformer"}, "base": {"mode": "vanilla"}}},
     {"variant": "base"}),
    ({"variants": {"id": {"mode": "resformer"}, "either": VANILLA_OR_RESFORMER}},
     {"variant": "either", "value_residual.mode": "vanilla"}),
    ({"variants": {"id": {"mode": "resformer"}}}, {}),
])
def test_a_forced_mode_is_chosen_as_the_space_chooses_it(space, params):
    assert mode_params(space, "vanilla") == params
    study = optuna.create_study()
    study.enqueue_trial(params)
    trial = study.ask()
    assert sample(space, trial, force_mode="vanilla")["value_residual"] == {"mode": "vanilla"}
    assert trial.params == params


def test_a_forced_mode_the_queue_entry_does_not_hold_is_refused():
    # A baseline queued with its size alone leaves the choice to the sampler: it would record
    # one mode and run another.
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    space = {"value_residual": {"mode": ["resformer", "vanilla"]}}
    with pytest.raises(ValueError, match="must run vanilla chose resformer: it was queued "
                                         "without {'value_residual.mode': 'vanilla'}"):
        for _ in range(20):  # until the sampler draws the other mode
            sample(space, study.ask(), force_mode="vanilla")


@pytest.mark.parametrize("variants, message", [
    ([], "must be a mapping of names"),
    ({"a": "resformer"}, "variants.a: must be a name mapped"),
    ({"a": {"mode": "resformer", "lamda1": 2}}, "lamda1: unknown key"),
    ({"a": {"layers": {"pattern": "last_k", "k": 1.5}}}, "share of the layers in (0, 1)"),
])
def test_bad_variants_are_clear_errors(variants, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_space({"variants": variants}, "space")


@pytest.mark.parametrize("study", ["pareto", "value_embeddings"])
def test_the_shipped_spaces_explore_the_value_embedding_family(study):
    """studies/pareto.yaml (search_spaces/all.yaml) and studies/value_embeddings.yaml load, and
    their draws train the family's both modes with every table count the space offers, and
    suggest only the keys the family reads."""
    from nas.search.spec import draw_configs, load_spec
    from tests.helpers import ROOT

    spec = load_spec(ROOT / "studies" / f"{study}.yaml")
    offered = spec.merged_space["value_residual"]["value_embeddings"]
    family = [cfg.value_residual for cfg in draw_configs(spec, "draws", draws=200)
              if cfg.value_residual.reads("value_embeddings")]
    assert {vr.mode for vr in family} == {"ve_unet", "ve_unet_gated"}
    assert {vr.value_embeddings for vr in family} == set(offered)
    assert all((vr.layers, vr.source) == ("all", "first_layer") for vr in family)
