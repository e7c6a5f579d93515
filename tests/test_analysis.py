"""The paper's analyses (nas.model.analysis), the scaling summary (nas.reading.scaling) and `nas
analyze`: known values on constructed inputs, properties on real tiny models, the CLI on real
runs."""

from __future__ import annotations

import json
import math

import optuna
import pytest
import torch
import torch.nn.functional as F
import yaml
from optuna.trial import TrialState, create_trial

from nas.cli import main
from nas.config import dump_config
from nas.model.analysis import (
    analyze,
    attention_entropy,
    causal_attention,
    uniform_entropy,
    value_cosine,
)
from nas.model.decoder import build_model
from nas.reading.arms import best_arms
from nas.reading.scaling import Saving, data_saving, parameter_savings, tokens_to_reach
from nas.reading.stats import mean_interval
from nas.reading.summary import saving_rows, summary_markdown
from nas.search.trials import TrialRecord
from tests.helpers import TINY_BASE, run_cli, tiny

pytestmark = pytest.mark.slow  # trains, serves or kills: make test-fast leaves it out

optuna.logging.set_verbosity(optuna.logging.WARNING)


# -- the analysis functions on known inputs ----------------------------------------------------


def test_entropy_of_uniform_causal_attention_is_its_known_value():
    T = 6
    q = k = torch.zeros(2, 3, T, 8)  # equal scores everywhere: uniform over the visible keys
    probs = causal_attention(q, k)
    assert torch.allclose(probs.sum(-1), torch.ones(2, 3, T))
    assert probs[0, 0, 0, 1] == 0  # causal: the first query sees only itself
    expected = sum(math.log(t + 1) for t in range(T)) / T  # query t spreads over t + 1 keys
    assert attention_entropy(probs) == pytest.approx(expected, rel=1e-6)
    assert uniform_entropy(T) == pytest.approx(expected, rel=1e-12)


def test_entropy_of_one_hot_attention_is_zero():
    assert attention_entropy(torch.eye(5).expand(2, 4, 5, 5)) == pytest.approx(0.0, abs=1e-7)


def test_value_cosine_of_identical_values_is_one():
    v = torch.randn(2, 7, 16)
    assert value_cosine(v, v) == pytest.approx(1.0, abs=1e-6)
    assert value_cosine(3 * v, v) == pytest.approx(1.0, abs=1e-6)
    assert value_cosine(-v, v) == pytest.approx(-1.0, abs=1e-6)


def test_causal_attention_is_what_the_model_computes():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 4, 9, 8).unbind(0)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.allclose(causal_attention(q, k) @ v, expected, atol=1e-5)


# -- on real tiny models -----------------------------------------------------------------------


def _analyze(cfg):
    torch.manual_seed(0)
    model = build_model(cfg)
    idx = torch.randint(0, 256, (3, cfg.model.seq_len))
    return model, idx, analyze(model, idx)


@pytest.mark.parametrize("mode", ["vanilla", "resformer", "svformer", "learnable_plus"])
def test_analysis_covers_every_layer_and_leaves_the_model_unchanged(mode):
    cfg = tiny(mode, n_layer=4)
    model, idx, result = _analyze(cfg)
    for key in ("attention_entropy", "value_cosine", "mixed_value_cosine"):
        assert len(result[key]) == 4, key
    assert result["value_cosine"][0] == pytest.approx(1.0, abs=1e-6)  # V_1 against itself
    assert all(0 <= e <= result["uniform_entropy"] + 1e-6 for e in result["attention_entropy"])
    model.train()
    trace: list = []
    assert torch.equal(model(idx), model(idx, trace=trace))  # tracing changes nothing
    assert len(trace) == 4 and model.training


def test_svformer_layers_use_the_first_layers_values():
    _, _, result = _analyze(tiny("svformer", n_layer=4, layers=[2, 3]))
    assert result["value_cosine"][2:] == pytest.approx([1.0, 1.0], abs=1e-6)
    assert result["value_cosine"][1] < 0.99  # layer 1 keeps its own W_V


def test_resformer_mixing_all_first_layer_values_is_cosine_one():
    _, _, result = _analyze(tiny("resformer", n_layer=3, lambda1=1.0, lambda2=0.0))
    assert result["mixed_value_cosine"] == pytest.approx([1.0, 1.0, 1.0], abs=1e-6)
    assert max(result["value_cosine"][1:]) < 0.99  # their own values differ from V_1


# -- savings from stored trials ----------------------------------------------------------------


def _trial(variant, n_layer, n_params, loss, seed=0, curve=None, tokens=1000):
    return TrialRecord.from_trial(create_trial(value=loss, user_attrs={
        "variant": variant, "mode": variant, "n_params": n_params, "val_loss": loss,
        "n_params_non_embedding": n_params, "tokens": tokens, "curve": curve or [[10, loss]],
        "config": {"model": {"n_layer": n_layer, "seq_len": 10},
                   "train": {"seed": seed, "batch_size": 10, "steps": 10}}}))


def test_tokens_to_reach_interpolates_the_running_minimum():
    t = _trial("vanilla", 2, 100, 2.0, curve=[[2, 4.0], [4, 3.0], [6, 3.5], [8, 2.0], [10, 2.0]])
    assert tokens_to_reach(t, 3.0) == pytest.approx(4 * 100)
    assert tokens_to_reach(t, 2.5) == pytest.approx(6 * 100)  # from (4, 3.0) to (8, 2.0)
    assert tokens_to_reach(t, 4.5) == pytest.approx(2 * 100)
    assert tokens_to_reach(t, 1.0) is None


def test_data_saving_is_signed_and_symmetric_in_meaning():
    curve = [[2, 4.0], [4, 3.0], [6, 2.5], [8, 2.2], [10, 2.0]]
    vanilla = _trial("vanilla", 2, 100, 2.0, curve=curve)
    faster = _trial("identity", 2, 100, 1.8, curve=[[s, v - 0.2] for s, v in curve])
    slower = _trial("sparse", 2, 100, 2.5, curve=[[s, v + 0.5] for s, v in curve])
    # identity reaches 2.0 between step 6 (2.3) and 8 (2.0): at step 8, 20% sooner
    assert data_saving(faster, vanilla) == pytest.approx(0.2)
    # vanilla reaches sparse's final 2.5 at step 6: sparse's 10 steps are worth 6
    assert data_saving(slower, vanilla) == pytest.approx(-0.4)


def test_parameter_saving_has_a_spread_across_seeds():
    def vanilla(n):
        return 2.0 + 3.0 * (n / 1e5) ** -0.3

    sizes = [1e5, 2e5, 4e5, 8e5]
    trials = []
    for seed, saving in ((0, 0.1), (1, 0.3)):
        trials += [_trial("vanilla", i, n, vanilla(n), seed) for i, n in enumerate(sizes)]
        trials += [_trial("identity", i, n, vanilla(n / (1 - saving)), seed)
                   for i, n in enumerate(sizes)]
    _, savings = parameter_savings(best_arms(trials))
    (s,) = savings
    assert s.per_seed[0] == pytest.approx(0.1, abs=2e-3)
    assert s.per_seed[1] == pytest.approx(0.3, abs=2e-3)
    assert 0.1 < s.headline < 0.3  # the fit of the seed means lies between
    # a t-interval over the two per-seed savings (1 degree of freedom: 12.7 standard errors)
    iv = mean_interval([s.per_seed[0], s.per_seed[1]])
    assert s.interval == pytest.approx((iv.low, iv.high))
    assert s.interval[0] < 0.1 and s.interval[1] > 0.3
    text = summary_markdown(trials)
    assert "2 seeds" in text and "seed 0: +10.0%" in text
    assert "warning: 2 seed(s)" in text  # a saving over fewer than 3 seeds


def test_a_saving_interval_that_includes_an_extrapolated_seed_says_so():
    # Seed 0's own curve never reaches vanilla's losses within its sizes: its reading is an
    # extrapolation, and the interval over the per-seed savings carries it.
    s = Saving("identity", "parameters", None, headline=0.21, interval=(-7.4, 5.0),
               per_seed={0: -4.08, 1: 0.231, 2: 0.229},
               per_seed_extrapolated={0: True, 1: False, 2: False})
    (row,) = saving_rows([s])
    cell = row["saving (95% t-interval over per-seed savings), interpolated"]
    assert cell.endswith("warning: the interval includes seed 0's extrapolated reading")
    assert "seed 0: -408.0% (extrapolated)" in row["each seed alone"]
    s.per_seed_extrapolated[0] = False
    (row,) = saving_rows([s])
    assert "warning" not in row["saving (95% t-interval over per-seed savings), interpolated"]


# -- named variants, the scaling study and `nas analyze`, end to end ---------------------------


def test_scaling_study_reports_savings_with_seed_spread_and_analysis(tmp_path, capsys):
    spec = {
        "name": "scaling-tiny",
        "space": {"model": {"n_layer": [2, 3]}, "train": {"seed": [0, 1]},
                  "variants": {"vanilla": {"mode": "vanilla"},
                               "sparse": {"mode": "resformer", "lambda1": 5.0, "lambda2": 1.0,
                                          "layers": {"pattern": "last_k", "k": 0.5}}}},
        "objectives": ["val_loss", "n_params"], "n_trials": 8, "baselines": False,
        "storage": f"sqlite:///{tmp_path}/s.db", "base": TINY_BASE,
        "sampler": {"type": "bruteforce"}, "seed": 0,
    }
    path = tmp_path / "scaling.yaml"
    path.write_text(yaml.safe_dump(spec))
    proc = run_cli("search", str(path), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    study = optuna.load_study(study_name="scaling-tiny", storage=spec["storage"])
    done = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(done) == 8
    combos = {(t.params["variant"], t.params["model.n_layer"], t.params["train.seed"])
              for t in done}
    assert len(combos) == 8  # brute force: every variant x size x seed once
    for t in done:
        cfg = t.user_attrs["config"]
        assert t.user_attrs["variant"] == t.params["variant"]
        if t.params["variant"] == "sparse":  # k 0.5: the last half of the layers
            assert cfg["value_residual"]["layers"] == ([1] if cfg["model"]["n_layer"] == 2
                                                       else [1, 2])  # 1.5 rounds up
            assert cfg["value_residual"]["lambda1"] == 5.0
        assert len(t.user_attrs["analysis"]["attention_entropy"]) == cfg["model"]["n_layer"]

    out = tmp_path / "report.html"
    proc = run_cli("report", str(path), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "2 seeds" in proc.stdout and "| sparse |" in proc.stdout
    page = out.read_text()
    for key in ("savings", "analysis"):
        assert f'id="fig-{key}"' in page
    assert "each seed alone" in page and "attention entropy (nats)" in page

    number = done[0].number
    proc = run_cli("analyze", str(path), "--trial", str(number), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["analysis"] == done[0].user_attrs["analysis"]
    for args, message in (((), "pass --trial N"), (("--trial", "99"), "no trial 99")):
        assert main(["analyze", str(path), *args]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


def test_nas_analyze_a_trained_run_and_a_config(tmp_path, capsys):
    cfg = tiny("learnable", n_layer=3, steps=6)
    path = tmp_path / "run.yaml"
    dump_config(cfg, path)
    run = tmp_path / "run"
    proc = run_cli("analyze", str(path), "--out", str(run))  # trains, then analyzes
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert len(rows) == 3 and "lambda1" in proc.stdout
    stored = json.loads((run / "metrics.json").read_text())
    proc = run_cli("analyze", str(run), "--json")  # reloads model.pt: the same numbers
    assert proc.returncode == 0, proc.stderr
    again = json.loads(proc.stdout)
    for key, value in stored["analysis"].items():
        assert again["analysis"][key] == pytest.approx(value, abs=1e-4), key
    assert again["coefficients"] == pytest.approx(stored["coefficients"], abs=1e-6)

    dump_config(tiny("learnable", n_layer=4), run / "config.yaml")  # weights no longer fit
    for target, message in ((run, "does not fit config.yaml"), (tmp_path, "no config.yaml"),
                            (tmp_path / "missing", "no such file")):
        assert main(["analyze", str(target)]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
