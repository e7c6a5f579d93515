"""Learning-rate protocols: what all_seeds, crossfit and first_seed choose and report, a grid
that extends itself past an edge choice and stops at an interior optimum or its limit, a
choice's margin against its noise, Holm's adjustment, and a crossfit study end to end."""

import math

import optuna
import pytest
import yaml

from nas.cli import main
from nas.reading.arms import best_arms, choose_arms, paired_differences
from nas.reading.stats import holm
from nas.reading.summary import difference_rows, summary_markdown
from nas.search import lr_sweep
from nas.search.lr_sweep import halving_choice
from nas.search.trials import completed, records
from tests.helpers import sweep_trial

RATES = [0.001, 0.0014, 0.002]
SPACE = {"variants": {"vanilla": {"mode": "vanilla"}}, "model": {"d_model": [16]},
         "train": {"lr": RATES, "seed": [0, 1]}}


def _study(trials=()):
    study = optuna.create_study(directions=["minimize", "minimize"])
    for t in trials:
        study.add_trial(t)
    return study


def _keys(params):
    return sorted((p["train.lr"], p["train.seed"]) for p in params)


# -- choosing ------------------------------------------------------------------------------------


def test_all_seeds_chooses_on_the_mean_over_every_seed_and_reports_the_test_loss_there():
    val = {0.001: (2.0, 2.6), 0.0014: (2.2, 2.2), 0.002: (2.5, 2.0)}  # mean: 2.3, 2.2, 2.25
    trials = records([sweep_trial("vanilla", 16, lr, s, v, 9.0 + lr + s)
                      for lr, pair in val.items() for s, v in enumerate(pair)])
    (arm,) = choose_arms(trials, "all_seeds")
    # seed 0 alone would choose 0.001, seed 1 alone 0.002: the mean chooses 0.0014
    assert arm.lr == 0.0014 and arm.choice_seeds == [0, 1] and not arm.halves
    assert arm.by_seed == {0: 9.0014, 1: 10.0014}
    assert not arm.at_edge


def test_crossfit_reports_each_half_at_the_rate_the_other_half_chose():
    # seeds 0-1 prefer 0.001, seeds 2-3 prefer 0.002
    val = {0.001: (2.0, 2.0, 2.9, 2.9), 0.0014: (2.5, 2.5, 2.5, 2.5), 0.002: (2.9, 2.9, 2.0, 2.0)}
    test = {lr: [5 + 10 * lr + s for s in range(4)] for lr in val}
    trials = records([sweep_trial("vanilla", 16, lr, s, v, test[lr][s])
                      for lr, vs in val.items() for s, v in enumerate(vs)])
    (arm,) = choose_arms(trials, "crossfit")
    assert arm.halves == [([0, 1], 0.001), ([2, 3], 0.002)]
    assert {t.seed: t.lr for t in arm.trials} == {0: 0.002, 1: 0.002, 2: 0.001, 3: 0.001}
    assert arm.by_seed == pytest.approx({0: 5.02, 1: 6.02, 2: 7.01, 3: 8.01})
    assert arm.at_edge and sorted(arm.chosen_rates) == [0.001, 0.002]
    # the same trials read under all_seeds: one rate for every seed
    (plain,) = choose_arms(trials, "all_seeds")
    assert {t.lr for t in plain.trials} == {plain.lr}


def test_crossfit_differences_pair_the_out_of_sample_runs_of_both_arms():
    trials = []
    for variant, shift in (("vanilla", 0.0), ("identity", -0.05)):
        for lr, good in ((0.001, (0, 1)), (0.0014, (2, 3))):
            trials += [sweep_trial(variant, 16, lr, s, 2.0 + (0 if s in good else 0.3),
                                   3.0 + shift + lr + s / 100) for s in range(4)]
    arms = best_arms(records(trials), "crossfit")
    (diff,) = paired_differences(arms)["identity"]
    assert diff.by_seed == pytest.approx({s: -0.05 for s in range(4)})


def test_a_margin_within_its_noise_is_a_coin_flip():
    close = records([sweep_trial("vanilla", 16, lr, s, v, 3.0) for lr, vs in
                     ((0.001, (2.000, 2.010, 2.003)), (0.0014, (2.004, 2.002, 2.009)))
                     for s, v in enumerate(vs)])
    (arm,) = choose_arms(close)
    gap, se = arm.margin
    assert gap == pytest.approx(0.000667, abs=1e-6) and se > gap and arm.coin_flip
    clear = records([sweep_trial("vanilla", 16, lr, s, v, 3.0) for lr, vs in
                     ((0.001, (2.00, 2.01, 2.00)), (0.0014, (2.10, 2.12, 2.11)))
                     for s, v in enumerate(vs)])
    (arm,) = choose_arms(clear)
    assert arm.margin[0] == pytest.approx(0.1067, abs=1e-4) and not arm.coin_flip


def test_holm_on_known_p_values():
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm([0.02]) == [0.02]
    adjusted = holm([0.01, math.nan, 0.02])  # NaN stays outside the family
    assert adjusted[0] == pytest.approx(0.02) and math.isnan(adjusted[1])
    assert adjusted[2] == pytest.approx(0.02)


# -- the queue: first runs, extension, follow-ups -----------------------------------------------


def _done(vals, seeds=(0, 1)):
    """Completed trials of one vanilla arm: vals maps each rate to its loss on every seed."""
    return [sweep_trial("vanilla", 16, lr, s, v, v) for lr, v in vals.items() for s in seeds]


def test_the_grid_extends_past_an_edge_choice_until_the_optimum_is_interior():
    sweep = lr_sweep.Sweep(protocol="all_seeds", extend=2)
    assert lr_sweep.candidates(RATES, 2) == [0.0005, 0.0007071, 0.001, 0.0014, 0.002,
                                             0.002828, 0.004]
    assert _keys(lr_sweep.pending(_study(), SPACE, sweep, 0)) == [
        (lr, s) for lr in RATES for s in (0, 1)]
    falling = {0.001: 2.3, 0.0014: 2.2, 0.002: 2.1}
    assert _keys(lr_sweep.pending(_study(_done(falling)), SPACE, sweep, 0)) == [
        (0.002828, 0), (0.002828, 1)]
    # the extension's rate is interior once a higher rate does worse: nothing more
    turned = _study(_done({**falling, 0.002828: 2.15}))
    assert lr_sweep.pending(turned, SPACE, sweep, 0) == []
    # still falling: one more, then the limit of 2 stops it
    assert _keys(lr_sweep.pending(_study(_done({**falling, 0.002828: 2.0})), SPACE, sweep,
                                  0)) == [(0.004, 0), (0.004, 1)]
    capped = _study(_done({**falling, 0.002828: 2.0, 0.004: 1.9}))
    assert lr_sweep.pending(capped, SPACE, sweep, 0) == []


def test_no_extension_before_every_choosing_seed_ran_every_rate():
    sweep = lr_sweep.Sweep(protocol="all_seeds", extend=2)
    partial = _study(_done({0.001: 2.3, 0.0014: 2.2, 0.002: 2.1}, seeds=(0,)))
    assert _keys(lr_sweep.pending(partial, SPACE, sweep, 0)) == [(lr, 1) for lr in RATES]


def test_crossfit_extends_where_either_half_chooses_an_edge():
    sweep = lr_sweep.Sweep(protocol="crossfit", extend=1)
    trials = [sweep_trial("vanilla", 16, lr, 0, v, v)  # seed 0 (the first half): low edge
              for lr, v in ((0.001, 2.0), (0.0014, 2.1), (0.002, 2.2))]
    trials += [sweep_trial("vanilla", 16, lr, 1, v, v)  # seed 1: interior
               for lr, v in ((0.001, 2.2), (0.0014, 2.0), (0.002, 2.1))]
    assert _keys(lr_sweep.pending(_study(trials), SPACE, sweep, 0)) == [
        (0.0007071, 0), (0.0007071, 1)]
    # without extension nothing follows: every seed already ran every rate
    assert lr_sweep.pending(_study(trials), SPACE, lr_sweep.Sweep(protocol="crossfit"), 0) == []


def test_first_seed_sweeps_one_seed_then_runs_the_others_at_its_choice():
    space = {**SPACE, "train": {"lr": RATES, "seed": [0, 1, 2]}}
    sweep = lr_sweep.Sweep(protocol="first_seed")
    assert _keys(lr_sweep.pending(_study(), space, sweep, 0)) == [(lr, 0) for lr in RATES]
    swept = _done({0.001: 2.3, 0.0014: 2.1, 0.002: 2.2}, seeds=(0,))
    assert _keys(lr_sweep.pending(_study(swept), space, sweep, 0)) == [(0.0014, 1), (0.0014, 2)]


def test_a_failed_trial_is_queued_again():
    sweep = lr_sweep.Sweep()
    study = _study(_done({0.001: 2.3, 0.0014: 2.2}))
    study.add_trial(optuna.trial.create_trial(
        state=optuna.trial.TrialState.FAIL,
        params={"variant": "vanilla", "model.d_model": 16, "train.lr": 0.002, "train.seed": 0},
        distributions={"variant": optuna.distributions.CategoricalDistribution(["vanilla"]),
                       "model.d_model": optuna.distributions.CategoricalDistribution([16]),
                       "train.lr": optuna.distributions.CategoricalDistribution(RATES),
                       "train.seed": optuna.distributions.CategoricalDistribution([0, 1])}))
    assert _keys(lr_sweep.pending(study, SPACE, sweep, 0)) == [(0.002, 0), (0.002, 1)]


@pytest.mark.parametrize("rates,sweep,problem", [
    ([0.001, 0.002, 0.004], lr_sweep.Sweep(), "at most sqrt(2) apart"),
    ([0.001, 0.0014, 0.0028], lr_sweep.Sweep(protocol="first_seed", extend=1), "geometric"),
    ([0.001, 0.001], lr_sweep.Sweep(), "must differ"),
])
def test_grids_that_cannot_find_the_optimum_are_refused(rates, sweep, problem):
    assert problem in lr_sweep.check_grid(rates, sweep)


def test_a_coarse_grid_stays_allowed_for_the_cheap_protocol():
    assert lr_sweep.check_grid([0.003, 0.006, 0.012], lr_sweep.Sweep(protocol="first_seed")) is None


# -- end to end ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_crossfit_study_extends_its_grid_and_reports_both_halves(tmp_path, capsys):
    space = {"model": {"n_layer": 2, "n_head": 2, "d_model": 16, "seq_len": 16},
             "train": {"lr": [0.001, 0.0014, 0.002], "seed": [0, 1]},
             "variants": {"vanilla": {"mode": "vanilla"},
                          "identity": {"mode": "resformer", "lambda1": 0.5, "lambda2": 0.5}}}
    spec = {"name": "cross", "space": space, "n_trials": 40, "baselines": False,
            "objectives": ["val_loss", "n_params_non_embedding"],
            "storage": f"sqlite:///{tmp_path}/c.db", "sampler": {"type": "bruteforce"},
            "lr_sweep": {"protocol": "crossfit", "extend": 1}, "pruner": {"type": "none"},
            "base": {"train": {"steps": 12, "batch_size": 4, "eval_batches": 4,
                               "curve_batches": 1}}}
    path = tmp_path / "cross.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["search", str(path), "--no-progress", "--threads", "1"]) == 0
    assert "the lr_sweep is done" in capsys.readouterr().out
    study = optuna.load_study(study_name="cross", storage=spec["storage"])
    assert lr_sweep.stored_protocol(study) == "crossfit"
    done = completed(study)
    rates = {t.lr for t in done}
    # 12 first runs; a lower edge choice can only extend to 0.0007071, a higher one to 0.002828
    assert {0.001, 0.0014, 0.002} <= rates <= {0.0007071, 0.001, 0.0014, 0.002, 0.002828}
    extended = {(t.arm_name, t.lr) for t in done if t.lr not in (0.001, 0.0014, 0.002)}
    assert len(done) == 12 + 2 * len(extended)  # an added rate runs on both seeds
    assert not study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    for t in done:  # the last curve point is the full validation's
        assert t.curve[-1] == [12, pytest.approx(t.val_loss, abs=1e-6)]
    assert main(["report", str(path), "--out", str(tmp_path / "r.html")]) == 0
    text = capsys.readouterr().out
    assert "seeds 0 chose" in text and "so seeds 1 report" in text
    assert "Holm" in text and "at the same rate" in text
    assert "warning: chosen on 1 seed(s)" in text  # a crossfit half of one seed
    assert summary_markdown(done, "crossfit") in text
    # one size at one budget: the tokens figure has nothing to show and says so
    assert "left out tokens: no model shape was trained at two or more budgets" in text


def test_halving_replay_keeps_the_best_share_and_counts_the_steps_it_spends():
    # three rates, two seeds, 100 steps, validations at 25, 50, 100
    def curve(a, b, c):
        return [[25, a], [50, b], [100, c]]

    curves = {0.001: [curve(3.0, 2.8, 2.0), curve(3.2, 2.9, 2.1)],   # slow start, best end
              0.0014: [curve(2.9, 2.6, 2.3), curve(2.9, 2.6, 2.3)],
              0.002: [curve(2.5, 2.4, 2.4), curve(2.6, 2.5, 2.5)]}   # fast start, worst end
    # at 25%: mean 3.1, 2.9, 2.55 -> keep the best half (ceil(1.5) = 2): 0.002 and 0.0014;
    # 0.001 stops after 25 steps on both seeds
    chosen, spent = halving_choice(curves, 100, (0.25,), 0.5)
    assert chosen == 0.0014 and spent == pytest.approx((2 * 25 + 4 * 100) / 600)
    # then at 50%: 0.002 (mean 2.45) ranks above 0.0014 (2.6), which stops after 50 steps
    chosen, spent = halving_choice(curves, 100, (0.25, 0.5), 0.5)
    assert chosen == 0.002 and spent == pytest.approx((2 * 25 + 2 * 50 + 2 * 100) / 600)
    # keeping everything is the full sweep
    assert halving_choice(curves, 100, (0.25, 0.5), 1.0) == (0.001, 1.0)



def test_a_pooled_p_over_one_cell_is_that_cell_s_test_and_not_a_second_in_the_family():
    trials = records([sweep_trial(v, 16, 0.001, s, 2.0, 3.0 + s / 100 - (v == "identity") / 10)
                      for v in ("vanilla", "identity") for s in range(6)])
    rows, _ = difference_rows(best_arms(trials), several_budgets=False)
    (row,) = rows  # six pairs, all below vanilla: the exact p is 2/64
    assert row["all pairs: exact p (Holm)"] == "0.0312 (0.0312)"
    assert "Holm p 0.031" in row["4L d16"]
