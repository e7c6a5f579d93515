"""The trial objective: space -> trial -> run config -> training -> the trial's stored record.

One `Objective` call claims a slot (a study never runs more than its target), samples a run
config from the space, refuses configs over the parameter budget or repeating a finished one,
trains it through `nas.train.train` (imported when a trial runs: this module knows nothing of
torch) and writes the trial's attributes. Any failure ends the trial FAIL with its reason.
"""

from __future__ import annotations

import os
import socket
import traceback
from pathlib import Path

import optuna
from optuna.trial import TrialState

from . import space as spaces
from .artifacts import upload_trial_artifacts
from .config import ConfigError, from_dict
from .interrupt import CTRL_C
from .samplers import pareto_pruner
from .spec import StudySpec
from .study import FINISHED


class SurplusTrial(Exception):
    """Another worker already started the study's last trial."""


class Objective:
    def __init__(self, spec: StudySpec, target: int | None, artifacts: Path | None = None):
        self.spec = spec
        self.target = target
        self.artifacts = artifacts  # where config.yaml and curve.csv of each trial go
        self.space = spec.merged_space
        self.pareto = pareto_pruner(spec)

    def _claim_slot(self, trial: optuna.Trial) -> None:
        """With a target, a trial runs only while fewer than `target` trials are finished or
        ahead of it (RUNNING or WAITING with a lower number). Trial numbers give every pair of
        workers the same order, so two workers never both take the last slot."""
        if self.target is None:
            return
        ahead = sum(t.state in FINISHED or (t.state in (TrialState.RUNNING, TrialState.WAITING)
                                            and t.number < trial.number)
                    for t in trial.study.get_trials(deepcopy=False))
        if ahead >= self.target:
            trial.set_user_attr("failure", f"surplus: the study already has its {self.target} "
                                "trials")
            raise SurplusTrial(f"study already has {self.target} trials")

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, ...]:
        """Run one trial. Any failure is recorded in the trial's `failure` attribute and the
        trial ends FAIL (the search goes on); Ctrl+C fails the trial and stops the worker."""
        from .lit import DivergenceError

        self._claim_slot(trial)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        try:
            return self._run(trial)
        except optuna.TrialPruned:
            raise
        except KeyboardInterrupt:
            trial.set_user_attr("failure", "interrupted (Ctrl+C or SIGTERM)")
            raise
        except Exception as exc:
            trial.set_user_attr("failure", f"{type(exc).__name__}: {exc}")
            if not isinstance(exc, DivergenceError):
                traceback.print_exc()  # a bug or a broken machine, not a bad config
            raise

    def _run(self, trial: optuna.Trial) -> float | tuple[float, ...]:
        from .model import count_params
        from .train import train

        force = "vanilla" if trial.user_attrs.get("baseline") else None
        raw = spaces.sample(self.space, trial, force_mode=force)
        try:
            cfg = from_dict(raw, where="trial")
        except ConfigError as exc:
            trial.set_user_attr("pruned_reason", f"invalid config: {exc}")
            raise optuna.TrialPruned(str(exc)) from None
        counts = count_params(cfg)
        vr = cfg.value_residual
        attrs = {**counts, "mode": vr.mode, "source": vr.source,
                 "receiving_layers": vr.receiving(cfg.model.n_layer), "config": cfg.to_dict()}
        if self.space.get("variants"):
            attrs["variant"] = force or trial.params["variant"]
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        if self.spec.max_params is not None:
            trial.set_constraint("n_params", counts["n_params"] - self.spec.max_params)
            if counts["n_params"] > self.spec.max_params:
                reason = f"over budget: {counts['n_params']:,} > {self.spec.max_params:,} params"
                trial.set_user_attr("pruned_reason", reason)
                raise optuna.TrialPruned(reason)
        if self.pareto is not None:
            reason = self.pareto.duplicate_of(trial.study, attrs["config"])
            if reason:
                trial.set_user_attr("pruned_reason", reason)
                trial.set_user_attr("steps_trained", 0)
                raise optuna.TrialPruned(reason)

        curve: list[list[float]] = []

        def on_validation(step: int, loss: float) -> None:
            CTRL_C.check()
            curve.append([step, round(loss, 6)])
            trial.set_user_attr("curve", curve)
            if self.pareto is not None:
                reason = self.pareto.reason_to_prune(trial.study, counts["n_params"], curve,
                                                     cfg.train.steps)
                if reason:
                    trial.set_user_attr("pruned_reason", reason)
                    raise optuna.TrialPruned(reason)

        callbacks = []
        if not self.spec.multi_objective and self.spec.pruner["type"] in ("median", "hyperband"):
            from optuna_integration import PyTorchLightningPruningCallback

            callbacks.append(PyTorchLightningPruningCallback(trial, monitor="val_loss"))
        try:
            metrics = train(cfg, progress=False, on_validation=on_validation, callbacks=callbacks)
        except optuna.TrialPruned as exc:
            trial.set_user_attr("steps_trained", curve[-1][0] if curve else 0)
            if "pruned_reason" not in trial.user_attrs:
                trial.set_user_attr("pruned_reason", f"{self.spec.pruner['type']}: {exc}")
            raise
        finally:
            upload_trial_artifacts(trial, attrs["config"], curve, self.artifacts)
        for key in ("val_loss", "val_loss_se", "val_ppl", "test_loss", "test_loss_se",
                    "val_batch_losses", "test_batch_losses", "tokens", "tokens_per_param",
                    "tokens_per_s", "train_seconds", "coefficients", "curve", "analysis"):
            trial.set_user_attr(key, metrics[key])
        trial.set_user_attr("steps_trained", metrics["steps"])
        values = tuple(float(metrics[o]) for o in self.spec.objectives)
        return values if self.spec.multi_objective else values[0]
