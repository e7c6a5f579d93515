"""Leases on every storage, and the resources a worker takes, tested the way they fail: real
`nas search` workers killed with SIGKILL, stopped with SIGTERM, frozen with SIGSTOP, their lease
writes refused by a real database trigger; a lease left unrenewed by a live process; a hung
trial; a journal file's growth; the cores of one host. Tiny models."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy
from optuna.trial import TrialState

import nas.search.storage
from nas.cli import main
from nas.search.lease import KEY, RETRY_SECONDS, Lease, Reclaimer
from nas.search.objective import Objective
from nas.search.spec import load_spec
from nas.search.storage import make_storage, redact
from nas.search.study import FINISHED, open_study
from nas.search.worker import SearchError, run_search
from tests.helpers import TINY_BASE, env_for_cli, nas_cmd, quiet, write_spec
from tests.processes import LONG_STEPS, by_state, start_worker, trials, wait_for

pytestmark = pytest.mark.slow  # trains, serves or kills: make test-fast leaves it out

HOST = socket.gethostname()
# Trials of a second or two: long enough to be caught running.
LONG = {**TINY_BASE, "train": {**TINY_BASE["train"], "steps": 100, "eval_every": 20}}
# Trials that outlast any test, validating often.
ENDLESS = {**TINY_BASE, "train": {**TINY_BASE["train"], "steps": LONG_STEPS, "eval_every": 50}}
# Longer than LEASE_STUDY's grace_period (3 s) and one more interval (1 s): a lease seen
# unchanged for so long by a waiting worker would have expired.
PAST_GRACE = timedelta(seconds=3 + 1)


# The study of these tests: 2 trials of a second or two, leases renewed every second.
LEASE_STUDY = {
    "name": "lease", "n_trials": 2, "baselines": False,
    "space": {"model": {"n_layer": [2, 3]},
              "value_residual": {"mode": ["vanilla", "resformer", "learnable"]},
              "train": {"lr": {"low": 1e-3, "high": 1e-2, "log": True}}},
    "objectives": ["val_loss", "n_params"], "sampler": {"type": "random"},
    "base": LONG, "heartbeat": {"interval": 1, "grace_period": 3},
}


def lease_spec(tmp_path: Path, storage: str, name: str = "lease", **overrides) -> Path:
    """LEASE_STUDY named `name` in tmp_path/<name>.yaml, its artifacts in tmp_path (not runs/,
    for a server's study)."""
    return write_spec(tmp_path, preset=LEASE_STUDY, file=f"{name}.yaml", name=name,
                      storage=storage, artifacts=str(tmp_path / f"{name}-artifacts"),
                      **overrides)


def renewed_at(storage: str, number: int, name: str = "lease") -> datetime:
    """When trial `number`'s lease was last renewed, as stored (its worker's clock)."""
    trial = next(t for t in trials(storage, name) if t.number == number)
    return datetime.fromisoformat(trial.system_attrs[KEY]["renewed"])


def running_with_lease(storage: str, pid: int, name: str = "lease"):
    """The RUNNING trial that worker `pid` validates and holds a lease on, if any."""
    return next((t for t in trials(storage, name) if t.state == TrialState.RUNNING
                 and t.user_attrs.get("last_validation")
                 and t.system_attrs.get(KEY, {}).get("worker") == f"{HOST}:{pid}"), None)


@pytest.fixture(params=["sqlite", "journal", "postgres"])
def storage(request, tmp_path) -> str:
    if request.param == "postgres":
        return request.getfixturevalue("pg_url")
    return {"sqlite": f"sqlite:///{tmp_path}/lease.db",
            "journal": f"journal:{tmp_path}/lease.log"}[request.param]


# -- point 1: a worker killed or stopped, then restarted, on every storage ---------------------


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_a_stopped_worker_and_a_restart_end_with_exactly_n_trials(tmp_path, storage, signum):
    spec = lease_spec(tmp_path, storage)
    log = tmp_path / "a.log"
    worker = start_worker(spec, None, log)
    stopped = wait_for(lambda: by_state(storage, "lease")[TrialState.COMPLETE]
                       and running_with_lease(storage, worker.pid), worker, log,
                       "a trial running after a finished one")
    worker.send_signal(signum)
    assert worker.wait(timeout=60) == (-9 if signum == signal.SIGKILL else 143), log.read_text()
    kept = {t.number: (t.values, t.params, t.datetime_complete)
            for s in FINISHED for t in by_state(storage, "lease")[s]}

    restart = tmp_path / "b.log"
    again = start_worker(spec, None, restart)
    assert again.wait(timeout=240) == 0, restart.read_text()
    states = by_state(storage, "lease")
    assert sum(len(states[s]) for s in FINISHED) == 2, restart.read_text()
    assert not states[TrialState.RUNNING] and not states[TrialState.WAITING]
    for s in FINISHED:
        for t in states[s]:
            if t.number in kept:
                assert kept.pop(t.number) == (t.values, t.params, t.datetime_complete)
    assert not kept, "a finished trial changed or vanished"
    failed = next(t for t in states[TrialState.FAIL] if t.number == stopped.number)
    retries = [t for s in FINISHED for t in states[s]
               if t.system_attrs.get("failed_trial") == stopped.number]
    if signum == signal.SIGKILL:
        # Its worker's pid is dead on this host: failed at once, and retried with its params.
        reason = f"lost: its worker {HOST}:{worker.pid} is gone"
        assert failed.user_attrs["failure"] == reason
        assert f"trial {stopped.number} failed: {reason}; a retry of it is queued" in (
            restart.read_text())
        assert len(retries) == 1 and retries[0].params == stopped.params
        assert retries[0].system_attrs[KEY]["worker"] == f"{HOST}:{again.pid}"  # a lease anew
    else:
        assert failed.user_attrs["failure"] == "interrupted (SIGTERM)" and not retries
    assert "Traceback" not in log.read_text() + restart.read_text()


def test_a_database_restart_mid_study_loses_nothing(tmp_path, pg_cluster, pg_url):
    # Validating every 5 steps, the worker writes to the server several times a second: the
    # server's ~0.2 s away in each restart is sure to meet some of its writes.
    spec = lease_spec(tmp_path, pg_url, base={
        **TINY_BASE, "train": {**TINY_BASE["train"], "steps": 200, "eval_every": 5}})
    log = tmp_path / "a.log"
    worker = start_worker(spec, None, log)
    met = wait_for(lambda: running_with_lease(pg_url, worker.pid), worker, log,
                   "a trial validating")
    def progress():  # what the worker has written: its trials and their last validations
        return [(t.number, t.state, t.user_attrs.get("last_validation"))
                for t in trials(pg_url, "lease")]

    for _ in range(3):
        seen = progress()
        pg_cluster.restart()  # a real `pg_ctl restart`: every connection to the server ends
        # the next restart once the worker has written again (or has stopped, with its line)
        wait_for(lambda seen=seen: worker.poll() is not None or progress() != seen,
                 what="a write after the restart")
    status = worker.wait(timeout=240)
    text = log.read_text()
    assert "Traceback" not in text, text
    # The worker reconnects and goes on (its trial and the next), or stops with one line.
    errors = [line for line in text.splitlines() if line.startswith("nas search:")]
    assert (status, errors) == (0, []) or (status == 1 and len(errors) == 1 and errors[0]
                                           .startswith("nas search: lost its storage")), text
    kept = {t.number: (t.values, t.params, t.datetime_complete)
            for s in FINISHED for t in by_state(pg_url, "lease")[s]}

    rerun = tmp_path / "rerun.log"
    again = start_worker(spec, None, rerun)
    assert again.wait(timeout=240) == 0, rerun.read_text()
    assert "Traceback" not in rerun.read_text()
    states = by_state(pg_url, "lease")
    assert sum(len(states[s]) for s in FINISHED) == 2, rerun.read_text()
    assert not states[TrialState.RUNNING] and not states[TrialState.WAITING]
    assert {t.number: (t.values, t.params, t.datetime_complete)
            for s in FINISHED for t in states[s] if t.number in kept} == kept
    if status == 0:  # reconnected: the trial the restarts met went on to its end
        assert met.number in {t.number for s in FINISHED for t in states[s]}


def test_a_server_gone_for_good_stops_the_worker_with_one_line(tmp_path, pg_cluster, pg_url,
                                                                monkeypatch, capsys):
    monkeypatch.setattr(nas.search.storage, "RECONNECT_SECONDS", 1.0)  # not a minute
    spec = lease_spec(tmp_path, pg_url, n_trials=1, base=ENDLESS)

    def drop_database_once_a_trial_validates() -> None:
        wait_for(lambda: any(t.user_attrs.get("last_validation")
                             for t in trials(pg_url, "lease")), what="a trial validating")
        # Every connection to it ends, and no new one is let in: a server gone for this worker.
        engine = sqlalchemy.create_engine(pg_cluster.url, isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            name = sqlalchemy.engine.make_url(pg_url).database
            conn.exec_driver_sql(f'DROP DATABASE "{name}" WITH (FORCE)')
        engine.dispose()

    dropper = threading.Thread(target=drop_database_once_a_trial_validates, daemon=True)
    dropper.start()
    with pytest.raises(SearchError) as stopped:
        run_search(load_spec(spec), progress=False, echo=lambda line: None, threads=1)
    dropper.join(timeout=60)
    assert not dropper.is_alive()
    assert str(stopped.value).startswith(f"lost its storage {redact(pg_url)}: ")
    assert str(stopped.value).endswith("; run the same command again once it is back")
    assert "\n" not in str(stopped.value) and "Traceback" not in capsys.readouterr().err


# -- a lease expires on the reclaiming worker's clock; a renewed one never does -----------------


@pytest.mark.parametrize("storage", ["journal", "postgres"], indirect=True)  # not SQLite: CI time
def test_an_unrenewed_lease_expires_and_a_renewed_one_never_does(tmp_path, storage):
    spec = lease_spec(tmp_path, storage, n_trials=2, objectives=["val_loss"],
                      base={**TINY_BASE})
    study = open_study(load_spec(spec))
    # This process holds two trials: one whose lease it renews, one whose lease it wrote once
    # and then let lapse (a frozen or cut-off worker: its pid lives, its lease does not).
    renewed, lapsed = study.ask(), study.ask()
    with Lease(lapsed, 1, print):
        pass
    log = tmp_path / "w.log"
    with Lease(renewed, 1, print):
        worker = start_worker(spec, None, log)
        wait_for(lambda: by_state(storage, "lease")[TrialState.COMPLETE], worker, log, "the retry")
        wait_for(lambda: "waiting for 1 running trial(s)" in log.read_text(), worker, log,
                 "the wait for the renewed trial")
        # The worker waits while this process renews the lease past grace_period: the renewed
        # trial still holds its slot.
        since = renewed_at(storage, renewed.number)
        wait_for(lambda: renewed_at(storage, renewed.number) - since > PAST_GRACE, worker, log,
                 "renewals past grace_period")
        assert by_state(storage, "lease")[TrialState.RUNNING][0].number == renewed.number
    study.tell(renewed, 3.0)
    assert worker.wait(timeout=60) == 0, log.read_text()
    states = by_state(storage, "lease")
    [failed] = states[TrialState.FAIL]
    assert failed.number == lapsed.number
    assert failed.user_attrs["failure"].startswith(
        f"lost: its worker {HOST}:{os.getpid()} did not renew its lease for ")
    [retry] = [t for t in states[TrialState.COMPLETE] if t.number != renewed.number]
    assert retry.system_attrs["failed_trial"] == lapsed.number


# -- point 3: a live trial is never failed as dead --------------------------------------------


def refuse_lease_writes(engine: sqlalchemy.Engine, on: bool) -> None:
    """A real database trigger that makes every write of a trial system attribute (what a lease
    renewal writes) fail, or its removal."""
    with engine.begin() as conn:
        if engine.name == "sqlite":  # an unknown function fails the statement that fires it
            statements = ([f"CREATE TRIGGER refuse_{op} BEFORE {op} ON trial_system_attributes "
                           "BEGIN SELECT injected_failure(); END" for op in ("INSERT", "UPDATE")]
                          if on else ["DROP TRIGGER refuse_INSERT", "DROP TRIGGER refuse_UPDATE"])
        else:
            statements = [
                "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS "
                "$$ BEGIN RAISE EXCEPTION 'injected failure'; END $$",
                "CREATE TRIGGER refuse BEFORE INSERT OR UPDATE ON trial_system_attributes "
                "FOR EACH ROW EXECUTE FUNCTION refuse()"] if on else [
                "DROP TRIGGER refuse ON trial_system_attributes", "DROP FUNCTION refuse()"]
        for statement in statements:
            conn.exec_driver_sql(statement)


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_failing_lease_writes_are_retried_and_the_live_trial_is_kept(tmp_path, request,
                                                                     backend):
    grace = 10  # seconds: the failures last a few, the test waits past them
    storage = (f"sqlite:///{tmp_path}/lease.db" if backend == "sqlite"
               else request.getfixturevalue("pg_url"))
    spec = lease_spec(tmp_path, storage, n_trials=1, base=ENDLESS,
                      heartbeat={"interval": 1, "grace_period": grace})
    log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"
    a = start_worker(spec, None, log_a)
    wait_for(lambda: running_with_lease(storage, a.pid), a, log_a, "a trial validating")
    b = start_worker(spec, None, log_b)  # waits for the slot; would fail a lapsed lease's trial
    wait_for(lambda: "waiting for 1 running trial(s)" in log_b.read_text(), b, log_b, "the wait")
    engine = make_storage(storage).engine
    refuse_lease_writes(engine, on=True)
    wait_for(lambda: "renewing its lease failed" in log_a.read_text(), a, log_a, "a failure")
    [trial] = trials(storage, "lease")
    last = renewed_at(storage, trial.number)  # the last renewal before the failures
    # more failed renewals (one every RETRY_SECONDS), within grace_period
    wait_for(lambda: datetime.now(timezone.utc) - last > timedelta(seconds=3 * RETRY_SECONDS),
             a, log_a, "more failed renewals")
    refuse_lease_writes(engine, on=False)
    wait_for(lambda: "lease renewed again" in log_a.read_text(), a, log_a, "a renewal")
    # renewed on, past grace_period (and b's next look) since the last renewal before the
    # failures: a lease lost there would have expired
    wait_for(lambda: renewed_at(storage, trial.number) - last > timedelta(seconds=grace + 2),
             a, log_a, "renewals past grace_period since the failures")
    [trial] = trials(storage, "lease")
    assert trial.state == TrialState.RUNNING, log_b.read_text()
    for proc in (a, b):
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 143
    text = log_a.read_text()
    assert text.count("renewing its lease failed") == 1 and text.count("renewed again") == 1
    assert "retrying every 1 s" in text and "Traceback" not in text
    assert "lost" not in log_b.read_text()


@pytest.mark.parametrize("storage", ["journal", "postgres"], indirect=True)  # not SQLite: CI time
def test_a_trial_failed_by_another_worker_is_dropped_with_one_line(tmp_path, storage):
    spec = lease_spec(tmp_path, storage, n_trials=1, base=ENDLESS)
    log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"
    a = start_worker(spec, None, log_a)
    wait_for(lambda: running_with_lease(storage, a.pid), a, log_a, "a trial validating")
    b = start_worker(spec, None, log_b)
    wait_for(lambda: "waiting for 1 running trial(s)" in log_b.read_text(), b, log_b, "the wait")
    a.send_signal(signal.SIGSTOP)  # frozen past grace_period: b takes it for dead
    try:
        wait_for(lambda: by_state(storage, "lease")[TrialState.FAIL], b, log_b, "the trial failed")
        wait_for(lambda: running_with_lease(storage, b.pid), b, log_b, "the retry running")
    finally:
        a.send_signal(signal.SIGCONT)
    wait_for(lambda: "waiting for 1 running trial(s)" in log_a.read_text(), a, log_a,
             "the worker to go on after dropping its trial")
    [failed] = by_state(storage, "lease")[TrialState.FAIL]
    assert failed.user_attrs["failure"].startswith(
        f"lost: its worker {HOST}:{a.pid} did not renew its lease for ")
    dropped = [line for line in log_a.read_text().splitlines() if "failed by another" in line]
    assert dropped == [f"trial {failed.number}: failed by another worker "
                       f"({failed.user_attrs['failure']}); this worker drops it"]
    for proc in (a, b):
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 143
    assert "Traceback" not in log_a.read_text() + log_b.read_text()


def test_a_trial_failed_after_its_last_write_is_dropped_with_one_line(tmp_path, monkeypatch):
    # The race behind Optuna's "Cannot tell a FAIL trial": another worker fails the trial after
    # its objective's last write, before Optuna records the result. Made to happen on cue.
    storage = f"sqlite:///{tmp_path}/lease.db"
    spec = lease_spec(tmp_path, storage, n_trials=1, base=TINY_BASE)
    run_trial = Objective.__call__

    def then_failed_by_another_worker(self, trial):
        values = run_trial(self, trial)
        if trial.number == 0:
            other = Reclaimer(grace_period=0, max_retry=2)  # another worker, impatient
            other.reclaim(trial.study)  # sees the trial's lease...
            assert other.reclaim(trial.study)  # ...unrenewed since: expired, failed, retried
        return values

    monkeypatch.setattr(Objective, "__call__", then_failed_by_another_worker)
    lines: list[str] = []
    run_search(load_spec(spec), progress=False, echo=lines.append, threads=1)
    states = by_state(storage, "lease")
    [failed] = states[TrialState.FAIL]
    assert failed.number == 0
    assert [line for line in lines if "another worker" in line] == [
        f"trial 0: failed by another worker ({failed.user_attrs['failure']}); this worker "
        "drops it"]
    assert [t.system_attrs["failed_trial"] for s in FINISHED for t in states[s]] == [0]


@pytest.mark.parametrize("heartbeat,got", [({"interval": 10, "grace_period": 15}, 15),
                                           ({"interval": 20}, 30)])
def test_a_grace_period_under_twice_the_interval_is_refused(tmp_path, heartbeat, got,
                                                            capsys):
    spec = lease_spec(tmp_path, f"sqlite:///{tmp_path}/lease.db", heartbeat=heartbeat)
    assert main(["search", str(spec)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"nas search: error: {spec}: heartbeat.grace_period: must be at least twice "
        f"heartbeat.interval ({heartbeat['interval']} s), got {got}: a live worker's lease may "
        "be renewed an interval late"]
    assert not (tmp_path / "lease.db").exists()


def test_a_worker_that_stops_short_of_its_target_exits_1_and_says_why(tmp_path, capsys):
    storage = f"sqlite:///{tmp_path}/lease.db"
    spec = lease_spec(tmp_path, storage, n_trials=5)
    assert main(["search", str(spec), "--no-progress", "--threads", "1", "--timeout", "1"]) == 1
    finished = sum(len(trials) for s, trials in by_state(storage, "lease").items()
                   if s in FINISHED)
    assert 0 < finished < 5
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"nas search: stopped with {finished} of n_trials 5 finished: --timeout 1 s ran out; "
        "run the same command again to go on")


# -- point 8: resources --------------------------------------------------------------------------


def test_max_time_fails_a_hung_trial_with_its_reason(tmp_path, storage, capsys):
    spec = lease_spec(tmp_path, storage, base={
        **ENDLESS, "train": {**ENDLESS["train"], "max_time": 2}})
    study = quiet(load_spec(spec), n_trials=1)
    [trial] = study.trials
    assert trial.state == TrialState.FAIL
    failure = trial.user_attrs["failure"]
    assert failure.startswith("TimeLimitError: train.max_time 2 s reached at step ")
    assert failure.endswith(f" of {LONG_STEPS}")
    assert trial.user_attrs["curve"]  # what it reached is kept
    assert "Traceback" not in capsys.readouterr().err  # a limit, not a bug


def journal_size_and_writes(tmp_path: Path, name: str, steps: int) -> tuple[int, dict]:
    """One trial validating every 2 steps on its own journal file: the file's size, and how
    many times each curve attribute was written."""
    storage = f"journal:{tmp_path}/{name}.log"
    spec = lease_spec(tmp_path, storage, name=name, objectives=["val_loss"],
                      space={"model": {"n_layer": 2}, "value_residual": {"mode": ["vanilla"]}},
                      base={**TINY_BASE, "train": {**TINY_BASE["train"], "steps": steps,
                                                   "eval_every": 2}},
                      heartbeat={"interval": 600, "grace_period": 1200})  # no renewals
    quiet(load_spec(spec), n_trials=1)
    path = Path(storage.removeprefix("journal:"))
    writes: dict[str, int] = {}
    for line in path.read_text().splitlines():
        for key in json.loads(line).get("user_attr", {}):
            writes[key] = writes.get(key, 0) + 1
    return path.stat().st_size, writes


def test_a_journal_grows_linearly_with_validations(tmp_path):
    short, short_writes = journal_size_and_writes(tmp_path, "v10", steps=20)
    long, long_writes = journal_size_and_writes(tmp_path, "v60", steps=120)
    assert short_writes["curve"] == long_writes["curve"] == 1  # once, when the trial ends
    assert (short_writes["last_validation"], long_writes["last_validation"]) == (10, 60)
    # Rewriting the whole curve at each validation adds ~20 bytes x the validations so far per
    # validation (~700 bytes a validation over these 50); one point at a time, ~100.
    assert (long - short) / 50 < 300


def test_workers_on_one_host_share_its_cores(tmp_path):
    cores = len(os.sched_getaffinity(0))
    # Neither --threads nor OMP_NUM_THREADS: the default; a registry of this test's own.
    env = {**env_for_cli(), "PYTHONUNBUFFERED": "1",
           "RESFORMER_NAS_WORKERS": str(tmp_path / "workers")}
    env.pop("OMP_NUM_THREADS", None)

    def worker(spec: Path, log: Path) -> subprocess.Popen:
        return subprocess.Popen(nas_cmd("search", str(spec), "--no-progress"),
                                stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)

    first = lease_spec(tmp_path, f"sqlite:///{tmp_path}/a.db", name="a", n_trials=1,
                       base=ENDLESS)
    second = lease_spec(tmp_path, f"journal:{tmp_path}/b.log", name="b", n_trials=1,
                        base=TINY_BASE)
    log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"
    a = worker(first, log_a)
    wait_for(lambda: running_with_lease(f"sqlite:///{tmp_path}/a.db", a.pid, "a"), a, log_a,
             "a trial validating")
    b = worker(second, log_b)
    assert b.wait(timeout=120) == 0, log_b.read_text()
    a.send_signal(signal.SIGTERM)
    assert a.wait(timeout=60) == 143
    assert f"threads: {cores} ({cores} core(s) / 1 nas search worker(s) on this host)" in (
        log_a.read_text())
    # Another study's worker on the same host counts as much as one of the same study.
    assert (f"threads: {max(1, cores // 2)} ({cores} core(s) / 2 nas search worker(s) on this "
            "host)") in log_b.read_text()
    assert not any((tmp_path / "workers").iterdir())  # both gave their place back
