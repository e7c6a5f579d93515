"""Scale-out and crash recovery: several `nas search` workers on one study (SQLite, journal
file, a real PostgreSQL server), a worker killed with SIGKILL or Ctrl+C mid-trial, trials that
diverge or raise. Workers are real `python -m nas search` processes; tiny models."""

import gc
import re
import signal
import subprocess
import sys

import optuna
import pytest
from optuna.trial import TrialState

from nas.search.spec import load_spec
from nas.search.storage import make_storage
from nas.search.study import FINISHED, open_study
from nas.search.worker import MAX_FAILURES, SearchError, run_search
from nas.training.lit import LitDecoder
from tests.helpers import TINY_BASE, WORKER_STUDY, env_for_cli, quiet, write_spec
from tests.processes import by_state, finish, load, start_worker, wait_for

pytestmark = pytest.mark.slow  # trains, serves or kills: make test-fast leaves it out

# Trials of a few seconds, for the tests that stop a worker in the middle of one.
LONG = {**TINY_BASE, "train": {**TINY_BASE["train"], "steps": 300, "eval_every": 50}}


def worker_trials(log_text):
    """Numbers of the trials a worker's log reports as finished or failed."""
    return [int(n) for n in re.findall(r"^trial\s+(\d+)\s", log_text, flags=re.M)]


@pytest.fixture(params=["sqlite", "journal", "postgres"])
def storage(request, tmp_path):
    if request.param == "postgres":
        return request.getfixturevalue("pg_url")
    return {"sqlite": f"sqlite:///{tmp_path}/par.db",
            "journal": f"journal:{tmp_path}/par.log"}[request.param]


def test_two_workers_finish_exactly_n_trials(tmp_path, storage):
    path = write_spec(tmp_path, preset=WORKER_STUDY, storage=storage)
    logs = [tmp_path / f"w{i}.log" for i in range(2)]
    procs = [start_worker(path, i, logs[i]) for i in range(2)]
    texts = [finish(p, log) for p, log in zip(procs, logs, strict=True)]
    study = load(storage, "par")
    states = by_state(study)
    finished = [t for s in FINISHED for t in states[s]]
    assert len(finished) == 6, texts
    assert not states[TrialState.RUNNING] and not states[TrialState.WAITING]
    # A failed trial may only be a surplus one (two workers raced for the last slot).
    assert all(t.user_attrs["failure"].startswith("surplus") for t in states[TrialState.FAIL])
    # None lost or duplicated: each finished trial was run by exactly one worker.
    ran = [worker_trials(t) for t in texts]
    assert sorted(ran[0] + ran[1]) == sorted(t.number for t in finished), texts
    assert all(ran), f"a worker ran no trial: {texts}"
    # Distinct sampler seeds: no two sampled (non-baseline) trials share their params.
    sampled = [tuple(sorted(t.params.items())) for t in finished
               if not t.user_attrs.get("baseline")]
    assert len(set(sampled)) == len(sampled)
    assert sum(bool(t.user_attrs.get("baseline")) for t in study.trials) == 2


def test_sigkill_mid_trial_keeps_finished_trials_and_a_restart_finishes(tmp_path, pg_url):
    path = write_spec(tmp_path, preset=WORKER_STUDY, storage=pg_url, n_trials=4, base=LONG)
    log0, log1 = tmp_path / "w0.log", tmp_path / "w1.log"
    worker = start_worker(path, 0, log0)

    def running_after_a_complete():
        states = by_state(pg_url, "par")
        # A running trial that has drawn all its parameters (its config is written after the
        # last draw). Killed before that, its retry would keep the parameters drawn so far and
        # draw the rest anew, and the retry's params would not be the killed trial's.
        return states[TrialState.COMPLETE] and any(
            "config" in t.user_attrs for t in states[TrialState.RUNNING])

    wait_for(running_after_a_complete, worker, log0,
             "a RUNNING trial with its config after a COMPLETE one")
    worker.send_signal(signal.SIGKILL)
    worker.wait(timeout=30)
    before = by_state(load(pg_url, "par"))
    assert len(before[TrialState.RUNNING]) == 1
    killed = before[TrialState.RUNNING][0]
    kept = {t.number: (t.values, t.params, t.datetime_complete)
            for t in before[TrialState.COMPLETE] + before[TrialState.PRUNED]}

    text = finish(start_worker(path, 1, log1), log1)
    study = load(pg_url, "par")
    states = by_state(study)
    assert len(states[TrialState.COMPLETE]) + len(states[TrialState.PRUNED]) == 4, text
    assert not states[TrialState.RUNNING] and not states[TrialState.WAITING]
    for t in states[TrialState.COMPLETE] + states[TrialState.PRUNED]:
        if t.number in kept:
            assert kept.pop(t.number) == (t.values, t.params, t.datetime_complete)
    assert not kept, "a finished trial changed or vanished"
    # Its lease failed the killed trial and queued a retry with its parameters, which ran.
    assert study.trials[killed.number].state == TrialState.FAIL
    retries = [t for t in study.trials if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retries) == 1 and retries[0].state in FINISHED
    assert retries[0].params == killed.params


@pytest.mark.parametrize("signum,status,name", [(signal.SIGINT, 130, "Ctrl+C"),
                                                (signal.SIGTERM, 143, "SIGTERM")])
def test_ctrl_c_or_sigterm_fails_the_running_trial_and_a_rerun_resumes(tmp_path, signum,
                                                                      status, name):
    storage = f"sqlite:///{tmp_path}/par.db"
    path = write_spec(tmp_path, preset=WORKER_STUDY, storage=storage, n_trials=2, base=LONG)
    log = tmp_path / "w.log"
    worker = start_worker(path, None, log)

    # mid-trial: training, past its first validation
    wait_for(lambda: any(t.user_attrs.get("last_validation")
                         for t in by_state(storage, "par")[TrialState.RUNNING]),
             worker, log, "a RUNNING trial past its first validation")
    worker.send_signal(signum)
    worker.wait(timeout=60)
    assert worker.returncode == status, log.read_text()
    assert f"nas search: interrupted ({name})" in log.read_text()
    assert "Traceback" not in log.read_text()
    states = by_state(load(storage, "par"))
    assert not states[TrialState.RUNNING]  # nothing left half-done
    [failed] = states[TrialState.FAIL]
    assert failed.user_attrs["failure"].startswith("interrupted") and (
        name in failed.user_attrs["failure"])
    finish(start_worker(path, None, log), log)
    states = by_state(load(storage, "par"))
    assert len(states[TrialState.COMPLETE]) + len(states[TrialState.PRUNED]) == 2
    assert len(states[TrialState.FAIL]) == 1
    assert not states[TrialState.RUNNING] and not states[TrialState.WAITING]


def test_diverging_trial_is_recorded_and_the_study_goes_on(tmp_path):
    path = write_spec(tmp_path, preset=WORKER_STUDY, storage=f"sqlite:///{tmp_path}/div.db",
                      n_trials=2, baselines=False, objectives=["val_loss"],
                      space={"model": {"n_layer": 2}, "train": {"lr": [3e-3, 1e3]}},
                      sampler={"type": "random"})
    spec = load_spec(path)
    open_study(spec).enqueue_trial({"train.lr": 1e3})  # AdamW at lr 1000: NaN within 2 steps
    live_models = []

    def echo(line):  # after each trial (and gc_after_trial): no model may outlive its trial
        gc.collect()
        live_models.append(sum(isinstance(o, LitDecoder) for o in gc.get_objects()))

    study = run_search(spec, progress=False, echo=echo)
    assert live_models and not any(live_models)
    first = study.trials[0]
    assert first.state == TrialState.FAIL
    assert first.user_attrs["failure"].startswith("DivergenceError: training diverged")
    assert len(study.get_trials(states=FINISHED)) == 2


def test_a_raising_trial_is_recorded_and_a_failing_worker_stops(tmp_path, monkeypatch, capsys):
    import nas.training.train

    calls = []

    def flaky(cfg, **kw):
        calls.append(cfg)
        if len(calls) == 1 or len(calls) > 2:
            raise RuntimeError(f"boom {len(calls)}")
        return real(cfg, **kw)

    real = nas.training.train.train
    monkeypatch.setattr(nas.training.train, "train", flaky)
    path = write_spec(tmp_path, preset=WORKER_STUDY, storage=f"sqlite:///{tmp_path}/raise.db",
                      n_trials=2, baselines=False)
    with pytest.raises(SearchError, match=f"{MAX_FAILURES} trials in a row failed.*boom"):
        quiet(load_spec(path))
    study = load(f"sqlite:///{tmp_path}/raise.db", "par")
    states = [t.state for t in study.trials]
    assert states == [TrialState.FAIL, TrialState.COMPLETE] + [TrialState.FAIL] * MAX_FAILURES
    assert study.trials[0].user_attrs["failure"] == "RuntimeError: boom 1"
    assert "RuntimeError: boom" in capsys.readouterr().err  # its traceback, for the bug report


def test_workers_without_an_id_get_distinct_seeds():
    from nas.search.worker import worker_seed_offset

    assert worker_seed_offset(False, None) == 0  # alone: reproducible
    assert worker_seed_offset(True, 3) == 3
    assert len({worker_seed_offset(True, None) for _ in range(5)}) == 5


STALLED_CREATOR = """
import sys, time
from pathlib import Path
from optuna.storages._rdb import storage as rdb
from nas.search.storage import make_storage

url, inside, left = sys.argv[1:]
create = rdb._VersionManager._init_alembic


def stalled(self):  # as a starved worker is, between Optuna's check and its stamp
    Path(inside).touch()
    time.sleep(4)
    create(self)
    Path(left).touch()


rdb._VersionManager._init_alembic = stalled
make_storage(url)
print("ok")
"""


def test_workers_opening_a_new_sqlite_file_together_take_turns_at_its_tables(tmp_path):
    """A worker stalled inside Optuna's table creation holds the others off until the tables
    are whole. Before, the others saw them half made, the losers of that race were refused,
    and a refused worker removed the new file from under the one still creating it."""
    url = f"sqlite:///{tmp_path / 'new.db'}"
    inside, left, log = tmp_path / "inside", tmp_path / "left", tmp_path / "creator.log"
    with log.open("w") as out:
        creator = subprocess.Popen([sys.executable, "-c", STALLED_CREATOR, url, str(inside),
                                    str(left)], stdout=out, stderr=subprocess.STDOUT,
                                   env=env_for_cli())
    wait_for(inside.exists, creator, log, "the creator to stall inside the table creation")
    storage = make_storage(url)
    assert left.exists()  # it waited for the stalled creator's tables to be whole
    assert optuna.get_all_study_names(storage) == []
    assert creator.wait(timeout=120) == 0 and log.read_text().strip() == "ok", log.read_text()
    assert (tmp_path / "new.db").exists()
