"""Helpers for tests that run `nas search` workers in real processes on a real storage (the
multi-worker, kill and checkpoint tests): a small study spec, a worker in the background, and
reading the study back."""

from __future__ import annotations

import subprocess
import time

import optuna
import yaml
from optuna.trial import TrialState

from nas.search.storage import make_storage
from tests.helpers import TINY_BASE, env_for_cli, nas_cmd

STEPS = {"train": {**TINY_BASE["train"], "steps": 40, "eval_every": 10}}


def write_spec(tmp_path, storage, name="par", **overrides):
    spec = {
        "name": name,
        # lr is drawn for every trial, so two workers with the same seed would repeat params.
        "space": {"model": {"n_layer": [2, 3]},
                  "value_residual": {"mode": ["vanilla", "resformer", "learnable"]},
                  "train": {"lr": {"low": 1e-3, "high": 1e-2, "log": True}}},
        "objectives": ["val_loss", "n_params"],
        "n_trials": 6,
        "storage": storage,
        "base": {**TINY_BASE, **STEPS},
        "sampler": {"type": "tpe", "n_startup_trials": 4},
        "heartbeat": {"interval": 1, "grace_period": 2},
    }
    spec.update(overrides)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def start_worker(spec_path, worker_id, log_path, *extra):
    env = {**env_for_cli(), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        nas_cmd("search", str(spec_path), "--no-progress", "--threads", "1",
                *(["--worker-id", str(worker_id)] if worker_id is not None else []), *extra),
        stdout=open(log_path, "w"), stderr=subprocess.STDOUT, env=env)


def finish(proc, log_path, timeout=240):
    proc.wait(timeout=timeout)
    text = log_path.read_text()
    assert proc.returncode == 0, text
    return text


def load(storage, name="par"):
    return optuna.load_study(study_name=name, storage=make_storage(storage))


def by_state(study):
    out = {s: [] for s in TrialState}
    for t in study.get_trials(deepcopy=False):
        out[t.state].append(t)
    return out


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")
