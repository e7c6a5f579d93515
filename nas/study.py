"""Study specs, samplers, pruners and the objective: `nas search` (storages: `nas.storage`).

A study spec (YAML under `studies/`) names a search space, the objectives and the fixed parts of
the run config. `run_search` creates the Optuna study or resumes it, enqueues a `vanilla`
baseline at each model size, and trains trials until the study holds `n_trials` finished ones.
Knows nothing of torch: training happens behind `nas.train.train`, imported when a trial runs.

Any number of workers (processes, machines) may share one study through its storage. Only
COMPLETE and PRUNED trials count toward `n_trials`; a failed trial (diverged, raised or
interrupted, with the reason in its `failure` attribute, or lost with its worker) stays in the
study as FAIL and another trial takes its slot.
On RDB storages (SQLite, PostgreSQL) heartbeats fail a dead worker's trial and queue a retry of
it; `Objective._claim_slot` and `Gate` keep the workers from running more than `n_trials`.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
import secrets
import signal
import socket
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from . import lr_sweep
from . import space as spaces
from .artifacts import artifact_dir, upload_trial_artifacts
from .config import ConfigError, RunConfig, from_dict, read_yaml
from .pruning import ParetoPruner
from .storage import HEARTBEAT, journal_path, make_storage, redact, storage_file
from .trials import OBJECTIVES, describe, front

SAMPLERS = ("tpe", "nsga2", "random", "bruteforce")
PRUNERS = ("none", "pareto", "median", "hyperband")
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)  # the trials that count toward n_trials
MAX_FAILURES = 5  # a worker stops after this many of its trials failed in a row

# Heartbeats, grouped TPE and metric names are marked experimental but are what we rely on.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


@dataclass
class StudySpec:
    name: str
    space: dict
    objectives: list[str] = field(default_factory=lambda: ["val_loss", "n_params"])
    n_trials: int = 20
    storage: str | None = None
    base: dict = field(default_factory=dict)
    sampler: dict = field(default_factory=lambda: {"type": "tpe"})
    pruner: dict = field(default_factory=lambda: {"type": "none"})
    seed: int = 0
    max_params: int | None = None
    baselines: bool = True
    heartbeat: dict = field(default_factory=dict)  # overrides of HEARTBEAT
    artifacts: str | None = None  # artifact folder (default: next to the storage)
    lr_sweep: str = "all_seeds"  # or first_seed (nas.lr_sweep)
    path: str = "study"

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    @property
    def merged_space(self) -> dict:
        return spaces.merge(self.base, self.space)

    def default_storage(self) -> str:
        return f"sqlite:///runs/{self.name}.db"


class SurplusTrial(Exception):
    """Another worker already started the study's last trial."""


def load_spec(path: str | Path, data: str | None = None) -> StudySpec:
    """Read and check a study spec; `data` overrides the base's data.source."""
    path = Path(path)
    where = str(path)
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: a study spec must be a mapping")
    fields = {f.name for f in dataclasses.fields(StudySpec)} - {"path"}
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise ConfigError(f"{where}: {unknown[0]}: unknown key; allowed: "
                          + ", ".join(sorted(fields)))
    for key in ("name", "space"):
        if key not in raw:
            raise ConfigError(f"{where}: {key}: required")
    if not isinstance(raw["name"], str) or not raw["name"]:
        raise ConfigError(f"{where}: name: must be a non-empty string")
    space = raw["space"]
    if isinstance(space, str):
        space_path = (path.parent / space) if not Path(space).is_absolute() else Path(space)
        space = read_yaml(space_path)
        where_space = str(space_path)
    else:
        where_space = f"{where}: space"
    spec = StudySpec(**{**raw, "space": spaces.check_space(space, where_space), "path": where})
    if data is not None:
        spec.base = spaces.merge(spec.base, {"data": {"source": data}})
    _check_spec(spec, where)
    return spec


def _check_spec(spec: StudySpec, where: str) -> None:
    if not isinstance(spec.objectives, list) or not spec.objectives:
        raise ConfigError(f"{where}: objectives: must be a non-empty list of "
                          + ", ".join(OBJECTIVES))
    for name in spec.objectives:
        if name not in OBJECTIVES:
            raise ConfigError(f"{where}: objectives: unknown objective {name!r}; allowed: "
                              + ", ".join(OBJECTIVES))
    if spec.objectives[0] != "val_loss":
        raise ConfigError(f"{where}: objectives: the first objective must be val_loss")
    if not isinstance(spec.n_trials, int) or spec.n_trials < 1:
        raise ConfigError(f"{where}: n_trials: must be a positive integer, got {spec.n_trials!r}")
    if spec.max_params is not None and (not isinstance(spec.max_params, int)
                                        or spec.max_params < 1):
        raise ConfigError(f"{where}: max_params: must be a positive integer")
    for key, kinds, allowed in (("seed", int, "an integer"), ("baselines", bool, "true or false"),
                                ("storage", (str, type(None)), "a storage URL or path")):
        if not isinstance(getattr(spec, key), kinds):
            raise ConfigError(f"{where}: {key}: must be {allowed}, got {getattr(spec, key)!r}")
    if not isinstance(spec.heartbeat, dict):
        raise ConfigError(f"{where}: heartbeat: must be a mapping with keys "
                          + ", ".join(HEARTBEAT))
    for key, value in spec.heartbeat.items():
        if key not in HEARTBEAT:
            raise ConfigError(f"{where}: heartbeat.{key}: unknown key; allowed: "
                              + ", ".join(HEARTBEAT))
        low = 0 if key == "max_retry" else 1
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ConfigError(f"{where}: heartbeat.{key}: must be an integer >= {low} "
                              f"(seconds for interval and grace_period), got {value!r}")
    spaces.check_space(spec.base, f"{where}: base")
    _check_lr_grid(spec, where)
    for key, allowed in (("sampler", SAMPLERS), ("pruner", PRUNERS)):
        value = getattr(spec, key)
        if not isinstance(value, dict) or value.get("type") not in allowed:
            raise ConfigError(f"{where}: {key}.type: must be one of {', '.join(allowed)}")
    if spec.multi_objective and spec.pruner["type"] in ("median", "hyperband"):
        raise ConfigError(f"{where}: pruner.type: Optuna cannot prune multi-objective studies "
                          "with median or hyperband; use pareto or none")
    draw_configs(spec, where)


def _check_lr_grid(spec: StudySpec, where: str) -> None:
    """A named-variant study's learning-rate list is a grid the analysis chooses from; the
    first_seed protocol needs a grid, seeds and the queue it fills."""
    space = spec.merged_space
    lr, seed = space.get("train", {}).get("lr"), space.get("train", {}).get("seed")
    if space.get("variants") and isinstance(lr, list) and len(lr) < 2:
        raise ConfigError(f"{where}: train.lr: a learning-rate grid needs at least 2 values "
                          f"for the analysis to choose among, got {lr}; give one number to fix it")
    if spec.lr_sweep not in lr_sweep.PROTOCOLS:
        raise ConfigError(f"{where}: lr_sweep: must be one of {', '.join(lr_sweep.PROTOCOLS)}, "
                          f"got {spec.lr_sweep!r}")
    if spec.lr_sweep == "first_seed":
        for key, value, need in (("variants", space.get("variants"), "named variants"),
                                 ("train.lr", lr, "a list of at least 2 learning rates"),
                                 ("train.seed", seed, "a list of at least 2 seeds")):
            if not value or (isinstance(value, list) and len(value) < 2) or (
                    key != "variants" and not isinstance(value, list)):
                raise ConfigError(f"{where}: {key}: lr_sweep first_seed needs {need}")
        if spec.sampler.get("type") != "bruteforce":
            raise ConfigError(f"{where}: sampler.type: lr_sweep first_seed needs bruteforce")


def draw_configs(spec: StudySpec, where: str, draws: int = 32) -> list[RunConfig]:
    """Sample the space at random (no training) so that impossible shapes fail now."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    probe = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    merged = spec.merged_space
    configs = []
    for _ in range(draws):
        trial = probe.ask()
        raw = spaces.sample(merged, trial)
        configs.append(from_dict(raw, where=f"{where} (a draw from the space)"))
        probe.tell(trial, 0.0)
    return configs


def check_trainable(spec: StudySpec, draws: int = 32) -> None:
    """What `nas search` needs beyond a valid spec, checked before the study is touched: every
    data source the space can draw opens and is long enough (imports torch), and each trial
    trains on one device (run one worker per GPU instead)."""
    from .data import TokenDataModule

    seen = set()
    for cfg in draw_configs(spec, spec.path, draws):
        if cfg.train.devices not in (1, "1"):
            raise ConfigError(f"{spec.path}: train.devices: must be 1 in a study, got "
                              f"{cfg.train.devices!r}: run one `nas search` worker per GPU; "
                              "several devices per run are for `nas train`")
        d, m = cfg.data, cfg.model
        key = (d.source, d.val_fraction, d.test_fraction, d.test_source, m.seq_len, m.vocab_size)
        if key in seen:
            continue
        seen.add(key)
        try:
            TokenDataModule(d, m.seq_len, m.vocab_size, 1, 1, cfg.train.seed, 1, 1)
        except ConfigError as exc:
            raise ConfigError(f"{spec.path}: {exc}") from None


# -- sampler, pruner ------------------------------------------------------------------------


def make_sampler(spec: StudySpec, seed: int) -> optuna.samplers.BaseSampler:
    opts = {k: v for k, v in spec.sampler.items() if k != "type"}
    kind = spec.sampler["type"]
    try:
        if kind == "tpe":
            opts = {"multivariate": True, "group": True, "constant_liar": True, **opts}
            return optuna.samplers.TPESampler(seed=seed, **opts)
        if kind == "nsga2":
            return optuna.samplers.NSGAIISampler(seed=seed, **opts)
        if kind == "random":
            return optuna.samplers.RandomSampler(seed=seed, **opts)
        return optuna.samplers.BruteForceSampler(seed=seed, **opts)
    except TypeError as exc:
        raise ConfigError(f"{spec.path}: sampler: {exc}") from None


def make_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    opts = {k: v for k, v in spec.pruner.items() if k != "type"}
    kind = spec.pruner["type"]
    try:
        if kind == "median":
            return optuna.pruners.MedianPruner(**opts)
        if kind == "hyperband":
            return optuna.pruners.HyperbandPruner(**opts)
    except TypeError as exc:
        raise ConfigError(f"{spec.path}: pruner: {exc}") from None
    return optuna.pruners.NopPruner()  # pareto runs inside the objective


def pareto_pruner(spec: StudySpec) -> ParetoPruner | None:
    if spec.pruner["type"] != "pareto":
        return None
    try:
        return ParetoPruner(**{k: v for k, v in spec.pruner.items() if k != "type"})
    except TypeError as exc:
        raise ConfigError(f"{spec.path}: pruner: {exc}") from None


def open_study(spec: StudySpec, storage_url: str | None = None, *, create: bool = True,
               seed_offset: int = 0) -> optuna.Study:
    """Create or load the spec's study. A new study records its objectives and space and gets
    its vanilla baselines queued. A stored study whose objectives or space differ from the
    spec's is refused before anything is written."""
    url = resolve_storage(spec, storage_url)
    sampler, pruner = make_sampler(spec, spec.seed + seed_offset), make_pruner(spec)
    storage = make_storage(url, {**HEARTBEAT, **spec.heartbeat},
                           where="--storage" if storage_url else f"{spec.path}: storage")
    names = optuna.get_all_study_names(storage)
    if spec.name not in names and not create:
        listed = ", ".join(names) if names else "none"
        raise ConfigError(f"{spec.path}: name: no study {spec.name!r} in {redact(url)} "
                          f"(studies there: {listed})")
    if spec.name not in names:
        try:
            study = optuna.create_study(
                study_name=spec.name, storage=storage, sampler=sampler, pruner=pruner,
                directions=[OBJECTIVES[o] for o in spec.objectives])
        except optuna.exceptions.DuplicatedStudyError:
            pass  # another worker created it a moment ago: load it below
        else:
            study.set_metric_names(spec.objectives)
            study.set_user_attr("objectives", spec.objectives)
            study.set_user_attr("space", spec.merged_space)
            study.set_user_attr("max_params", spec.max_params)
            enqueue_baselines(study, spec)
            if spec.lr_sweep == "first_seed":
                lr_sweep.enqueue_pending(study, spec.merged_space, spec.seed)
            return study
    study = optuna.load_study(study_name=spec.name, storage=storage, sampler=sampler,
                              pruner=pruner)
    _check_stored(study, spec)
    return study


def _check_stored(study: optuna.Study, spec: StudySpec) -> None:
    """Refuse a spec that no longer matches its stored study: mixing objectives or spaces in
    one study would fail every new trial or compare unlike trials."""
    stored = study.user_attrs.get("objectives") or study.metric_names
    directions = [d.name.lower() for d in study.directions]
    if directions != [OBJECTIVES[o] for o in spec.objectives] or (
            stored is not None and stored != spec.objectives):
        raise ConfigError(f"{spec.path}: objectives: the stored study {spec.name!r} has "
                          f"{stored or directions}, the spec {spec.objectives}; use a new "
                          "study name for other objectives")
    space = study.user_attrs.get("space")
    if space is not None:
        # data.source may differ: every machine may keep the same shards at its own path.
        key = _first_difference(_without_source(space), _without_source(spec.merged_space))
        if key is not None:
            raise ConfigError(f"{spec.path}: {key}: differs from the stored study "
                              f"{spec.name!r}; use a new study name to search a changed space")


def _without_source(space: dict) -> dict:
    return {**space, "data": {k: v for k, v in space.get("data", {}).items() if k != "source"}}


def _first_difference(a: Any, b: Any, key: str = "") -> str | None:
    """The dotted key where two parsed YAML values first differ (`space` for the whole)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            found = _first_difference(a.get(k), b.get(k), f"{key}.{k}" if key else str(k))
            if found is not None:
                return found
        return None
    return None if a == b else (key or "space")


# -- baselines and the objective -------------------------------------------------------------


def baseline_sizes(spec: StudySpec) -> list[dict[str, Any]]:
    """Every combination of the model section's categorical choices, as trial params."""
    model = spec.merged_space.get("model", {})
    keys = [k for k, v in model.items() if isinstance(v, list)]
    return [{f"model.{k}": v for k, v in zip(keys, combo, strict=True)}
            for combo in itertools.product(*(model[k] for k in keys))]


def enqueue_baselines(study: optuna.Study, spec: StudySpec) -> int:
    """Queue one vanilla trial per model size that the study does not hold yet."""
    if not spec.baselines:
        return 0
    held = [t.params for t in study.get_trials(deepcopy=False)
            if t.user_attrs.get("baseline")]
    held += [t.system_attrs.get("fixed_params", {}) for t in study.get_trials(
        deepcopy=False, states=(TrialState.WAITING,)) if t.user_attrs.get("baseline")]
    added = 0
    for params in baseline_sizes(spec):
        if any(all(h.get(k) == v for k, v in params.items()) for h in held):
            continue
        study.enqueue_trial(params, user_attrs={"baseline": True}, skip_if_exists=False)
        added += 1
    return added


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


# -- the search loop --------------------------------------------------------------------------


def finished_count(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def worker_seed_offset(study_storage_has_running: bool, worker_id: int | None) -> int:
    """Workers must not share a sampler seed, or their random start-up trials repeat: the seed
    is the spec's plus --worker-id; without it, plus 0 for a worker alone on its study (a
    reproducible run) and plus a random offset for one joining running workers."""
    if worker_id is not None:
        return worker_id
    return secrets.randbelow(2**31) + 1 if study_storage_has_running else 0


class CtrlC:
    """The SIGINT handler of a worker. It raises KeyboardInterrupt at once, as Python's does,
    and remembers the press: a KeyboardInterrupt raised inside a finalizer (the garbage
    collector runs them during training) is swallowed by Python, which prints it as an ignored
    exception; instead, `check()` raises it again at the trial's next validation or end. The
    trial then ends FAIL, `interrupted`."""

    def __init__(self) -> None:
        self.pressed = False
        self.previous: Any = None
        self.unraisable: Any = None

    def __enter__(self) -> CtrlC:
        self.pressed = False
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
            self.unraisable, sys.unraisablehook = sys.unraisablehook, self._unraisable
        return self

    def __exit__(self, *exc: object) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
            sys.unraisablehook = self.unraisable
            self.previous = None

    def _unraisable(self, info: Any) -> None:
        if not isinstance(info.exc_value, KeyboardInterrupt):
            self.unraisable(info)

    def _handle(self, signum: int, frame: Any) -> None:
        self.pressed = True
        raise KeyboardInterrupt

    def check(self) -> None:
        if self.pressed:
            raise KeyboardInterrupt


CTRL_C = CtrlC()


class SearchError(RuntimeError):
    """A worker stopped because its trials kept failing (the CLI exits with status 1)."""


class Gate:
    """Decides, before each trial of one worker, whether to start it, wait or stop; an Optuna
    callback after each trial, and the check before the first.

    With a target, a worker stops once the study holds `target` finished trials. When the
    other workers' RUNNING trials fill the remaining slots, it waits, failing stale trials:
    with heartbeats, such a trial may belong to a dead worker and is then failed and retried
    within grace_period, which a restarted worker picks up. It waits at most grace_period plus
    two heartbeat intervals (live workers finish their own trials, and start another if one
    fails); journal storage has no heartbeats, so there it stops at once. Independently, a worker
    stops after MAX_FAILURES of its trials failed in a row (a bug or a broken machine)."""

    def __init__(self, target: int | None, heartbeat: dict[str, int] | None,
                 timeout: float | None, echo: Callable[[str], None],
                 queue: Callable[[optuna.Study], int] | None = None):
        self.target, self.heartbeat, self.echo = target, heartbeat, echo
        self.deadline = time.monotonic() + timeout if timeout else float("inf")
        self.failures: list[str] = []
        # A queue-driven study (lr_sweep first_seed) trains only queued trials: `queue` adds
        # what has become due, and a worker with nothing queued waits for running trials.
        self.queue = queue

    def ready(self, study: optuna.Study) -> bool:
        """True when this worker should start a trial now; may wait (see the class)."""
        if self.target is None:
            return True
        hb = self.heartbeat
        patience = time.monotonic() + (hb["grace_period"] + 2 * hb["interval"] if hb else 0)
        waiting = False
        while True:
            optuna.storages.fail_stale_trials(study)  # a no-op without heartbeats
            queued = self.queue(study) if self.queue else 0
            states = [t.state for t in study.get_trials(
                deepcopy=False, states=(*FINISHED, TrialState.RUNNING, TrialState.WAITING))]
            finished = sum(s in FINISHED for s in states)
            running = states.count(TrialState.RUNNING)
            queued += states.count(TrialState.WAITING)
            if finished >= self.target:
                return False
            if finished + running < self.target and (queued or not self.queue):
                return True
            # Under a queue, running trials may still queue more: wait for them to end.
            for_queue = self.queue is not None and finished + running < self.target
            if for_queue and not running:
                self.echo(f"the lr_sweep grid is done with {finished} finished trial(s), short "
                          f"of n_trials {self.target}")
                return False
            if time.monotonic() >= (self.deadline if for_queue else min(patience,
                                                                         self.deadline)):
                self.echo(f"{running} trial(s) of other workers hold the last slot(s); "
                          "this worker stops (they finish the study)")
                return False
            if not waiting and hb:
                self.echo(f"waiting up to {hb['grace_period'] + 2 * hb['interval']} s for "
                          f"{running} running trial(s) of other workers (a dead worker's "
                          "trial is retried here)")
                waiting = True
            time.sleep(hb["interval"] if hb else (1 if self.queue else 0))

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        CTRL_C.check()
        failure = trial.user_attrs.get("failure", "")
        if trial.state == TrialState.FAIL and not failure.startswith("surplus"):
            self.failures.append(failure or "see the log")
        elif trial.state != TrialState.FAIL:
            self.failures = []
        if len(self.failures) >= MAX_FAILURES or not self.ready(study):
            study.stop()


def run_search(spec: StudySpec, storage_url: str | None = None, n_trials: int | None = None,
               timeout: float | None = None, worker_id: int | None = None,
               progress: bool = True, echo: Callable[[str], None] = print,
               threads: int | None = None) -> optuna.Study:
    """Create or resume the study and run trials; returns the study.

    Without `n_trials`, this worker runs trials until the study holds the spec's n_trials
    finished (COMPLETE or PRUNED) trials, however many workers share it; failed trials
    (diverged, raised, interrupted, lost with their worker) do not count, so another trial
    takes their place. With `n_trials`, it starts that many trials whatever their outcome."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    check_trainable(spec)
    if threads:
        import torch

        torch.set_num_threads(threads)
    study = open_study(spec, storage_url)
    running = bool(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
    offset = worker_seed_offset(running, worker_id)
    if offset:
        study.sampler = make_sampler(spec, spec.seed + offset)
    where = resolve_storage(spec, storage_url)
    heartbeat = None if journal_path(where) else {**HEARTBEAT, **spec.heartbeat}
    target = spec.n_trials if n_trials is None else None
    queue = (functools.partial(lr_sweep.enqueue_pending, space=spec.merged_space, seed=spec.seed)
             if spec.lr_sweep == "first_seed" else None)
    gate = Gate(target, heartbeat, timeout, echo, queue)
    done = finished_count(study)
    echo(f"study {spec.name!r} in {redact(where)}: {done} finished trial(s); "
         + (f"running {n_trials} more" if target is None else f"target {target}")
         + (f" (worker seed {spec.seed + offset})" if offset else ""))
    if not gate.ready(study):
        return study
    printer = TrialPrinter(spec, echo, progress, total=target or n_trials or 0,
                           study_done=done if target else None)
    try:
        with CTRL_C:
            study.optimize(
                Objective(spec, target, artifact_dir(where, spec.name, spec.artifacts)),
                n_trials=n_trials,
                timeout=timeout,
                catch=(Exception,),  # recorded in the trial (state FAIL, attribute `failure`)
                callbacks=[printer, gate],
                gc_after_trial=True,
            )
    finally:
        printer.close()
    if len(gate.failures) >= MAX_FAILURES:
        raise SearchError(f"{MAX_FAILURES} trials in a row failed, the last with "
                          f"{gate.failures[-1]}; stopping this worker")
    return study


class TrialPrinter:
    """One line per trial of this worker, written above a progress bar of `total` trials (the
    study's finished trials with a target, else this worker's)."""

    def __init__(self, spec: StudySpec, echo: Callable[[str], None], progress: bool,
                 total: int = 0, study_done: int | None = None):
        self.spec, self.echo, self.progress = spec, echo, progress
        self.study_wide = study_done is not None  # else the bar counts this worker's trials
        self.bar = None
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=study_done or 0, unit="trial",
                            dynamic_ncols=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        a = trial.user_attrs
        if a.get("failure", "").startswith("surplus"):
            return
        if self.bar is not None:
            self.bar.n = finished_count(study) if self.study_wide else self.bar.n + 1
            self.bar.refresh()
        label = describe(a) + (" (baseline)" if a.get("baseline") else "")
        params = f"{a['n_params']:>10,}" if "n_params" in a else " " * 10
        if trial.state == TrialState.COMPLETE:
            status = f"val_loss {a['val_loss']:.4f}  {a['tokens_per_s']:>8,.0f} tok/s"
        elif trial.state == TrialState.PRUNED:
            status = f"pruned ({a.get('pruned_reason', 'pruned')})"
        else:
            status = f"failed ({a.get('failure', 'see the log')})"
        line = f"trial {trial.number:>3}  {label:<34} {params} params  {status}"
        if self.progress:
            from tqdm import tqdm

            tqdm.write(line)
        else:
            self.echo(line)


def front_table(study: optuna.Study) -> str:
    rows = front(study)
    title = "Pareto front" if len(study.directions) > 1 else "Best trials"
    if not rows:
        return f"{title}: no completed trials yet"
    head = f"{'trial':>5}  {'plan':<34} {'n_params':>10}  {'val_loss':>8}  {'tok/s':>8}"
    lines = [f"{title} ({len(rows)} trial(s)):", head, "-" * len(head)]
    for t in rows:
        a = t.user_attrs
        lines.append(f"{t.number:>5}  {describe(a):<34} {a['n_params']:>10,}  "
                     f"{a['val_loss']:>8.4f}  {a.get('tokens_per_s', 0):>8,.0f}")
    return "\n".join(lines)


# -- reading a study back (export, report, dashboard) -----------------------------------------


def resolve_storage(spec: StudySpec, override: str | None = None) -> str:
    """The storage a command uses: --storage, else the spec's, else runs/<name>.db."""
    return override or spec.storage or spec.default_storage()


def open_existing(spec: StudySpec, override: str | None = None) -> optuna.Study:
    """Load the spec's stored study for reading; a missing storage file or study is a
    ConfigError, and nothing is created."""
    url = resolve_storage(spec, override)
    path = storage_file(url)
    if path is not None and not path.is_file():
        raise ConfigError(f"{spec.path}: storage: {url} does not exist; run `nas search "
                          f"{spec.path}` first or pass --storage")
    return open_study(spec, url, create=False)
