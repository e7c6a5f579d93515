"""Samplers and warm starts: GP and `auto` as a spec names them, a study seeded with the
finished trials of an earlier one (real SQLite storages, the real CLI), the bad input they
refuse, and the samplers benchmark's arithmetic."""

import sys
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

from nas.cli import main
from nas.errors import ConfigError
from nas.search.samplers import AUTO_GP_MAX_TRIALS, make_sampler
from nas.search.spec import load_spec
from nas.search.study import enqueue_baselines, open_study
from nas.search.trials import TrialRecord, front
from tests.helpers import TINY_BASE, quiet, write_spec

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import samplers as bench  # noqa: E402

pytestmark = pytest.mark.slow  # trains, serves or kills: make test-fast leaves it out

EAGER = {**TINY_BASE, "train": {**TINY_BASE["train"], "compile": False}}
THREE = ["val_loss", "n_params", "kv_bytes_per_token"]


def test_gp_and_auto_are_built_as_the_spec_names_them(tmp_path):
    def sampler(n_trials, **options):
        return make_sampler(load_spec(write_spec(tmp_path, n_trials=n_trials,
                                                 sampler=options)), 0)

    assert isinstance(sampler(20, type="gp"), optuna.samplers.GPSampler)
    assert isinstance(sampler(AUTO_GP_MAX_TRIALS, type="auto"), optuna.samplers.GPSampler)
    assert isinstance(sampler(AUTO_GP_MAX_TRIALS + 1, type="auto"),
                      optuna.samplers.TPESampler)
    with pytest.raises(ConfigError, match="study.yaml: sampler: .*population_size"):
        sampler(20, type="gp", population_size=10)


def test_auto_runs_gp_with_budgets_on_a_conditional_space(tmp_path, capsys):
    # Past its 2 start-up trials GP fits the trials so far, the budgets' constraints included,
    # and draws each mode's own keys (lambda1) at random.
    path = write_spec(tmp_path, n_trials=4, baselines=False, base=EAGER, max_params=10**6,
                      max_kv_bytes=10**6, sampler={"type": "auto", "n_startup_trials": 2})
    assert main(["search", str(path), "--no-progress"]) == 0
    assert f"sampler auto: gp (n_trials 4 <= {AUTO_GP_MAX_TRIALS})" in capsys.readouterr().out
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path}/tiny.db")
    done = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(done) == 4
    assert all(set(t.constraints) == {"n_params", "kv_bytes_per_token"} for t in done)


def test_the_baselines_record_the_mode_so_gp_models_it(tmp_path):
    # GP (and NSGA-II) model only the parameters every finished trial has with one
    # distribution: the baselines record the mode as the other trials do.
    path = write_spec(tmp_path, n_trials=4, base=EAGER,
                      sampler={"type": "gp", "n_startup_trials": 2})
    assert main(["search", str(path), "--no-progress"]) == 0
    spec = load_spec(path)
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path}/tiny.db")
    baselines = [t for t in study.trials if TrialRecord.from_trial(t).baseline]
    assert [t.params for t in baselines] == [
        {"model.n_layer": n, "value_residual.mode": "vanilla"} for n in (2, 3)]
    assert all(t.user_attrs["mode"] == "vanilla" for t in baselines)
    modeled = make_sampler(spec, 0).infer_relative_search_space(study, study.trials[-1])
    assert modeled == {
        "model.n_layer": CategoricalDistribution([2, 3]),
        "value_residual.mode": CategoricalDistribution(
            spec.merged_space["value_residual"]["mode"])}


def test_a_resumed_study_runs_the_baselines_it_queued_with_their_size_alone(tmp_path):
    # A study created before baselines carried the mode: its queue entries hold the size only.
    spec = load_spec(write_spec(tmp_path, n_trials=3, base=EAGER))
    study = open_study(spec, echo=lambda _: None)
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path}/tiny.db")
    for t in study.get_trials(states=(TrialState.WAITING,)):
        size = t.system_attrs["fixed_params"]["model.n_layer"]
        storage.set_trial_system_attr(t._trial_id, "fixed_params", {"model.n_layer": size})
    assert enqueue_baselines(study, spec) == 0  # held, by size: no duplicates
    study = quiet(spec)
    baselines = [t for t in study.trials if TrialRecord.from_trial(t).baseline]
    assert [(t.state, t.params) for t in baselines] == [
        (TrialState.COMPLETE, {"model.n_layer": n, "value_residual.mode": "vanilla"})
        for n in (2, 3)]


# Warm starts.

SOURCE_SPACE = {"model": {"n_layer": [2, 3]},
                "value_residual": {"mode": ["vanilla", "resformer"],
                                   "lambda1": {"low": 0.2, "high": 5.0}}}
NEW_SPACE = {"model": {"n_layer": [2, 4]},
             "value_residual": {"mode": ["vanilla", "resformer"],
                                "lambda1": {"low": 0.2, "high": 2.0}}}


def source_study(url: str, name: str = "cpu") -> str:
    """An earlier study in storage `url`, holding the trials a warm start must sort: inside
    NEW_SPACE (a plan and a baseline), outside it (a size it lacks, a coefficient beyond its
    range), without the KV bytes, over a parameter budget, and pruned; returns `url`."""
    study = optuna.create_study(study_name=name, storage=url, directions=["minimize"] * 2)
    dists = {"model.n_layer": CategoricalDistribution([2, 3]),
             "value_residual.mode": CategoricalDistribution(["vanilla", "resformer"]),
             "value_residual.lambda1": FloatDistribution(0.2, 5.0)}

    def add(params, state=TrialState.COMPLETE, **attrs):
        attrs = {"val_loss": 3.0, "n_params": 50_000, "kv_bytes_per_token": 512, **attrs}
        attrs = {k: v for k, v in attrs.items() if v is not None}
        study.add_trial(create_trial(
            state=state, params=params, distributions={k: dists[k] for k in params},
            values=[attrs["val_loss"], attrs["n_params"]] if state == TrialState.COMPLETE
            else None, user_attrs=attrs))

    plan = {"model.n_layer": 2, "value_residual.mode": "resformer",
            "value_residual.lambda1": 0.5}
    add(plan, val_loss=2.9)                                             # 0: inside
    add({**plan, "model.n_layer": 3})                                   # 1: a size it lacks
    add({**plan, "value_residual.lambda1": 4.0})                        # 2: beyond its range
    add(plan, kv_bytes_per_token=None)                                  # 3: no KV bytes
    add(plan, n_params=10**7)                                           # 4: over max_params
    baseline = {"model.n_layer": 2, "value_residual.mode": "vanilla"}
    add(baseline, baseline=True, val_loss=3.1)                          # 5: a baseline
    add(plan, state=TrialState.PRUNED)                                  # 6: not finished
    # a baseline queued with its size alone (before baselines carried the mode's choice):
    # seeded, it would keep the mode out of what GP models
    add({"model.n_layer": 2}, baseline=True)                            # 7: outside
    return url


def test_a_warm_start_seeds_a_new_study_and_skips_what_does_not_fit(tmp_path, capsys):
    url = source_study(f"sqlite:///{tmp_path}/cpu.db")
    path = write_spec(tmp_path, name="warm", n_trials=3, objectives=THREE, base=EAGER,
                      space=NEW_SPACE, max_params=10**6,
                      sampler={"type": "auto", "n_startup_trials": 1})
    assert main(["search", str(path), "--no-progress", "--warm-start", f"cpu@{url}"]) == 0
    out = capsys.readouterr().out
    assert (f"warm start: seeded 2 trial(s) from study 'cpu' in {url}; skipped 3 outside this "
            "space, 1 without kv_bytes_per_token, 1 over max_params") in out.splitlines()
    study = optuna.load_study(study_name="warm", storage=f"sqlite:///{tmp_path}/tiny.db")
    seeded = [t for t in study.trials if TrialRecord.from_trial(t).warm_start]
    assert [t.user_attrs["warm_start"] for t in seeded] == [f"cpu@{url} trial 0",
                                                           f"cpu@{url} trial 5"]
    plan, baseline = seeded
    assert plan.state == baseline.state == TrialState.COMPLETE
    assert plan.values == [2.9, 50_000, 512] and baseline.values == [3.1, 50_000, 512]
    # as this space names and bounds them, with this study's budget as a constraint
    assert plan.distributions == {"model.n_layer": CategoricalDistribution([2, 4]),
                                  "value_residual.mode": CategoricalDistribution(
                                      ["vanilla", "resformer"]),
                                  "value_residual.lambda1": FloatDistribution(0.2, 2.0)}
    assert baseline.params == {"model.n_layer": 2, "value_residual.mode": "vanilla"}
    assert plan.constraints == {"n_params": 50_000 - 10**6}
    assert set(plan.user_attrs) == {"warm_start"}  # measured elsewhere: nothing reads them
    # They count toward no target, and no front, table or export of this study shows them.
    own = [t for t in study.trials if t not in seeded]
    assert len([t for t in own if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]) == 3
    assert not {t.number for t in seeded} & {r.number for r in front(study)}
    assert main(["export", str(path), "--best", "10", "--out", str(tmp_path / "out")]) == 0
    exported = {int(p.stem.rsplit("-", 1)[1]) for p in (tmp_path / "out").glob("*.yaml")}
    assert exported and not exported & {t.number for t in seeded}
    # Resumed, the study is not seeded again.
    held = len(study.trials)
    capsys.readouterr()
    assert main(["search", str(path), "--no-progress", "--warm-start", f"cpu@{url}"]) == 0
    assert "warm start: study 'warm' exists already" in capsys.readouterr().out
    assert len(study.trials) == held


def test_a_warm_start_in_the_spec_reads_the_studys_own_storage(tmp_path, capsys):
    # Two objectives and no budget: only the trials outside the space are skipped.
    url = source_study(f"sqlite:///{tmp_path}/tiny.db", name="tiny-cpu")
    path = write_spec(tmp_path, name="warm", n_trials=1, base=EAGER, space=NEW_SPACE,
                      baselines=False, warm_start={"study": "tiny-cpu"})
    assert main(["search", str(path), "--no-progress"]) == 0
    assert (f"warm start: seeded 4 trial(s) from study 'tiny-cpu' in {url}; skipped 3 outside "
            "this space") in capsys.readouterr().out.splitlines()


BAD = [
    ("unknown-objective", {"objectives": ["val_loss", "flops"]}, [],
     ["study.yaml: objectives: unknown objective 'flops'; allowed: val_loss, n_params, "
      "n_params_non_embedding, tokens_per_s, kv_bytes_per_token, decode_tokens_per_s"]),
    ("unknown-constraint", {"max_flops": 10}, [],
     ["study.yaml: max_flops: unknown constraint 'max_flops'; allowed: max_kv_bytes, "
      "max_params"]),
    ("no-such-study", {}, ["--warm-start", "nope@{src}"],
     ["warm start from 'nope': no study 'nope' in {src} (studies there: cpu, lr-only)"]),
    ("no-such-storage", {}, ["--warm-start", "cpu@sqlite:///{tmp}/missing.db"],
     ["warm start from 'cpu': storage sqlite:///{tmp}/missing.db does not exist"]),
    ("no-shared-key", {}, ["--warm-start", "lr-only@{src}"],
     ["warm start from 'lr-only': its trials share no searched key with this space (they set "
      "train.lr; this space searches model.n_layer, value_residual.lambda1, "
      "value_residual.mode)"]),
    ("bruteforce", {"sampler": {"type": "bruteforce"}}, ["--warm-start", "cpu@{src}"],
     ["study.yaml: warm_start: the bruteforce sampler would skip the seeded trials' configs"]),
    ("malformed-flag", {}, ["--warm-start", "@{src}"],
     ["--warm-start: expected STUDY or STUDY@STORAGE_URL"]),
    ("spec-unknown-key", {"warm_start": {"study": "cpu", "url": "x"}}, [],
     ["study.yaml: warm_start.url: unknown key; allowed: study, storage"]),
]


@pytest.mark.parametrize("case,spec,args,fragments", BAD, ids=[c[0] for c in BAD])
def test_bad_input_exits_2_with_one_line_and_creates_no_study(tmp_path, capsys, case, spec,
                                                              args, fragments):
    src = source_study(f"sqlite:///{tmp_path}/src.db")
    lr_only = optuna.create_study(study_name="lr-only", storage=src,
                                  directions=["minimize"] * 2)
    lr_only.add_trial(create_trial(values=[3.0, 1.0], params={"train.lr": 0.01},
                                   distributions={"train.lr": FloatDistribution(1e-3, 0.1)},
                                   user_attrs={"val_loss": 3.0, "n_params": 1}))
    path = write_spec(tmp_path, base=EAGER, space=NEW_SPACE, **spec)
    fill = {"src": src, "tmp": str(tmp_path)}
    assert main(["search", str(path), *(a.format(**fill) for a in args)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    for fragment in fragments:
        assert fragment.format(**fill) in err[0]
    new = f"sqlite:///{tmp_path}/tiny.db"
    assert not (tmp_path / "tiny.db").exists() or "tiny" not in optuna.get_all_study_names(new)


def test_the_keys_a_warm_start_compares_include_every_modes_own(tmp_path):
    from nas.search.warm_start import searched_keys

    spec = load_spec(write_spec(tmp_path, space=yaml.safe_load(
        "{model: {n_layer: [2, 3]}, value_residual: {mode: [resformer, neutreno], "
        "lambda1: {low: 0.2, high: 2.0}, neutreno_lambda: {low: 0.2, high: 2.0}}}")))
    assert searched_keys(spec) == {"model.n_layer", "value_residual.mode",
                                   "value_residual.lambda1", "value_residual.neutreno_lambda"}


# The benchmark's arithmetic.

def test_the_benchmark_hypervolume_share_rises_to_one_on_the_best_front():
    ref = np.array([4.0, 4.0])
    best = bench.hypervolume([[1.0, 3.0], [3.0, 1.0]], ref)
    assert best == pytest.approx(3 * 1 + 1 * 3 - 1 * 1)  # two 3x1 boxes overlapping in 1x1
    shares = bench.history([[3.0, 3.0], None, [1.0, 3.0], [5.0, 0.0], [3.0, 1.0]], ref, best)
    assert shares == pytest.approx([1 / 5, 1 / 5, 3 / 5, 3 / 5, 1.0])  # outside ref: no gain
    assert bench.minimized([2.0, 100.0], ["val_loss", "decode_tokens_per_s"]) == [2.0, -100.0]
