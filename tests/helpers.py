"""What the tests share: tiny run configs and study specs, the CLI as a user runs it (in a
subprocess, or in-process through `main`), and free ports. Fixtures live in conftest.py."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import optuna
import torch
import yaml
from optuna.trial import FrozenTrial, create_trial

from nas.config import SOURCES, RunConfig, from_dict
from nas.modes import MODES

ROOT = Path(__file__).resolve().parents[1]

# The fixed part of tiny studies: a few steps of a 2-3 layer, d 32 model.
TINY_BASE = {
    "model": {"d_model": 32, "n_head": 2, "seq_len": 16},
    "train": {"steps": 12, "batch_size": 4, "eval_every": 4, "eval_batches": 1, "lr": 3e-3},
}


def tiny(mode: str = "vanilla", *, layers="all", source: str = "first_layer", lambda1=0.5,
         lambda2=0.5, neutreno_lambda=0.5, value_embeddings: int | None = None, v_lambda=0.5,
         ve_lambda=0.5, n_layer: int = 3, d_model: int = 32, n_head: int = 4,
         seq_len: int = 16, steps: int | None = 20, batch_size: int = 8, seed: int = 0,
         **train) -> RunConfig:
    # neutreno reads neutreno_lambda and refuses lambda1 (nas.config).
    plan = ({"neutreno_lambda": neutreno_lambda} if mode == "neutreno"
            else {"lambda1": lambda1})
    if mode in MODES and "value_embeddings" in MODES[mode].keys:
        # the value-embedding family: by default as many tables as fit (n_layer // 2)
        plan.update(value_embeddings=value_embeddings or n_layer // 2,
                    v_lambda=v_lambda, ve_lambda=ve_lambda)
    return from_dict({
        "model": {"n_layer": n_layer, "d_model": d_model, "n_head": n_head, "seq_len": seq_len},
        "value_residual": {"mode": mode, "layers": layers, "source": source,
                           "lambda2": lambda2, **plan},
        "train": {**({"steps": steps} if steps is not None else {}), "batch_size": batch_size,
                  "seed": seed, "eval_batches": 2, **train},
    })


# A tiny multi-objective study: 4 TPE trials over depth, mode and lambda1.
TINY_STUDY = {
    "name": "tiny",
    "space": {"model": {"n_layer": [2, 3]},
              "value_residual": {"mode": ["vanilla", "resformer", "learnable", "svformer"],
                                 "lambda1": {"low": 0.2, "high": 2.0}}},
    "objectives": ["val_loss", "n_params"],
    "n_trials": 4,
    "base": TINY_BASE,
    "sampler": {"type": "tpe", "n_startup_trials": 2},
    "seed": 0,
}
# The study of the tests that run `nas search` workers in real processes (several workers,
# kills, checkpoints): 6 trials of 40 steps, leases renewed every second.
WORKER_STUDY = {
    "name": "par",
    # lr is drawn for every trial, so two workers with the same seed would repeat params.
    "space": {"model": {"n_layer": [2, 3]},
              "value_residual": {"mode": ["vanilla", "resformer", "learnable"]},
              "train": {"lr": {"low": 1e-3, "high": 1e-2, "log": True}}},
    "objectives": ["val_loss", "n_params"],
    "n_trials": 6,
    "base": {**TINY_BASE, "train": {**TINY_BASE["train"], "steps": 40, "eval_every": 10}},
    "sampler": {"type": "tpe", "n_startup_trials": 4},
    "heartbeat": {"interval": 1, "grace_period": 2},
}


def write_spec(folder: Path, *, preset: dict = TINY_STUDY, file: str = "study.yaml",
               **overrides) -> Path:
    """A study spec, `preset` (TINY_STUDY, WORKER_STUDY, or a test's own) with `overrides` on
    top, in folder/`file`; its storage by default folder/tiny.db."""
    spec = {**preset, "storage": f"sqlite:///{folder}/tiny.db", **overrides}
    path = folder / file
    path.write_text(yaml.safe_dump(spec))
    return path


def quiet(*args, **kw):
    """run_search without a progress bar or printing."""
    from nas.search.worker import run_search

    return run_search(*args, progress=False, echo=lambda *_: None, **kw)


def nas_cmd(*args: str) -> list[str]:
    """The `nas` CLI as a user runs it, in a subprocess of this interpreter."""
    return [sys.executable, "-m", "nas", *args]


def env_for_cli() -> dict:
    env = dict(os.environ)
    env.setdefault("PYTHONWARNINGS", "ignore")
    env["HF_HUB_OFFLINE"] = "1"
    return env


def run_cli(*args: str, timeout: int = 600, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(nas_cmd(*args), capture_output=True, text=True, env=env_for_cli(),
                          timeout=timeout, cwd=cwd)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Every mode with each source it reads (vanilla and the value-embedding family read none).
ALL = [(m, s) for m in MODES for s in (SOURCES if "source" in MODES[m].keys else SOURCES[:1])]
# The value-embedding family's modes.
FAMILY = [m for m in MODES if "value_embeddings" in MODES[m].keys]


def randomize_coefficients(model):
    """Move learned coefficients off their init so the tests see a general mix."""
    with torch.no_grad():
        for name, p in model.residual.named_parameters():
            if "value_embedding" not in name:
                p.add_(torch.randn_like(p) * 0.3)


SWEEP_RATES = [0.001, 0.0014, 0.002, 0.002828, 0.003, 0.004, 0.01, 0.03]


def sweep_trial(variant: str, d: int, lr: float, seed: int, val: float, test: float,
                curve: list | None = None, val_batches: list | None = None) -> FrozenTrial:
    """A completed trial of a named-variant sweep with the given losses (no training), as
    nas.search.objective would have stored it, for an in-memory study or `records`."""
    cat = optuna.distributions.CategoricalDistribution
    return create_trial(
        values=[val, 1000.0 * d], user_attrs={
            "variant": variant, "mode": "vanilla" if variant == "vanilla" else "resformer",
            "n_params": 1000 * d, "n_params_non_embedding": 900 * d, "tokens": 20 * 900 * d,
            "tokens_per_model_param": 20.0,
            "val_loss": val, "test_loss": test, "curve": curve or [[10, val]],
            **({"val_batch_losses": val_batches} if val_batches else {}),
            "config": {"model": {"n_layer": 4, "d_model": d},
                       "train": {"lr": lr, "seed": seed, "steps": 10}}},
        params={"variant": variant, "model.d_model": d, "train.lr": lr, "train.seed": seed},
        distributions={"variant": cat(["vanilla", "identity", "sparse"]),
                       "model.d_model": cat([16, 24, 32, 40]),
                       "train.lr": cat(SWEEP_RATES), "train.seed": cat(list(range(16)))})
