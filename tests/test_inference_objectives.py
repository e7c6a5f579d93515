"""Inference cost as objectives: decode_tokens_per_s measured and stored, the max_kv_bytes
budget, three-objective fronts in the terminal, `nas export --pareto`, the report and the
dashboard, and the Pareto pruner judging a trial on every objective known before training.
Real training of tiny models, real SQLite storage, the real CLI."""

import csv
import time

import optuna
import pytest
import torch
import yaml
from optuna.distributions import CategoricalDistribution
from optuna.study import StudyDirection
from optuna.trial import TrialState, create_trial
from optuna_dashboard._custom_plot_data import list_graph_object_ids
from optuna_dashboard._note import get_note

from nas.cli import main
from nas.config import from_dict
from nas.model.decoder import DECODE_REPEATS, DECODE_TOKENS, build_model, decode_tokens_per_s
from nas.reading.dashboard import publish
from nas.reading.figures import inference_figure
from nas.search.pruning import ParetoPruner
from nas.search.spec import load_spec
from tests.helpers import TINY_BASE, quiet, write_spec

pytestmark = pytest.mark.slow  # trains, serves or kills: make test-fast leaves it out

# Eager: for runs of a few steps compiling costs more than it saves.
EAGER = {**TINY_BASE, "train": {**TINY_BASE["train"], "compile": False}}
THREE = ["val_loss", "n_params", "kv_bytes_per_token"]


def test_decode_speed_is_the_best_of_a_few_short_runs_and_leaves_the_model_alone():
    cfg = from_dict({"model": {"preset": "nano"}, "value_residual": {"mode": "svformer"}})
    model = build_model(cfg).train()  # a quickstart size
    calls = []
    model.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[1]))
    torch.manual_seed(3)
    rng = torch.get_rng_state()
    start = time.perf_counter()
    rate = decode_tokens_per_s(model)
    took = time.perf_counter() - start
    # A warm-up and DECODE_REPEATS runs, each the fixed 8-token prompt, then one token at a
    # time through the cache: 4 x 32 forwards whatever the machine (about 0.2 s on one quiet
    # core; not asserted, the test machine is shared).
    run = [8] + [1] * (DECODE_TOKENS - 1)
    assert calls == run * (DECODE_REPEATS + 1)
    # The best of the timed runs, not their mean with the warm-up: each of them, and the
    # warm-up, took at least DECODE_TOKENS / rate.
    assert rate >= (DECODE_REPEATS + 1) * DECODE_TOKENS / took
    assert torch.equal(torch.get_rng_state(), rng) and model.training


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    """A three-objective study run by `nas search`, and what it printed."""
    tmp_path = tmp_path_factory.mktemp("three")
    path = write_spec(tmp_path, n_trials=5, objectives=THREE, baselines=False, base=EAGER,
                      sampler={"type": "bruteforce"},
                      space={"model": {"n_layer": 2},
                             "value_residual": {"mode": ["vanilla", "svformer", "resformer"],
                                                "source": ["first_layer", "value_embedding"]}})
    out = tmp_path / "search.out"
    with out.open("w") as stdout, pytest.MonkeyPatch.context() as mp:
        mp.setattr("sys.stdout", stdout)
        assert main(["search", str(path), "--no-progress"]) == 0
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path}/tiny.db")
    return path, study, out.read_text()


def front_numbers(study):
    return {t.number for t in study.best_trials}  # Optuna's own non-dominated set


def test_every_trial_stores_both_inference_costs(three):
    _, study, _ = three
    done = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(done) == 5 and study.metric_names == THREE
    for t in done:
        assert t.user_attrs["decode_tokens_per_s"] > 0
        assert t.values[2] == t.user_attrs["kv_bytes_per_token"]
    ve = [t for t in done if t.user_attrs["mode"] == "svformer"
          and t.user_attrs["source"] == "value_embedding"]
    assert ve[0].user_attrs["kv_bytes_per_token"] == 3 * 32 * 4 + 8  # + the cached token ids


def test_the_terminal_front_shows_every_objective(three):
    _, study, printed = three
    table = printed[printed.index("Pareto front"):].splitlines()
    assert table[1].split() == ["trial", "plan", "val_loss", "n_params", "kv_bytes/token",
                                "tok/s"]
    rows = {int(line.split()[0]): line for line in table[3:] if line.strip()}
    assert set(rows) == front_numbers(study)
    for number, line in rows.items():
        assert f"{study.trials[number].user_attrs['kv_bytes_per_token']:,}" in line.split()


def test_export_pareto_writes_the_three_objective_front(three, tmp_path, capsys):
    path, study, _ = three
    assert main(["export", str(path), "--pareto", "--out", str(tmp_path)]) == 0
    exported = {int(p.stem.rsplit("-", 1)[1]) for p in tmp_path.glob("tiny-trial-*.yaml")}
    assert exported == front_numbers(study)
    with (tmp_path / "tiny-summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        trial = study.trials[int(row["trial"])]
        assert int(row["kv_bytes_per_token"]) == trial.user_attrs["kv_bytes_per_token"]
        assert float(row["decode_tokens_per_s"]) == trial.user_attrs["decode_tokens_per_s"]


def test_the_report_and_the_dashboard_show_the_third_objective(three, tmp_path, capsys):
    path, study, _ = three
    page = tmp_path / "report.html"
    assert main(["report", str(path), "--out", str(page)]) == 0
    html = page.read_text()
    assert "<section id='inference'>" in html and 'id="fig-inference"' in html
    assert "<th>kv_bytes/token</th>" in html
    # The paired views ring exactly the trials on the front of all three objectives.
    fig = inference_figure(study)
    ringed = {int(text.split()[0][1:]) for trace in fig.data
              for text, width in zip(trace.text, trace.marker.line.width, strict=True)
              if width > 1}
    assert ringed == front_numbers(study)
    assert {trace.xaxis for trace in fig.data} == {"x", "x2"}  # KV bytes and decode speed
    publish(study, load_spec(path))
    assert "kv_bytes/token" in get_note(study)
    storage = optuna.storages.RDBStorage(f"sqlite:///{path.parent}/tiny.db")
    stored = storage.get_study_system_attrs(storage.get_study_id_from_name("tiny"))
    assert "nas-inference" in list_graph_object_ids(stored)


def test_decode_speed_is_an_objective_to_maximize(tmp_path):
    path = write_spec(tmp_path, n_trials=2, objectives=["val_loss", "decode_tokens_per_s"],
                      baselines=False, base=EAGER, sampler={"type": "bruteforce"},
                      space={"model": {"n_layer": 2},
                             "value_residual": {"mode": ["vanilla", "svformer"]}})
    study = quiet(load_spec(path))
    assert study.directions[1] == StudyDirection.MAXIMIZE
    for t in study.get_trials(states=(TrialState.COMPLETE,)):
        assert t.values[1] == t.user_attrs["decode_tokens_per_s"] > 0


def test_max_kv_bytes_prunes_before_training_and_is_a_constraint(tmp_path, capsys):
    # 2 layers of d_model 32 in float32: vanilla caches 512 bytes a token, svformer 384.
    path = write_spec(tmp_path, n_trials=2, objectives=THREE, baselines=False, base=EAGER,
                      max_kv_bytes=400, max_params=10**9, sampler={"type": "bruteforce"},
                      space={"model": {"n_layer": 2},
                             "value_residual": {"mode": ["vanilla", "svformer"]}})
    study = quiet(load_spec(path))
    by_mode = {t.user_attrs["mode"]: t for t in study.trials}
    vanilla, svformer = by_mode["vanilla"], by_mode["svformer"]
    assert vanilla.state == TrialState.PRUNED and "curve" not in vanilla.user_attrs
    assert vanilla.user_attrs["pruned_reason"] == (
        "over budget: 512 > 400 KV-cache bytes per token")
    assert svformer.state == TrialState.COMPLETE
    # every budget's constraint on every trial, as GP needs
    assert vanilla.constraints["kv_bytes_per_token"] == 112
    assert svformer.constraints["kv_bytes_per_token"] == -16
    assert set(vanilla.constraints) == set(svformer.constraints) == {
        "n_params", "kv_bytes_per_token"}
    # A study measured under one KV budget does not resume under another, or under none.
    spec = yaml.safe_load(path.read_text())
    for changed, shown in ((500, "500"), (None, "None")):
        path.write_text(yaml.safe_dump({**spec, "max_kv_bytes": changed}))
        capsys.readouterr()
        assert main(["search", str(path), "--no-progress"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and (f"max_kv_bytes: the stored study 'tiny' has 400, the spec "
                                  f"{shown}") in err[0]


def test_pareto_pruning_with_a_measured_objective_is_refused(tmp_path, capsys):
    path = write_spec(tmp_path, objectives=["val_loss", "n_params", "decode_tokens_per_s"],
                      pruner={"type": "pareto"})
    assert main(["search", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pruner.type: pareto compares trials on objectives known before " \
        "training" in err[0] and "decode_tokens_per_s is measured by training" in err[0]
    assert not (tmp_path / "tiny.db").exists()


# The pruner, on stored curves (no training).

STEPS = 100


def curve(final):
    return [[s, round(final * (1 + 0.1 * (STEPS / s - 1)), 6)] for s in range(10, STEPS + 1, 10)]


def reference_study():
    """A completed trial of 1,000 params and a 512-byte cache, ending at loss 2.0."""
    study = optuna.create_study(directions=["minimize"] * 3)
    study.add_trial(create_trial(
        values=[2.0, 1_000, 512], params={"p": "a"},
        distributions={"p": CategoricalDistribution(["a"])},
        user_attrs={"n_params": 1_000, "kv_bytes_per_token": 512, "curve": curve(2.0),
                    "val_loss": 2.0, "config": {"p": "a"}}))
    return study


def first_stop(pruner, study, known, trial_curve):
    for i in range(len(trial_curve)):
        if reason := pruner.reason_to_prune(study, known, trial_curve[:i + 1], STEPS):
            return trial_curve[i][0], reason
    return None, None


@pytest.mark.parametrize("pruner", [ParetoPruner(), ParetoPruner(rule="rungs")])
def test_the_pruner_judges_a_trial_on_every_objective_known_before_training(pruner):
    study = reference_study()
    behind = curve(2.2)  # 10% worse than the reference throughout
    # As many parameters and a smaller cache: on the three-objective front whatever its loss.
    # Judged on parameters alone it would be stopped.
    smaller_cache = {"n_params": 1_000, "kv_bytes_per_token": 384}
    assert first_stop(pruner, study, smaller_cache, behind) == (None, None)
    assert first_stop(pruner, study, {"n_params": 1_000}, behind)[0] is not None
    # No better on any: the reference dominates it, and it is stopped, named as such.
    stop, reason = first_stop(pruner, study, {"n_params": 1_000, "kv_bytes_per_token": 512},
                              behind)
    assert stop is not None
    if pruner.rule == "step":
        assert "with no worse n_params, kv_bytes_per_token" in reason
    else:
        assert "at n_params 1,000, kv_bytes_per_token 512" in reason


def test_a_trial_with_a_smaller_cache_is_never_pruned_in_a_three_objective_study(tmp_path):
    # svformer drawing its values from a value-embedding table: more parameters than the
    # vanilla baseline (the table outweighs the W_V it drops), a smaller cache. A negative
    # margin makes the pruner stop any trial it may judge.
    runs = {}
    for objectives in (["val_loss", "n_params"], THREE):
        folder = tmp_path / str(len(objectives))
        folder.mkdir()
        path = write_spec(folder, n_trials=2, objectives=objectives, base=EAGER,
                          sampler={"type": "random"},
                          space={"model": {"n_layer": 2},
                                 "value_residual": {"mode": ["svformer"],
                                                    "source": ["value_embedding"]}},
                          pruner={"type": "pareto", "margin": -0.5, "min_progress": 0.5,
                                  "patience": 1})
        baseline, trial = quiet(load_spec(path)).trials
        assert baseline.user_attrs["baseline"] and baseline.state == TrialState.COMPLETE
        assert trial.user_attrs["n_params"] > baseline.user_attrs["n_params"]
        assert trial.user_attrs["kv_bytes_per_token"] < baseline.user_attrs["kv_bytes_per_token"]
        runs[len(objectives)] = trial
    assert runs[2].state == TrialState.PRUNED
    assert "with no more parameters" in runs[2].user_attrs["pruned_reason"]
    assert runs[3].state == TrialState.COMPLETE
