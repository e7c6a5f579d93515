"""Helpers for tests that start a `nas` command in the background and watch its log and its
storage (signals, leases): start it, wait for a condition while it lives, read its trials."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import optuna

from nas.search.storage import make_storage
from tests.helpers import env_for_cli, nas_cmd

LONG_STEPS = 20_000  # minutes of training: far longer than any test waits


def start(*args: str, log: Path) -> subprocess.Popen:
    """A `nas` command in the background, its output (unbuffered: the test reads it while the
    command runs) in `log`."""
    env = {**env_for_cli(), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(nas_cmd(*args), stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env=env)


def wait_for(predicate, proc: subprocess.Popen, log: Path, what: str, timeout: float = 180):
    deadline = time.monotonic() + timeout
    while not (found := predicate()):
        assert proc.poll() is None, f"exited {proc.returncode} before {what}: {log.read_text()}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {log.read_text()}"
        time.sleep(0.2)
    return found


def trials(storage: str, name: str) -> list[optuna.trial.FrozenTrial]:
    try:
        return optuna.load_study(study_name=name, storage=make_storage(storage)).trials
    except KeyError:  # not created yet
        return []
