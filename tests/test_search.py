"""Studies end to end on tiny models: real training, real SQLite storage."""

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from nas.cli import main
from nas.config import from_dict
from nas.model.decoder import count_params
from nas.search.spec import load_spec
from nas.search.study import open_study
from nas.search.worker import run_search
from tests.helpers import TINY_BASE, quiet, write_spec

pytestmark = pytest.mark.slow  # trains, serves or kills: make test-fast leaves it out


def test_study_completes_resumes_and_stores_what_it_measured(tmp_path):
    spec = load_spec(write_spec(tmp_path))
    study = quiet(spec)
    trials = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(trials) == 4
    assert study.metric_names == ["val_loss", "n_params"]
    # vanilla baselines at both sizes, enqueued first
    baselines = [t for t in study.trials if t.user_attrs.get("baseline")]
    assert sorted(t.params["model.n_layer"] for t in baselines) == [2, 3]
    assert all(t.user_attrs["mode"] == "vanilla" for t in baselines)
    for t in trials:
        cfg = from_dict(t.user_attrs["config"])
        counts = count_params(cfg)
        assert t.values[1] == counts["n_params"] == t.user_attrs["n_params"]
        assert t.user_attrs["n_params_non_embedding"] == counts["n_params_non_embedding"]
        assert t.values[0] == pytest.approx(t.user_attrs["val_loss"])
        assert t.values[0] == t.user_attrs["curve"][-1][1] or abs(
            t.values[0] - t.user_attrs["curve"][-1][1]) < 1e-5
        assert [s for s, _ in t.user_attrs["curve"]] == [4, 8, 12]
        assert t.user_attrs["tokens"] == 12 * 4 * 16 and t.user_attrs["tokens_per_s"] > 0
        if cfg.value_residual.mode == "learnable":
            assert set(t.user_attrs["coefficients"]) >= {"L1.lambda1", "L1.lambda2"}
    # Running again with the same target does nothing; --n-trials adds new trials.
    again = quiet(load_spec(write_spec(tmp_path)))
    assert len(again.trials) == 4
    more = quiet(load_spec(write_spec(tmp_path)), n_trials=2)
    assert len(more.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))) == 6
    assert sum(bool(t.user_attrs.get("baseline")) for t in more.trials) == 2  # not re-queued


def test_pareto_pruner_prunes_multi_objective_trials(tmp_path):
    # A negative margin makes every trial whose parameter count is at least a completed
    # trial's stop at its first validation after min_progress: the mechanism, not luck.
    path = write_spec(tmp_path, n_trials=4, space={
        "model": {"n_layer": 2},
        "value_residual": {"mode": ["resformer", "neutreno", "learnable"]}},
        pruner={"type": "pareto", "margin": -0.5, "min_progress": 0.5, "patience": 1})
    study = quiet(load_spec(path))
    states = [t.state for t in study.trials]
    assert states[0] == TrialState.COMPLETE and study.trials[0].user_attrs["baseline"]
    pruned = [t for t in study.trials if t.state == TrialState.PRUNED]
    assert len(pruned) == 3
    for t in pruned:
        reason = t.user_attrs["pruned_reason"]
        if reason.startswith("duplicate"):  # TPE proposed a mode again: nothing to train
            assert t.user_attrs["steps_trained"] == 0 and "curve" not in t.user_attrs
        else:
            assert reason.startswith("pareto:")
            assert t.user_attrs["steps_trained"] == 8 and len(t.user_attrs["curve"]) == 2


def test_pareto_pruner_waits_for_patience_and_skips_duplicates(tmp_path):
    # One fixed plan: trial 1 trails the vanilla baseline by construction (negative margin)
    # and stops at its second eligible validation; trial 2 repeats trial 1's run config.
    path = write_spec(tmp_path, n_trials=3, space={
        "model": {"n_layer": 2}, "value_residual": {"mode": "learnable"}},
        pruner={"type": "pareto", "margin": -0.5, "min_progress": 0.3, "patience": 2})
    study = quiet(load_spec(path))
    first, second = study.trials[1], study.trials[2]
    assert first.state == second.state == TrialState.PRUNED
    assert first.user_attrs["steps_trained"] == 8  # validations at 4 and 8: two in a row
    assert "(2 validations in a row)" in first.user_attrs["pruned_reason"]
    assert second.user_attrs["pruned_reason"].startswith("duplicate of trial 1 (pruned)")
    assert second.user_attrs["steps_trained"] == 0 and "curve" not in second.user_attrs


def test_without_the_pareto_pruner_a_repeat_completes_as_an_untrained_copy(tmp_path):
    # One fixed plan: trial 2 repeats trial 1's run config. It completes with trial 1's values
    # and measurements (what retraining would give) and trains nothing: no time of its own.
    path = write_spec(tmp_path, n_trials=3, space={
        "model": {"n_layer": 2}, "value_residual": {"mode": "learnable"}},
        pruner={"type": "none"})
    lines = []
    study = run_search(load_spec(path), progress=False, echo=lines.append)
    first, second = study.trials[1], study.trials[2]
    assert first.state == second.state == TrialState.COMPLETE
    assert any(line.startswith("trial   2") and line.endswith("copy of trial 1 (untrained)")
               for line in lines), lines
    assert second.values == first.values and second.user_attrs["copy_of"] == 1
    for key in ("val_loss", "test_loss", "curve", "coefficients", "steps_trained"):
        assert second.user_attrs[key] == first.user_attrs[key]
    assert "train_seconds" in first.user_attrs and "train_seconds" not in second.user_attrs
    assert "copy_of" not in first.user_attrs


def test_pareto_pruner_spares_smaller_models(tmp_path):
    # svformer has fewer parameters than the vanilla baseline: nothing cheaper to compare to.
    path = write_spec(tmp_path, n_trials=2, space={
        "model": {"n_layer": 2}, "value_residual": {"mode": ["svformer"]}},
        pruner={"type": "pareto", "margin": -0.5, "min_progress": 0.5})
    study = quiet(load_spec(path))
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2


def test_median_pruner_prunes_single_objective_trials(tmp_path):
    path = write_spec(tmp_path, n_trials=2, objectives=["val_loss"], baselines=False,
                      space={"model": {"n_layer": 2}, "train": {"lr": [3e-3, 1e-7]}},
                      pruner={"type": "median", "n_startup_trials": 1, "n_warmup_steps": 0})
    spec = load_spec(path)
    study = open_study(spec)
    study.enqueue_trial({"train.lr": 3e-3})
    study.enqueue_trial({"train.lr": 1e-7})
    study = quiet(spec)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.PRUNED]
    assert study.trials[1].user_attrs["pruned_reason"].startswith("median:")


def test_parameter_budget_is_a_constraint(tmp_path):
    vanilla2 = count_params(from_dict({**TINY_BASE, "model": {**TINY_BASE["model"],
                                                             "n_layer": 2}}))["n_params"]
    path = write_spec(tmp_path, n_trials=2, objectives=["val_loss"], max_params=vanilla2)
    study = quiet(load_spec(path))
    big = [t for t in study.trials if t.user_attrs["n_params"] > vanilla2]
    assert big and all(t.state == TrialState.PRUNED for t in big)
    assert all("over budget" in t.user_attrs["pruned_reason"] for t in big)
    assert all("curve" not in t.user_attrs for t in big)  # never trained
    small = [t for t in study.trials if t.user_attrs["n_params"] <= vanilla2]
    assert all(t.state == TrialState.COMPLETE for t in small)
    assert all(t.system_attrs["constraints:n_params"] <= 0 for t in small)


def test_cli_search_prints_front_and_refuses_bad_specs(tmp_path, capsys):
    path = write_spec(tmp_path, n_trials=2)
    assert main(["search", str(path), "--no-progress", "--threads", "1"]) == 0
    assert "Pareto front" in (out := capsys.readouterr().out) and "vanilla" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"name": "x", "space": {"model": {"n_head": [3]}},
                                   "base": TINY_BASE}))
    assert main(["search", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "model.n_head" in err and len(err.strip().splitlines()) == 1
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path}/tiny.db")
    assert len(study.trials) == 2


def test_a_trial_at_its_last_step_is_never_pruned_and_completes(tmp_path):
    # vanilla at 2 layers learns; at 3 layers and a rate too small to learn it is beaten on
    # both objectives at its one validation, which is its last step
    path = write_spec(tmp_path, n_trials=2, baselines=False, sampler={"type": "bruteforce"},
                      pruner={"type": "pareto", "margin": 0.0, "min_progress": 0.0,
                              "patience": 1, "trend": 0},
                      space={"model": {"n_layer": [2, 3]}, "value_residual": {"mode": "vanilla"},
                             "train": {"eval_every": 12, "lr": [3e-3, 1e-7]}})
    spec = load_spec(path)
    study = open_study(spec, echo=lambda *_: None)
    study.enqueue_trial({"model.n_layer": 2, "train.lr": 3e-3})
    study.enqueue_trial({"model.n_layer": 3, "train.lr": 1e-7})
    quiet(spec, n_trials=2, threads=1)
    first, second = study.get_trials()
    assert first.values[0] < second.values[0]
    assert second.user_attrs["n_params"] > first.user_attrs["n_params"]
    # fully trained, it completes and counts, however it compares
    assert second.state == TrialState.COMPLETE and second.user_attrs["steps_trained"] == 12
    assert "pruned_reason" not in second.user_attrs
