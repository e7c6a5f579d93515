"""The trial objective: space -> trial -> run config -> training -> the trial's stored record.

One `Objective` call claims a slot (a study never runs more than its target), samples a run
config from the space, refuses configs over a budget (parameters, KV cache), completes a
repeat of a completed one from its record (the Pareto pruner prunes it instead), trains it
through `nas.training.train.train` (imported when a trial runs: this module knows nothing of
torch) and writes the trial's attributes. Any failure ends the trial FAIL
with its reason. With `replicates: R` > 1 the config trains on R seeds after replicate 0, which
alone the pruners watch, and the trial stores their combination (`nas.search.replicates`).
"""

from __future__ import annotations

import json
import os
import shutil
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

from nas.config import RunConfig, from_dict
from nas.errors import ConfigError
from nas.interrupt import CTRL_C
from nas.modes import BASELINE_MODE
from nas.search import lr_sweep
from nas.search import space as spaces
from nas.search.artifacts import checkpoint_folder, upload_trial_artifacts
from nas.search.lease import Heartbeat, Lease, worker_name
from nas.search.pruning import judged_on
from nas.search.replicates import FIELDS as REPLICATE_FIELDS
from nas.search.replicates import combine, replicate_seeds
from nas.search.samplers import pareto_pruner
from nas.search.spec import CONSTRAINTS, StudySpec
from nas.search.study import FINISHED, own_trials
from nas.search.trials import TrialRecord, same_run, write_record

# What a trained trial stores of its run's metrics besides its steps and time (a copy of it,
# `Objective._copy`, stores the same)
MEASURED = ("val_loss", "val_loss_se", "val_ppl", "test_loss", "test_loss_se",
            "val_batch_losses", "test_batch_losses", "tokens", "tokens_per_model_param",
            "tokens_per_s", "coefficients", "curve", "analysis", "decode_tokens_per_s",
            "numerics")


class SurplusTrial(Exception):
    """Another worker already started the study's last trial."""


class Objective:
    def __init__(self, spec: StudySpec, target: int | None, artifacts: Path | None = None,
                 lease_interval: float = Heartbeat().interval,
                 echo: Callable[[str], None] = print):
        self.spec = spec
        self.target = target
        self.artifacts = artifacts  # where config.yaml and curve.csv of each trial go
        self.lease_interval, self.echo = lease_interval, echo  # echo: the lease's lines
        self.started = 0  # trials this objective was called for
        self.trial: optuna.Trial | None = None  # the last of them, until it is dropped
        self.space = spec.trial_space
        self.pareto = pareto_pruner(spec)

    def _claim_slot(self, trial: optuna.Trial) -> None:
        """A queue-driven study's trial (a derived study's, an lr sweep's) runs only from its
        queue. With a target, a trial runs only while fewer than `target` trials are finished
        or ahead of it (RUNNING or WAITING with a lower number). Trial numbers give every pair
        of workers the same order, so two workers never both take the last slot, nor both run
        a queued trial that they queued twice (the later copy is surplus)."""
        queue_driven = self.spec.queue_driven
        if queue_driven:
            queued = trial.storage.get_trial_system_attrs(trial._trial_id).get("fixed_params")
            if queued is None:
                # Such a study runs its queue alone: another worker took the last queued trial
                # between this worker's check and its ask, and Optuna began a trial of its own
                # (an lr sweep's sampler would repeat a run, and its arm would keep the luckier).
                write_record(trial, failure="surplus: nothing left in the study's queue")
                raise SurplusTrial("nothing left in the study's queue")
            copy_of = lr_sweep.earlier_copy(own_trials(trial.study), trial.number, queued)
            if copy_of is not None:
                write_record(trial, failure=f"surplus: a second copy of trial {copy_of} (two "
                             "workers queued it at once)")
                raise SurplusTrial(f"a second copy of trial {copy_of}")
        if self.target is None:
            return
        ahead = [t for t in own_trials(trial.study)
                 if t.state in FINISHED or (t.state in (TrialState.RUNNING, TrialState.WAITING)
                                            and t.number < trial.number)]
        # a queue's copies (see above) hold one slot between them
        if (lr_sweep.distinct_count(ahead) if queue_driven else len(ahead)) >= self.target:
            write_record(trial, failure=f"surplus: the study already has its {self.target} "
                         "trials")
            raise SurplusTrial(f"study already has {self.target} trials")

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, ...]:
        """Run one trial. Any failure is recorded in the trial's `failure` attribute and the
        trial ends FAIL (the search goes on); Ctrl+C fails the trial and stops the worker. The
        trial holds a lease (`nas.search.lease`) throughout; one that another worker failed
        meanwhile raises TrialLost, with nothing more written to it."""
        from nas.training.lit import DivergenceError
        from nas.training.train import TimeLimitError

        self.started += 1
        self.trial = trial
        with Lease(trial, self.lease_interval, self.echo) as lease:
            try:
                self._claim_slot(trial)
                write_record(trial, worker=worker_name())
                return self._run(trial, lease)
            except UpdateFinishedTrialError:  # a write found the trial failed by another worker
                raise lease.lost_trial() from None
            except (optuna.TrialPruned, SurplusTrial):
                raise  # a surplus trial keeps its `surplus:` failure, which the gate skips
            except KeyboardInterrupt as exc:  # Interrupted names its signal; bare is Ctrl+C
                write_record(trial, failure=str(exc) or "interrupted (Ctrl+C)")
                raise
            except Exception as exc:
                write_record(trial, failure=f"{type(exc).__name__}: {exc}")
                if not isinstance(exc, (DivergenceError, TimeLimitError)):
                    traceback.print_exc()  # a bug or a broken machine, not a bad config
                raise

    def _checkpoints(self, trial: optuna.Trial, cfg: RunConfig) -> tuple[Path | None, int | None]:
        """Where this trial saves checkpoints (None without `train.checkpoint_every` or an
        artifact folder), and the step it resumes at from the last one an earlier attempt left
        there (None: from step 0). Optuna retries a trial whose worker died as a new trial
        that records the first attempt's number (`failed_trial`); all attempts share its
        folder."""
        from nas.training.checkpoint import LAST, resume_step

        if not cfg.train.checkpoint_every or self.artifacts is None:
            return None, None
        frozen = next(t for t in trial.study.get_trials(deepcopy=False)
                      if t.number == trial.number)
        first = frozen.system_attrs.get("failed_trial", trial.number)
        folder = checkpoint_folder(self.artifacts, self.spec.name, first)
        if not (folder / LAST).is_file():
            return folder, None
        return folder, resume_step(folder / LAST, cfg)

    def _run(self, trial: optuna.Trial, lease: Lease) -> float | tuple[float, ...]:
        from nas.model.decoder import count_params, kv_bytes_per_token

        force = BASELINE_MODE if TrialRecord.from_trial(trial).baseline else None
        raw = spaces.sample(self.space, trial, force_mode=force)
        try:
            cfg = from_dict(raw, where="trial")
        except ConfigError as exc:
            write_record(trial, pruned_reason=f"invalid config: {exc}")
            raise optuna.TrialPruned(str(exc)) from None
        counts = count_params(cfg)
        vr = cfg.value_residual
        attrs = {**counts, "kv_bytes_per_token": kv_bytes_per_token(cfg),
                 "mode": vr.mode, "source": vr.source,
                 "receiving_layers": vr.receiving(cfg.model.n_layer), "config": cfg.to_dict()}
        if self.space.get("variants"):
            attrs["variant"] = force or trial.params["variant"]
        write_record(trial, **attrs)
        # Every budget's constraint before pruning on any: GP wants as many on every trial.
        over = []
        for key, (name, unit) in CONSTRAINTS.items():
            limit = getattr(self.spec, key)
            if limit is not None:
                trial.set_constraint(name, attrs[name] - limit)
                if attrs[name] > limit:
                    over.append(f"{attrs[name]:,} > {limit:,} {unit}")
        if over:
            reason = f"over budget: {'; '.join(over)}"
            write_record(trial, pruned_reason=reason)
            raise optuna.TrialPruned(reason)
        earlier = same_run(trial.study, attrs["config"])
        if earlier is not None:
            if self.pareto is None and earlier.state == TrialState.COMPLETE:
                return self._copy(trial, earlier, attrs["config"])
            outcome = (f"val_loss {earlier.val_loss:.4f}"
                       if earlier.state == TrialState.COMPLETE else "pruned")
            reason = (f"duplicate of trial {earlier.number} ({outcome}): the same run config "
                      "trains to the same curve")
            write_record(trial, pruned_reason=reason, steps_trained=0)
            raise optuna.TrialPruned(reason)

        known = {name: attrs[name] for name in judged_on(self.spec.objectives)}
        curve: list[list[float]] = []
        reports_to_optuna = not self.spec.multi_objective and self.spec.pruner.type in (
            "median", "hyperband")

        def on_validation(step: int, loss: float) -> None:
            CTRL_C.check()
            lease.check()
            if curve and curve[-1][0] == step:  # the final validation, on every batch
                curve.pop()
            curve.append([step, round(loss, 6)])
            # The latest point only: the whole curve is written once, when the trial ends.
            write_record(trial, last_validation=curve[-1])
            if step >= cfg.train.steps:
                return  # fully trained: nothing left to save by stopping it; it completes
            if reports_to_optuna:
                # At the global step: the median and hyperband pruners compare trials at equal
                # training progress (optuna-integration's Lightning callback reports the epoch,
                # and a run is one epoch).
                trial.report(loss, step)
                if trial.should_prune():
                    reason = f"{self.spec.pruner.type}: pruned at step {step}"
                    write_record(trial, pruned_reason=reason)
                    raise optuna.TrialPruned(reason)
            if self.pareto is not None:
                reason = self.pareto.reason_to_prune(trial.study, known, curve,
                                                     cfg.train.steps)
                if reason:
                    write_record(trial, pruned_reason=reason)
                    raise optuna.TrialPruned(reason)

        checkpoints, resumed_step = self._checkpoints(trial, cfg)
        finished = FinishedReplicates(checkpoints if self.spec.replicates > 1 else None,
                                      self.spec.replicates, cfg.train.keep_checkpoints)
        metrics = finished.load(0)
        if metrics is not None:  # replicate 0 passed its pruner in the attempt that ran it
            curve[:] = metrics["curve"]
            upload_trial_artifacts(trial, attrs["config"], curve, self.artifacts)
        else:
            metrics = self._train_watched(trial, lease, cfg, attrs, curve, on_validation,
                                          checkpoints, resumed_step, finished)
            finished.save(0, metrics)
        replicated = ()
        if self.spec.replicates > 1:
            # Replicate 0 survived the pruner: the later seeds train unwatched (the module
            # docstring of nas.search.replicates), and the trial stores their combination.
            seeds = replicate_seeds(cfg.train.seed, self.spec.replicates)
            # as a trial stopped early keeps its curve, one that fails in a later replicate
            # keeps replicate 0's
            write_record(trial, curve=curve)
            try:
                runs = [metrics]
                for i, seed in enumerate(seeds[1:], start=1):
                    run = finished.load(i)
                    if run is None:
                        run = self._replicate(trial, lease, cfg, i, seed, checkpoints)
                        finished.save(i, run)
                    runs.append(run)
            finally:
                finished.clear()  # whatever ends the trial here; a dead worker keeps them
            metrics, replicated = combine(runs, seeds), REPLICATE_FIELDS
            if finished.reused:
                write_record(trial, replicates_reused=finished.reused)
        write_record(trial, steps_trained=metrics["steps"], **{
            key: metrics[key] for key in (*MEASURED, "train_seconds", *replicated)
            if key in metrics})
        return self._result(metrics.__getitem__)

    def _result(self, value_of: Callable[[str], Any]) -> float | tuple[float, ...]:
        """The trial's objective values, by name, as Optuna takes them from this study."""
        values = tuple(float(value_of(o)) for o in self.spec.objectives)
        return values if self.spec.multi_objective else values[0]

    def _copy(self, trial: optuna.Trial, earlier: TrialRecord,
              config: dict[str, Any]) -> float | tuple[float, ...]:
        """Complete a repeat of `earlier`'s run config with its measurements, untrained: the
        sampler sees what retraining would give (training is deterministic), at no cost. The
        Pareto pruner prunes repeats instead, the rule its benchmark measured."""
        measured = {key: getattr(earlier, key) for key in (*MEASURED, *REPLICATE_FIELDS)}
        write_record(trial, copy_of=earlier.number, steps_trained=earlier.steps_trained,
                     **{key: value for key, value in measured.items() if value is not None})
        upload_trial_artifacts(trial, config, earlier.curve, self.artifacts)
        return self._result(earlier.objective)

    def _train_watched(self, trial: optuna.Trial, lease: Lease, cfg: RunConfig,
                       attrs: dict[str, Any], curve: list[list[float]],
                       on_validation: Callable[[int, float], None], checkpoints: Path | None,
                       resumed_step: int | None, finished: FinishedReplicates) -> dict[str, Any]:
        """Train the trial's own run (replicate 0), which its pruner watches through
        `on_validation`, from the checkpoint a dead attempt left where there is one."""
        from nas.training.train import train

        # written even when None: a retry starts with a copy of the dead attempt's record
        write_record(trial, resumed_step=resumed_step)
        try:
            return train(cfg, progress=False, on_validation=on_validation,
                         checkpoints=checkpoints, resume=resumed_step is not None)
        except (Exception, KeyboardInterrupt) as exc:
            if isinstance(exc, UpdateFinishedTrialError):
                lease.lost = True  # another worker failed this trial: it takes no more writes
                raise
            # A trial that stops early (pruned, failed, interrupted) keeps the curve it reached.
            ended: dict[str, Any] = {"curve": curve} if curve else {}
            if isinstance(exc, optuna.TrialPruned):
                ended["steps_trained"] = curve[-1][0] if curve else 0
            write_record(trial, **ended)
            # the later replicates will not run: what a dead attempt left of them goes too
            for index in range(1, self.spec.replicates):
                if checkpoints is not None and not cfg.train.keep_checkpoints:
                    shutil.rmtree(_replicate_folder(checkpoints, index), ignore_errors=True)
            finished.clear()
            raise
        finally:
            if not lease.lost:
                upload_trial_artifacts(trial, attrs["config"], curve, self.artifacts)
            # However this attempt ends here, the trial ends with it: only an attempt whose
            # worker died leaves its checkpoints, for the retry.
            if checkpoints is not None and not cfg.train.keep_checkpoints:
                shutil.rmtree(checkpoints, ignore_errors=True)

    def _replicate(self, trial: optuna.Trial, lease: Lease, cfg: RunConfig, index: int,
                   seed: int, checkpoints: Path | None) -> dict[str, Any]:
        """Train replicate `index` (`cfg` on `seed`) and return its metrics. It reports to no
        pruner; it resumes from the checkpoint a dead attempt left in its own folder beside
        replicate 0's, and whatever ends it removes that folder, as replicate 0's."""
        from nas.training.checkpoint import LAST, resume_step
        from nas.training.train import train

        raw = cfg.to_dict()
        raw["train"]["seed"] = seed
        run = from_dict(raw, where=f"replicate {index} (train.seed {seed})")
        folder = None if checkpoints is None else _replicate_folder(checkpoints, index)
        resumed = (resume_step(folder / LAST, run)
                   if folder is not None and (folder / LAST).is_file() else None)
        if resumed is not None:
            write_record(trial, resumed_step=resumed)

        def on_validation(step: int, loss: float) -> None:
            CTRL_C.check()
            lease.check()

        try:
            return train(run, progress=False, on_validation=on_validation, checkpoints=folder,
                         resume=resumed is not None)
        finally:
            if folder is not None and not run.train.keep_checkpoints:
                shutil.rmtree(folder, ignore_errors=True)


class FinishedReplicates:
    """The metrics of each replicate a replicated trial has finished, kept beside its
    checkpoints until the trial ends: a retry after its worker died takes them instead of
    training them again (`reused`). Nothing is kept without a checkpoint folder."""

    def __init__(self, checkpoints: Path | None, replicates: int, keep: bool):
        self.checkpoints, self.replicates, self.keep = checkpoints, replicates, keep
        self.reused: list[int] = []

    def _path(self, index: int) -> Path | None:
        if self.checkpoints is None:
            return None
        return self.checkpoints.with_name(f"{self.checkpoints.name}-replicate-{index}.json")

    def load(self, index: int) -> dict[str, Any] | None:
        path = self._path(index)
        if path is None or not path.is_file():
            return None
        try:
            metrics = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None  # unreadable: the replicate trains again
        self.reused.append(index)
        return metrics

    def save(self, index: int, metrics: dict[str, Any]) -> None:
        path = self._path(index)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".json.partial")
        partial.write_text(json.dumps(metrics), encoding="utf-8")
        os.replace(partial, path)  # whole or absent, should the worker die while writing

    def clear(self) -> None:
        if self.keep:
            return
        for index in range(self.replicates):
            if (path := self._path(index)) is not None:
                path.unlink(missing_ok=True)


def _replicate_folder(checkpoints: Path, index: int) -> Path:
    """Replicate `index`'s checkpoints, beside replicate 0's (the trial's own folder)."""
    return checkpoints.with_name(f"{checkpoints.name}-replicate-{index}")
