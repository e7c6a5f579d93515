"""Replicate seeds per trial (`replicates: R`, nas.search.replicates): the mean and standard-error
arithmetic; pruners that watch replicate 0 alone (a pruned trial never trains the other seeds);
a failure in a later replicate; bad values. With real training (slow): R = 1 stores exactly
what a spec without the key stores, R = 2 stores both seeds and their mean, `nas confirm`'s fresh
seeds lie above every replicate seed, and a worker killed mid-replicate is finished by the same
command, each replicate counted once."""

from __future__ import annotations

import json
import math
import signal
import statistics
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState, create_trial

from nas.confirm import fresh_seeds, prepare, study_seeds
from nas.errors import ConfigError
from nas.search.replicates import combine, mean_and_se, replicate_seeds
from nas.search.spec import load_spec
from nas.search.study import open_study
from nas.search.trials import TrialRecord, front_rows
from tests.helpers import TINY_BASE, quiet, run_cli, write_spec
from tests.processes import start, trials, wait_for

# -- arithmetic ----------------------------------------------------------------------------------


def test_seeds_follow_the_trial_s_own_and_mean_and_se_are_the_textbook_ones():
    assert replicate_seeds(7, 3) == [7, 8, 9]
    assert replicate_seeds(0, 1) == [0]
    mean, se = mean_and_se([1.0, 2.0, 3.0])
    assert mean == 2.0 and se == pytest.approx(1 / math.sqrt(3))  # sd 1 over sqrt(3)
    assert mean_and_se([4.5]) == (4.5, 0.0)  # one value measures no spread


def _run(val: float, test: float | None, windows: list[float], seconds: float) -> dict:
    return {"val_loss": val, "val_loss_se": 0.9, "val_ppl": math.exp(val), "test_loss": test,
            "test_loss_se": None if test is None else 0.9,
            "val_batch_losses": windows, "test_batch_losses": None if test is None else windows,
            "tokens": 100, "tokens_per_model_param": 0.5, "tokens_per_s": seconds * 10,
            "decode_tokens_per_s": 50.0, "train_seconds": seconds, "steps": 12,
            "curve": [[12, val]], "n_params": 1000}


def test_combine_averages_losses_and_windows_and_keeps_replicate_zero_s_curve():
    runs = [_run(3.0, 3.1, [2.9, 3.1], 1.0), _run(3.2, 3.5, [3.1, 3.3], 2.0)]
    out = combine(runs, [5, 6])
    assert out["val_loss"] == pytest.approx(3.1) and out["test_loss"] == pytest.approx(3.3)
    assert out["val_ppl"] == pytest.approx(math.exp(3.1))
    assert out["replicate_seeds"] == [5, 6]
    assert out["replicate_val_losses"] == [3.0, 3.2]
    assert out["replicate_val_se"] == pytest.approx(0.1)  # |a - b| / 2 for two
    assert out["replicate_test_losses"] == [3.1, 3.5]
    assert out["replicate_test_se"] == pytest.approx(0.2)
    assert out["val_batch_losses"] == [3.0, 3.2]  # window by window
    assert out["val_loss_se"] == pytest.approx(0.1)  # over the averaged windows
    assert out["train_seconds"] == 3.0 and out["tokens_per_s"] == pytest.approx(15.0)
    assert out["curve"] == [[12, 3.0]] and out["steps"] == 12 and out["n_params"] == 1000
    # no test split: no test fields, nothing made up
    bare = combine([_run(3.0, None, [3.0], 1.0), _run(3.2, None, [3.2], 1.0)], [0, 1])
    assert bare["test_loss"] is None and bare["test_loss_se"] is None
    assert "replicate_test_losses" not in bare
    with pytest.raises(ValueError, match="one run per seed"):
        combine(runs, [5])


# -- pruning and failures, on a stand-in for training --------------------------------------------


class FakeTraining:
    """`nas.training.train.train` without training: a loss curve that depends on lambda1 and
    the seed, reported through the validation hook as a real run reports it; records each call
    (the config without its seed, the seed) and can fail a chosen seed once."""

    def __init__(self, fail_seed: int | None = None):
        self.calls: list[tuple[str, int]] = []
        self.fail_seed = fail_seed

    @staticmethod
    def loss(cfg, step: int) -> float:
        lam = cfg.value_residual.lambda1
        return round(3.0 + (lam - 1.0) ** 2 + 0.01 * cfg.train.seed + 2.0 / step, 6)

    def __call__(self, cfg, *, progress=True, on_validation=None, checkpoints=None,
                 resume=False):
        from nas.model.decoder import count_params

        self.calls.append((_planned(cfg.to_dict()), cfg.train.seed))
        if cfg.train.seed == self.fail_seed:
            self.fail_seed = None
            raise RuntimeError("a broken replicate")
        t = cfg.train
        curve = []
        for step in range(t.eval_every, t.steps + 1, t.eval_every):
            curve.append([step, self.loss(cfg, step)])
            on_validation(step, curve[-1][1])
        val = curve[-1][1]
        return {"val_loss": val, "val_loss_se": 0.01, "val_ppl": math.exp(val),
                "test_loss": val + 0.05, "test_loss_se": 0.01, "val_batch_losses": [val],
                "test_batch_losses": [val + 0.05], "tokens": 10, "tokens_per_model_param": 1.0,
                "tokens_per_s": 1.0, "train_seconds": 1.0, "coefficients": {}, "curve": curve,
                "analysis": {}, "decode_tokens_per_s": 1.0, "numerics": {}, "steps": t.steps,
                **count_params(cfg)}


def _planned(config: dict) -> str:
    """A config with its seed left out: what every replicate of one trial shares."""
    return json.dumps({**config, "train": {k: v for k, v in config["train"].items()
                                           if k != "seed"}}, sort_keys=True)


@pytest.fixture
def fake(monkeypatch) -> FakeTraining:
    training = FakeTraining()
    monkeypatch.setattr("nas.training.train.train", training)
    return training


def _fake_study(tmp_path: Path, **overrides) -> optuna.Study:
    spec = {"space": {"model": {"n_layer": [2]},
                      "value_residual": {"mode": ["resformer"],
                                         "lambda1": {"low": 0.2, "high": 2.0}}},
            "baselines": False, "replicates": 2, "n_trials": 8,
            "base": {**TINY_BASE, "train": {**TINY_BASE["train"], "seed": 3}}}
    path = write_spec(tmp_path, **{**spec, **overrides})
    return quiet(load_spec(path), threads=1)


@pytest.mark.parametrize("objectives,pruner", [
    (["val_loss", "n_params"], {"type": "pareto", "min_progress": 0.3}),
    (["val_loss"], {"type": "median", "n_startup_trials": 1, "n_warmup_steps": 0}),
    (["val_loss"], {"type": "hyperband", "min_resource": 4, "max_resource": 12}),
], ids=["pareto", "median", "hyperband"])
def test_pruners_watch_replicate_zero_and_a_pruned_trial_trains_one_seed(tmp_path, fake,
                                                                          objectives, pruner):
    study = _fake_study(tmp_path, objectives=objectives, pruner=pruner,
                        sampler={"type": "random"})
    done = [TrialRecord.from_trial(t) for t in study.trials]
    assert {r.state for r in done} <= {TrialState.COMPLETE, TrialState.PRUNED}
    pruned = [r for r in done if r.state == TrialState.PRUNED]
    complete = [r for r in done if r.state == TrialState.COMPLETE]
    assert pruned and complete, [r.state for r in done]
    for r in done:
        seeds = [seed for planned, seed in fake.calls if planned == _planned(r.config)]
        if r.state == TrialState.PRUNED:
            assert seeds == [3] and r.replicate_seeds is None and r.val_loss is None
            assert r.steps_trained < 12 and r.curve
        else:
            assert seeds == [3, 4] and r.replicate_seeds == [3, 4]
            assert r.values[0] == pytest.approx(statistics.fmean(r.replicate_val_losses))
            # the stored curve, which the Pareto pruner reads, is replicate 0's
            assert r.curve[-1][1] == r.replicate_val_losses[0]
        trial = study.trials[r.number]
        if objectives == ["val_loss"]:  # Optuna's pruners saw replicate 0's curve alone
            assert trial.intermediate_values == {s: v for s, v in r.curve if s < 12}


def test_a_failure_in_a_later_replicate_fails_the_trial_with_replicate_zero_s_curve(tmp_path,
                                                                                     fake):
    fake.fail_seed = 4  # the first trial's replicate 1, once
    study = _fake_study(tmp_path, n_trials=2)
    first, *rest = [TrialRecord.from_trial(t) for t in study.trials]
    assert first.state == TrialState.FAIL and first.failure == "RuntimeError: a broken replicate"
    assert first.curve and first.val_loss is None and first.replicate_seeds is None
    # another trial took its slot; each finished trial holds each of its seeds once
    assert [r.state for r in rest] == [TrialState.COMPLETE] * 2
    assert all(r.replicate_seeds == [3, 4] and len(r.replicate_val_losses) == 2 for r in rest)


def test_the_front_shows_the_replicate_se_where_a_study_has_one(tmp_path, fake):
    rows = front_rows(_fake_study(tmp_path, n_trials=2))
    assert rows and all(row["val_se (seeds)"].endswith("(2)") for row in rows)
    assert list(rows[0])[:4] == ["trial", "plan", "val_loss", "val_se (seeds)"]


# -- confirm's fresh seeds -----------------------------------------------------------------------


def test_fresh_seeds_lie_above_every_replicate_seed():
    study = optuna.create_study()
    study.add_trial(create_trial(value=1.0, user_attrs={"config": {"train": {"seed": 5}},
                                                        "replicate_seeds": [5, 6, 7]}))
    study.enqueue_trial({"train.seed": 9})  # queued: its replicates will train 9, 10, 11
    assert study_seeds(study, {"train": {"seed": 0}}, replicates=3) == {
        0, 1, 2, 5, 6, 7, 9, 10, 11}
    assert fresh_seeds(study_seeds(study, {"train": {"seed": 0}}, replicates=3), 2) == [12, 13]
    with pytest.raises(ConfigError, match="overlap the study's own"):
        fresh_seeds(study_seeds(study, {"train": {"seed": 0}}, replicates=3), 2, first=10)


# -- bad values ----------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides,message", [
    ({"replicates": 0}, "replicates: must be an integer in 1..16 (seeds each trial trains on), "
                        "got 0"),
    ({"replicates": 17}, "replicates: must be an integer in 1..16"),
    ({"replicates": "2"}, "replicates: must be an integer in 1..16"),
    ({"replicates": 2.5}, "replicates: must be an integer in 1..16"),
    ({"replicates": 2, "sampler": {"type": "bruteforce"},
      "space": {"variants": {"vanilla": {"mode": "vanilla"}},
                "train": {"lr": [0.002, 0.0028], "seed": [0, 1]}}},
     "replicates: an lr sweep trains each seed of train.seed as a trial of its own"),
    ({"replicates": 3, "base": {**TINY_BASE, "train": {**TINY_BASE["train"],
                                                        "seed": 2**32 - 2}}},
     "replicates: seeds train.seed .. train.seed + 2 reach 4294967296"),
], ids=["zero", "too-many", "a-string", "a-float", "lr-sweep", "seed-overflow"])
def test_a_bad_replicates_value_is_one_line(tmp_path, overrides, message):
    with pytest.raises(ConfigError) as refused:
        load_spec(write_spec(tmp_path, **overrides))
    assert message in str(refused.value) and "\n" not in str(refused.value)


# -- real training -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> dict[str, tuple[Path, optuna.Study]]:
    """The same tiny study (3 trials: two vanilla baselines, one TPE draw of another mode)
    searched without the key, with `replicates: 1` and with `replicates: 2`: each one's spec
    and study."""
    space = {"model": {"n_layer": [2, 3]},
             "value_residual": {"mode": ["resformer", "learnable"],
                                "lambda1": {"low": 0.2, "high": 2.0}}}
    out = {}
    for name, extra in (("plain", {}), ("one", {"replicates": 1}), ("two", {"replicates": 2})):
        folder = tmp_path_factory.mktemp(name)
        path = write_spec(folder, n_trials=3, space=space, **extra)
        out[name] = path, quiet(load_spec(path), threads=1)
    return out


# What differs between two runs of one config: the clock, and the worker's pid.
TIMED = {"tokens_per_s", "train_seconds", "decode_tokens_per_s", "worker"}


@pytest.mark.slow
def test_one_replicate_stores_exactly_what_a_spec_without_the_key_stores(studies):
    plain, one = studies["plain"][1], studies["one"][1]
    assert plain.user_attrs == one.user_attrs  # the fingerprint included
    assert len(plain.trials) == len(one.trials) == 3
    for a, b in zip(plain.trials, one.trials, strict=True):
        assert (a.state, a.params, a.values) == (b.state, b.params, b.values)
        assert set(a.user_attrs) == set(b.user_attrs)
        assert not any(k.startswith("replicate_") for k in b.user_attrs)
        assert {k: v for k, v in a.user_attrs.items() if k not in TIMED} == {
            k: v for k, v in b.user_attrs.items() if k not in TIMED}


@pytest.mark.slow
def test_two_replicates_store_both_seeds_and_return_their_mean(studies):
    from nas.config import from_dict
    from nas.training.train import train

    plain, two = studies["plain"][1], studies["two"][1]
    assert two.user_attrs["replicates"] == 2
    for a, b in zip(plain.trials, two.trials, strict=True):
        single, double = TrialRecord.from_trial(a), TrialRecord.from_trial(b)
        assert b.params == a.params and double.config == single.config  # replicate 0's config
        assert double.replicate_seeds == [0, 1]
        # replicate 0 is the single-seed trial, bit for bit
        assert double.replicate_val_losses[0] == single.val_loss
        assert double.curve == single.curve
        vals, tests = double.replicate_val_losses, double.replicate_test_losses
        assert b.values[0] == pytest.approx(statistics.fmean(vals)) == double.val_loss
        assert double.test_loss == pytest.approx(statistics.fmean(tests))
        assert double.replicate_val_se == pytest.approx(abs(vals[0] - vals[1]) / 2)
        assert double.replicate_test_se == pytest.approx(abs(tests[0] - tests[1]) / 2)
        assert len(double.val_batch_losses) == len(single.val_batch_losses)
        assert b.values[1] == a.values[1]  # n_params: the same for every replicate
    # replicate 1 is the config trained on seed 1
    last = TrialRecord.from_trial(two.trials[-1])
    raw = json.loads(json.dumps(last.config))
    raw["train"]["seed"] = 1
    assert train(from_dict(raw), progress=False)["val_loss"] == last.replicate_val_losses[1]


@pytest.mark.slow
def test_confirm_takes_fresh_seeds_above_every_replicate_seed(studies):
    for name, fresh in (("plain", [1, 2]), ("two", [2, 3])):
        path, _ = studies[name]
        derived = prepare(load_spec(path), top=1, seeds=2)
        assert derived.attrs["confirm"]["seeds"] == fresh, name
        assert derived.replicates == 1  # a confirmation lists its seeds itself
    # and a search-time seed count of a replicated trial counts its seeds
    two = prepare(load_spec(studies["two"][0]), top=1, seeds=2).attrs["confirm"]["plans"]
    assert {p["search_seeds"] for p in two if p["trial"] is not None} == {2}


@pytest.mark.slow
def test_resuming_with_another_replicate_count_is_refused(studies):
    path, _ = studies["two"]
    spec = yaml.safe_load(path.read_text())
    path.with_name("three.yaml").write_text(yaml.safe_dump({**spec, "replicates": 3}))
    with pytest.raises(ConfigError, match="replicates: the stored study 'tiny' has 2, the spec 3"):
        open_study(load_spec(path.with_name("three.yaml")), echo=lambda *_: None)


@pytest.mark.slow
def test_a_worker_killed_mid_replicate_is_finished_by_the_same_command(tmp_path):
    base = {**TINY_BASE, "train": {**TINY_BASE["train"], "steps": 400, "eval_every": 100,
                                   "checkpoint_every": 40}}
    spec = {"space": {"model": {"n_layer": [2]}}, "baselines": False, "n_trials": 1,
            "replicates": 2, "base": base, "heartbeat": {"interval": 1, "grace_period": 2}}
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    for folder in (killed, clean):
        folder.mkdir()
        write_spec(folder, **spec)
    url = f"sqlite:///{killed}/tiny.db"
    command = ["search", str(killed / "study.yaml"), "--threads", "1", "--no-progress"]
    log = tmp_path / "a.log"
    worker = start(*command, log=log)
    second = killed / "tiny-artifacts/checkpoints/tiny/trial-0000-replicate-1/last.ckpt"
    wait_for(second.is_file, worker, log, "a checkpoint of replicate 1")
    worker.send_signal(signal.SIGKILL)
    assert worker.wait(timeout=60) == -9
    [dead] = trials(url, "tiny")
    assert dead.state == TrialState.RUNNING and dead.user_attrs["curve"]  # replicate 0 done
    assert second.parent.with_name("trial-0000-replicate-0.json").is_file()

    again = run_cli(*command)
    assert again.returncode == 0, again.stdout + again.stderr
    lost, retry = (TrialRecord.from_trial(t) for t in trials(url, "tiny"))
    assert lost.state == TrialState.FAIL and lost.failure.startswith("lost: its worker")
    assert retry.state == TrialState.COMPLETE
    assert retry.replicate_seeds == [0, 1] and len(retry.replicate_val_losses) == 2
    assert retry.resumed_step and retry.resumed_step % 40 == 0  # replicate 1 resumed
    assert retry.replicates_reused == [0]  # replicate 0, finished before the kill, not retrained
    assert not second.parent.exists()  # its checkpoints went with the trial
    assert not list(second.parent.parent.iterdir())  # and the finished replicates' metrics
    # the numbers of a search never killed
    fresh = TrialRecord.from_trial(quiet(load_spec(clean / "study.yaml"), threads=1).trials[0])
    assert retry.replicate_val_losses == fresh.replicate_val_losses
    assert retry.values == fresh.values
