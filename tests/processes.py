"""The one place for tests that start a `nas` command in the background and watch it (signals,
leases, several workers, servers): start it, wait for a condition with a deadline while it
lives, read its study back. Study specs are written by tests.helpers.write_spec."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState

from nas.search.storage import make_storage
from tests.helpers import env_for_cli, nas_cmd

LONG_STEPS = 20_000  # minutes of training: far longer than any test waits
POLL = 0.2  # seconds between two looks at a condition


def start(*args: str, log: Path) -> subprocess.Popen:
    """A `nas` command in the background on one thread, its output (unbuffered: the test reads
    it while the command runs) in `log`."""
    env = {**env_for_cli(), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(nas_cmd(*args), stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env=env)


def start_worker(spec: Path, worker_id: int | None, log: Path, *extra: str) -> subprocess.Popen:
    """A `nas search` worker on one thread in the background (`--worker-id` unless None)."""
    worker = ["--worker-id", str(worker_id)] if worker_id is not None else []
    return start("search", str(spec), "--no-progress", "--threads", "1", *worker, *extra,
                 log=log)


def wait_for(predicate, proc: subprocess.Popen | None = None, log: Path | None = None,
             what: str = "the condition", timeout: float = 180):
    """Poll `predicate` until it returns something true, and return that. Fails once `timeout`
    seconds pass (the deadline is generous: a busy machine only makes the wait longer), or, with
    `proc`, as soon as that process exits first (its `log` in the message)."""
    deadline = time.monotonic() + timeout
    while not (found := predicate()):
        text = log.read_text() if log is not None and log.exists() else ""
        assert proc is None or proc.poll() is None, (
            f"exited {proc.returncode} before {what}: {text}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {text}"
        time.sleep(POLL)
    return found


def finish(proc: subprocess.Popen, log: Path, timeout: float = 240) -> str:
    """Wait for `proc` to exit 0; its log."""
    proc.wait(timeout=timeout)
    text = log.read_text()
    assert proc.returncode == 0, text
    return text


def load(storage: str, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=make_storage(storage))


def trials(storage: str, name: str) -> list[optuna.trial.FrozenTrial]:
    """The study's trials; none while it is not created yet."""
    try:
        return load(storage, name).trials
    except KeyError:
        return []


def by_state(study: optuna.Study | str, name: str | None = None) -> dict[TrialState, list]:
    """A study's trials by state: of `study`, or of the study `name` in storage `study`."""
    found = trials(study, name) if isinstance(study, str) else study.get_trials(deepcopy=False)
    out: dict[TrialState, list] = {s: [] for s in TrialState}
    for t in found:
        out[t.state].append(t)
    return out
