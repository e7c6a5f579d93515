"""Sound maps: budgets that scale with the model, a held-out test split, each arm at its own
learning rate chosen on validation loss only, and intervals that cover at their stated rate."""

import datetime
import math
import subprocess

import numpy as np
import optuna
import pytest
import yaml
from optuna.trial import TrialState

from nas.config import MODEL_PRESETS, from_dict
from nas.model.decoder import count_params
from nas.reading.arms import best_arms, choose_arms, paired_differences
from nas.reading.fits import Interpolation
from nas.reading.scaling import Level, equivalent_saving, parameter_savings
from nas.reading.stats import mean_interval, sign_flip_p
from nas.reading.summary import time_notes
from nas.search import lr_sweep
from nas.search.pruning import ParetoPruner
from nas.search.trials import TrialRecord, records
from nas.training.data import TokenDataModule
from nas.training.train import train
from tests.helpers import env_for_cli, nas_cmd, sweep_trial, tiny

# -- budgets -----------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["pico", "nano", "micro", "tiny", "small", "paper-82m"])
@pytest.mark.parametrize("ratio", [0.5, 20, 43.7])
def test_tokens_per_param_resolves_to_whole_steps_at_every_size(preset, ratio):
    cfg = from_dict({"model": {"preset": preset},
                     "train": {"tokens_per_param": ratio, "batch_size": 4}})
    vanilla = count_params(from_dict({"model": {"preset": preset}}))["n_params_non_embedding"]
    per_step = 4 * MODEL_PRESETS[preset]["seq_len"]
    assert cfg.train.steps == math.ceil(ratio * vanilla / per_step)
    assert (cfg.train.steps - 1) * per_step < ratio * vanilla <= cfg.train.steps * per_step
    # every plan of the shape trains on the same tokens: the budget reads vanilla's count
    sv = from_dict({"model": {"preset": preset}, "value_residual": {"mode": "svformer"},
                    "train": {"tokens_per_param": ratio, "batch_size": 4}})
    assert sv.train.steps == cfg.train.steps


def test_a_token_budget_rounds_up_and_round_trips_as_given():
    cfg = from_dict({"model": {"seq_len": 16}, "train": {"tokens": 1000, "batch_size": 8}})
    assert cfg.train.steps == 8  # 1000 / 128 = 7.8 -> 8 whole steps
    assert from_dict({}).train.steps == 600  # no budget: the default steps
    ratio = from_dict({"train": {"tokens_per_param": 2.0}})
    stored = ratio.to_dict()["train"]
    assert stored["tokens_per_param"] == 2.0 and "steps" not in stored and "tokens" not in stored
    assert from_dict(ratio.to_dict()).to_dict() == ratio.to_dict()
    assert "tokens_per_param" not in from_dict({"train": {"steps": 5}}).to_dict()["train"]


@pytest.mark.slow  # trains 83 steps
def test_older_records_read_the_measured_ratio_under_its_own_name():
    """Stored as `tokens_per_param` before it was renamed, or not stored at all before that:
    either way a record reads its tokens per non-embedding parameter of its own model."""
    attrs = {"tokens": 1000, "n_params_non_embedding": 400}
    renamed = optuna.trial.create_trial(value=1.0, user_attrs={**attrs, "tokens_per_param": 2.5})
    unstored = optuna.trial.create_trial(value=1.0, user_attrs=attrs)
    assert TrialRecord.from_trial(renamed).tokens_per_model_param == 2.5
    assert TrialRecord.from_trial(unstored).tokens_per_model_param == 2.5


def test_the_report_states_what_share_of_a_trial_s_wall_time_trained():
    """The stored train_seconds against the storage's start and end of each trial."""
    start = datetime.datetime(2026, 1, 1, 12, 0, 0)
    trials = [optuna.trial.FrozenTrial(
        number=i, trial_id=i, state=TrialState.COMPLETE, value=1.0, params={},
        distributions={}, user_attrs={"train_seconds": trained}, system_attrs={},
        intermediate_values={}, datetime_start=start,
        datetime_complete=start + datetime.timedelta(seconds=wall))
        for i, (trained, wall) in enumerate(((90.0, 100.0), (45.0, 50.0), (60.0, 100.0),
                                             (8.0, 10.0)))]
    records = [TrialRecord.from_trial(t) for t in trials]
    assert [r.wall_seconds for r in records] == [100.0, 50.0, 100.0, 10.0]
    # shares 0.9, 0.9, 0.6, 0.8: median 0.85
    assert time_notes(records) == [
        "Training steps took a median 85.0% of a trial's wall time (60.0%-90.0% over 4 trials; "
        "the rest is set-up, evaluation and the study's own work)."]
    assert time_notes([TrialRecord(0, TrialState.COMPLETE)]) == []  # never timed: no line


def test_a_run_reports_its_tokens_per_param_and_a_held_out_test_loss():
    # gated adds parameters: the budget (against vanilla's) and the measured ratio (against
    # its own) differ
    cfg = tiny("gated", steps=None, tokens_per_param=0.2, eval_batches=4)
    m = train(cfg, progress=False)
    vanilla = count_params(tiny("vanilla"))["n_params_non_embedding"]
    assert m["n_params_non_embedding"] > vanilla
    assert 0.2 * vanilla <= m["tokens"] < 0.2 * vanilla + cfg.tokens_per_step
    assert m["tokens_per_model_param"] == pytest.approx(m["tokens"] / m["n_params_non_embedding"])
    assert m["tokens_per_model_param"] < m["tokens"] / vanilla
    for split in ("val", "test"):
        assert len(m[f"{split}_batch_losses"]) == 4
        assert m[f"{split}_loss_se"] == pytest.approx(
            np.std(m[f"{split}_batch_losses"], ddof=1) / 2, abs=1e-4)
    assert m["test_loss"] == pytest.approx(np.mean(m["test_batch_losses"]), abs=1e-4)
    assert m["test_loss"] != m["val_loss"]


def test_the_test_split_is_the_tail_and_never_trained_on(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_bytes(bytes(range(256)) * 40)  # 10,240 bytes
    cfg = from_dict({"model": {"seq_len": 16, "n_layer": 2, "d_model": 32},
                     "data": {"source": str(corpus), "val_fraction": 0.1,
                              "test_fraction": 0.2}})
    dm = TokenDataModule.for_run(cfg)
    (train_part,), (val,), (test,) = dm.train_arrays, dm.val_arrays, dm.test_arrays
    assert len(train_part) == 7168 and len(val) == 1024 and len(test) == 2048
    assert len(train_part) + len(val) + len(test) == 10240
    held = tmp_path / "held.txt"
    held.write_bytes(b"held out " * 100)
    cfg = from_dict({"model": {"seq_len": 16, "n_layer": 2, "d_model": 32},
                     "data": {"source": str(corpus), "test_source": str(held)}})
    dm = TokenDataModule.for_run(cfg)
    assert len(dm.train_arrays[0]) == 9216  # no test tail: the test set is the other file
    assert bytes(dm.test_arrays[0][:9]) == b"held out "


# -- selection reads validation loss only ------------------------------------------------------

FIRST_SEED = lr_sweep.Sweep(protocol="first_seed")


def test_learning_rate_choice_uses_common_seeds_and_flags_the_edge():
    trials = [
        # lr 0.003 is best on seeds 0 and 1 (the seeds every rate ran); seed 2 only at 0.01
        sweep_trial("identity", 16, 0.001, 0, 2.30, 9.0),
        sweep_trial("identity", 16, 0.001, 1, 2.32, 9.0),
        sweep_trial("identity", 16, 0.003, 0, 2.10, 9.0),
        sweep_trial("identity", 16, 0.003, 1, 2.14, 9.0),
        sweep_trial("identity", 16, 0.01, 0, 2.20, 1.0),
        sweep_trial("identity", 16, 0.01, 1, 2.22, 1.0),
        sweep_trial("identity", 16, 0.01, 2, 1.00, 1.0),
        # vanilla's best is the highest rate: at the edge
        sweep_trial("vanilla", 16, 0.001, 0, 2.5, 2.5),
        sweep_trial("vanilla", 16, 0.003, 0, 2.4, 2.4),
        sweep_trial("vanilla", 16, 0.01, 0, 2.3, 2.3),
        # sparse chose the edge 0.01 once, so its grid was extended to 0.03
        sweep_trial("sparse", 16, 0.001, 0, 2.6, 2.6),
        sweep_trial("sparse", 16, 0.003, 0, 2.5, 2.5),
        sweep_trial("sparse", 16, 0.01, 0, 2.4, 2.4),
        sweep_trial("sparse", 16, 0.03, 0, 2.45, 2.45),
        # a sweep still running: two of the three rates so far
        sweep_trial("identity", 32, 0.001, 0, 2.0, 2.0),
        sweep_trial("identity", 32, 0.003, 0, 1.9, 1.9),
    ]
    trials = records(trials)
    partial = [a for a in choose_arms(trials) if a.shape == "4L d32"]
    assert [a.missing for a in partial] == [[0.01]]
    arms = {a.variant: a for a in choose_arms(trials) if a.shape == "4L d16"}
    identity, vanilla = arms["identity"], arms["vanilla"]
    assert identity.lr == 0.003 and identity.choice_seeds == [0, 1] and not identity.at_edge
    # sparse's extension is no rate identity (an interior choice) lacks; vanilla, at the edge
    # 0.01, is due it
    assert identity.missing == [] and vanilla.missing == [0.03] and arms["sparse"].missing == []
    assert identity.val_by_lr == pytest.approx({0.001: 2.31, 0.003: 2.12, 0.01: 2.21})
    assert identity.loss == 9.0  # reported: the chosen rate's test loss, not the best test
    assert vanilla.lr == 0.01 and vanilla.at_edge


def test_test_loss_is_never_read_by_selection_pruning_or_queueing():
    rng = np.random.default_rng(0)
    space = {"variants": {"vanilla": {}, "identity": {}}, "model": {"d_model": [16, 32]},
             "train": {"lr": [0.001, 0.003, 0.01], "seed": [0, 1, 2]}}

    def study_with(test_of):
        study = optuna.create_study(directions=["minimize", "minimize"])
        for i, (variant, d, lr) in enumerate(
                (v, d, lr) for v in ("vanilla", "identity") for d in (16, 32)
                for lr in (0.001, 0.003, 0.01)):
            val = 2.0 + rng.random() if test_of is None else VALS[i]
            study.add_trial(sweep_trial(variant, d, lr, 0, val, test_of(i, val) if test_of else val,
                                 curve=[[5, val + 0.3], [10, val]]))
        return study

    global VALS
    VALS = [2.0 + rng.random() for _ in range(12)]
    honest = study_with(lambda i, val: val + 0.01)
    adversarial = study_with(lambda i, val: 10.0 - val)  # test ranks every run the other way
    pruner = ParetoPruner(margin=0.0, min_progress=0.0, patience=1)

    def decisions(study):
        trials = records(study.get_trials())
        arms = sorted((a.variant, a.shape, a.lr, [t.number for t in a.trials])
                      for a in best_arms(trials))
        curve = [[5, 2.6], [10, 2.5]]
        return (arms, lr_sweep.pending(study, space, FIRST_SEED, 0),
                pruner.reason_to_prune(study, {"n_params": 40_000}, curve, 10),
                sorted(t.number for t in study.best_trials))

    assert decisions(honest) == decisions(adversarial)
    # seeds 1 and 2 at the choice
    assert [len(lr_sweep.pending(honest, space, FIRST_SEED, 0))] == [2 * 2 * 2]


# -- intervals -----------------------------------------------------------------------------------


@pytest.mark.parametrize("n,draws,band", [(3, 600, (0.92, 0.98)), (12, 200, (0.88, 0.985))])
def test_paired_difference_interval_covers_its_true_value_at_the_stated_rate(n, draws, band):
    rng = np.random.default_rng(1)
    true = -0.02
    covered = 0
    for _ in range(draws):
        iv = mean_interval(true + 0.01 * rng.standard_normal(n))
        assert iv.method == ("t" if n < 10 else "bootstrap")
        covered += iv.low <= true <= iv.high
    assert band[0] <= covered / draws <= band[1], covered / draws


def test_sign_flip_p_is_exact():
    assert sign_flip_p([-0.1, -0.2, -0.3, -0.1, -0.2]) == pytest.approx(2 / 32)
    assert sign_flip_p([-0.1, 0.1]) == pytest.approx(1.0)
    assert sign_flip_p([-0.1]) == 1.0
    assert math.isnan(sign_flip_p([]))


def _saving_study(rng, seeds=4, saving=0.2, noise=0.003):
    """Trials of vanilla and an arm that needs `saving` fewer parameters, with seed noise."""
    def vanilla(n):
        return 2.0 + 3.0 * (n / 1e5) ** -0.3

    trials = []
    for seed in range(seeds):
        for d, n in zip((16, 24, 32, 40), (1e5, 2e5, 4e5, 8e5), strict=True):
            for name, loss in (("vanilla", vanilla(n)), ("identity", vanilla(n / (1 - saving)))):
                t = sweep_trial(name, d, 0.003, seed, loss + noise * rng.standard_normal(), 0.0)
                t.user_attrs.update(n_params_non_embedding=n, tokens=20 * n,
                                    tokens_per_model_param=20.0,
                                    test_loss=t.user_attrs["val_loss"])
                trials.append(TrialRecord.from_trial(t))
    return trials


def test_parameter_saving_interval_covers_a_known_saving_under_seed_noise():
    # A 95% t-interval over the 4 per-seed savings (a refitted curve per seed, so only roughly
    # 95%): the test holds its coverage to at least 75% over 20 draws.
    rng = np.random.default_rng(2)
    covered, widths = 0, []
    for draw in range(20):
        trials = _saving_study(rng)
        _, (s,) = parameter_savings(best_arms(trials))
        low, high = s.interval
        covered += low <= 0.2 <= high
        widths.append(high - low)
        if draw == 0:
            assert set(s.per_seed) == {0, 1, 2, 3}
            diffs = paired_differences(best_arms(trials))["identity"]
            assert [len(d.by_seed) for d in diffs] == [4, 4, 4, 4]
            assert all(d.interval.high < 0 for d in diffs)  # better at every size
    assert covered / 20 >= 0.75, covered
    assert 0 < float(np.median(widths)) < 0.05


# -- the protocol and the report, through the CLI ------------------------------------------------


@pytest.mark.slow
def test_first_seed_protocol_then_report_with_intervals(tmp_path):
    space = {"model": {"n_layer": 4, "n_head": 2, "d_model": [16, 24], "seq_len": 16},
             "train": {"lr": [0.003, 0.03], "seed": [0, 1, 2]},
             "variants": {"vanilla": {"mode": "vanilla"},
                          "identity": {"mode": "resformer", "lambda1": 0.5, "lambda2": 0.5}}}
    spec = {"name": "sound", "space": space, "objectives": ["val_loss", "n_params_non_embedding"],
            "n_trials": 16, "storage": f"sqlite:///{tmp_path}/s.db", "baselines": False,
            "base": {"train": {"tokens_per_param": 0.2, "batch_size": 8, "eval_batches": 4}},
            "sampler": {"type": "bruteforce"}, "lr_sweep": "first_seed"}
    path = tmp_path / "sound.yaml"
    path.write_text(yaml.safe_dump(spec))
    proc = subprocess.run(nas_cmd("search", str(path), "--no-progress"), capture_output=True,
                          text=True, env=env_for_cli(), timeout=600)
    assert proc.returncode == 0, proc.stderr
    study = optuna.load_study(study_name="sound", storage=spec["storage"])
    done = records(study.get_trials(states=(TrialState.COMPLETE,)))
    assert len(done) == 16  # 2 variants x 2 sizes x (2 rates on seed 0 + seeds 1 and 2)
    for a in choose_arms(done):
        assert a.choice_seeds == [0] and sorted(t.seed for t in a.trials) == [0, 1, 2]
        assert a.lr == min(a.val_by_lr, key=a.val_by_lr.get)
    for t in done:
        assert t.test_loss is not None and t.tokens_per_model_param > 0.2
    out = tmp_path / "r.html"
    proc = subprocess.run(nas_cmd("report", str(path), "--out", str(out)), capture_output=True,
                          text=True, env=env_for_cli(), timeout=600)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "Test loss minus vanilla's on the same seed" in text and "95% t-interval" in text
    assert "all pairs: exact p (Holm)" in text and "(n=3; Holm p" in text
    assert "Learning rate per variant and size" in text and "at the edge of the grid" in text
    assert "below 20 tokens per parameter" in text
    assert "Paired over the same test windows" in text
    page = out.read_text()
    assert 'id="fig-lr"' in page and "Equivalent parameter saving against vanilla" in page


def test_data_saving_interpolates_between_budgets_and_reads_losses_both_ways():
    # vanilla's loss falls linearly in ln T; "faster" reaches each of its losses with 0.8x the
    # tokens (a +20% saving), "slower" needs 1.25x (-20%: read on vanilla's curve, since an
    # interpolation cannot extrapolate). At the smallest budget neither reading lies inside.
    budgets = [1000.0, 2000.0, 4000.0, 8000.0, 16000.0]

    def levels(scale):
        loss = [3.0 - 0.5 * math.log(t / scale / 1000.0) for t in budgets]
        return [Level(t, f"{t:g}", {0: v, 1: v}, t / 100) for t, v in zip(budgets, loss,
                                                                          strict=True)]

    base = levels(1.0)
    faster = equivalent_saving("faster", "tokens", base, levels(0.8))
    slower = equivalent_saving("slower", "tokens", base, levels(1 / 0.8))
    assert [lv.saving for lv in faster.levels] == pytest.approx([0.2] * 4)
    assert [lv.saving for lv in slower.levels] == pytest.approx([-0.2] * 4)
    assert [lv.label for lv in faster.levels] == ["2000", "4000", "8000", "16000"]
    assert all(lv.interpolated for lv in faster.levels + slower.levels)
    assert faster.headline == pytest.approx(0.2) and slower.headline == pytest.approx(-0.2)
    assert isinstance(faster.fit, Interpolation) and faster.fit.residuals == [0.0] * 5


def test_per_layer_tables_cover_every_learned_weight_and_show_no_spread_for_one_seed():
    from nas.reading.summary import profile_rows

    def record(mode: str, seed: int, coefficients: dict[str, float]) -> TrialRecord:
        return TrialRecord(number=seed, state=TrialState.COMPLETE, mode=mode,
                           config={"model": {"n_layer": 3, "d_model": 16},
                                   "train": {"seed": seed}},
                           coefficients=coefficients)

    ve = [record("ve_unet", 0, {"L0.v_lambda": 0.5, "L2.v_lambda": 0.75,
                                "L0.ve_lambda": 1.0, "L2.ve_lambda": 1.25})]
    (row,) = profile_rows(ve, "ve_lambda")
    assert (row["variant"], row["seeds"]) == ("ve_unet", 1)
    assert row["ve_lambda by layer (mean ± sd over seeds)"] == "1.00  -  1.25"  # no "±0.00"
    learnable = [record("learnable", s, {"L1.lambda1": 0.5 + s, "L2.lambda1": 1.0})
                 for s in (0, 1)]
    (row,) = profile_rows(learnable, "lambda1")
    assert row["lambda1 by layer (mean ± sd over seeds)"] == "-  1.00±0.71  1.00±0.00"
    assert profile_rows(learnable, "v_lambda") == []
