"""Study specs, storages, samplers, pruners and the objective: `nas search`.

A study spec (YAML under `studies/`) names a search space, the objectives and the fixed parts of
the run config. `run_search` creates the Optuna study or resumes it, enqueues a `vanilla`
baseline at each model size, and trains trials until the study holds `n_trials` finished ones.
Knows nothing of torch: training happens behind `nas.train.train`, imported when a trial runs.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from . import space as spaces
from .config import ConfigError, from_dict, read_yaml
from .pruning import ParetoPruner

# Objective name -> direction.
OBJECTIVES = {
    "val_loss": "minimize",
    "n_params": "minimize",
    "n_params_non_embedding": "minimize",
    "tokens_per_s": "maximize",
}
SAMPLERS = ("tpe", "nsga2", "random", "bruteforce")
PRUNERS = ("none", "pareto", "median", "hyperband")
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)

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
    spaces.check_space(spec.base, f"{where}: base")
    for key, allowed in (("sampler", SAMPLERS), ("pruner", PRUNERS)):
        value = getattr(spec, key)
        if not isinstance(value, dict) or value.get("type") not in allowed:
            raise ConfigError(f"{where}: {key}.type: must be one of {', '.join(allowed)}")
    if spec.multi_objective and spec.pruner["type"] in ("median", "hyperband"):
        raise ConfigError(f"{where}: pruner.type: Optuna cannot prune multi-objective studies "
                          "with median or hyperband; use pareto or none")
    _check_draws(spec, where)


def _check_draws(spec: StudySpec, where: str, draws: int = 32) -> None:
    """Sample the space at random (no training) so that impossible shapes fail now."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    probe = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    merged = spec.merged_space
    for _ in range(draws):
        trial = probe.ask()
        raw = spaces.sample(merged, trial)
        from_dict(raw, where=f"{where} (a draw from the space)")
        probe.tell(trial, 0.0)


# -- storage, sampler, pruner ----------------------------------------------------------------


def make_storage(url: str, heartbeat: bool = True) -> optuna.storages.BaseStorage:
    """An Optuna storage from a URL: sqlite:///, postgresql+psycopg://, journal:PATH or a
    `.log` / `.journal` file path. RDB storages get heartbeats and retry stale trials."""
    if url.startswith("journal:") or url.endswith((".log", ".journal")):
        path = url.removeprefix("journal:")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        backend = optuna.storages.journal.JournalFileBackend(path)
        return optuna.storages.JournalStorage(backend)
    if "://" not in url:
        raise ConfigError(f"--storage: unknown storage {url!r}; allowed: sqlite:///PATH, "
                          "postgresql+psycopg://USER@HOST/DB, journal:PATH")
    scheme = url.split("://", 1)[0]
    if not scheme.startswith(("sqlite", "postgresql", "mysql")):
        raise ConfigError(f"--storage: unknown scheme {scheme!r}; allowed: sqlite, "
                          "postgresql+psycopg, mysql, journal")
    engine_kwargs: dict[str, Any] = {}
    if scheme.startswith("sqlite"):
        db = url.split(":///", 1)[-1]
        if db and db != ":memory:":
            Path(db).parent.mkdir(parents=True, exist_ok=True)
        # Several workers on one SQLite file wait for the write lock instead of failing.
        engine_kwargs["connect_args"] = {"timeout": 60}
    else:
        engine_kwargs["pool_pre_ping"] = True
    extra: dict[str, Any] = {}
    if heartbeat:
        extra = {"heartbeat_interval": 10, "grace_period": 30,
                 "heartbeat_stale_trial_callback":
                     optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2)}
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **extra)
    except Exception as exc:  # sqlalchemy's errors carry multi-line context
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"--storage: cannot open {url!r}: {first}") from None


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
    """Create or load the spec's study; refuse a stored study whose objectives differ."""
    url = storage_url or spec.storage or spec.default_storage()
    storage = make_storage(url)
    directions = [OBJECTIVES[o] for o in spec.objectives]
    sampler = make_sampler(spec, spec.seed + seed_offset)
    names = optuna.get_all_study_names(storage)
    if spec.name not in names and not create:
        listed = ", ".join(names) if names else "none"
        raise ConfigError(f"{spec.path}: name: no study {spec.name!r} in {url} "
                          f"(studies there: {listed})")
    if spec.name in names:
        stored = optuna.load_study(study_name=spec.name, storage=storage, sampler=sampler,
                                   pruner=make_pruner(spec))
        if [d.name.lower() for d in stored.directions] != directions:
            raise ConfigError(f"{spec.path}: objectives: the stored study {spec.name!r} has "
                              f"{len(stored.directions)} objective(s), the spec {len(directions)}")
        return stored
    study = optuna.create_study(study_name=spec.name, storage=storage, directions=directions,
                                sampler=sampler, pruner=make_pruner(spec), load_if_exists=True)
    study.set_metric_names(spec.objectives)
    study.set_user_attr("objectives", spec.objectives)
    study.set_user_attr("space", spec.merged_space)
    study.set_user_attr("max_params", spec.max_params)
    return study


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


def describe(attrs: dict[str, Any]) -> str:
    """A short label of a trial's residual plan, e.g. `learnable[3,4]` or `vanilla`."""
    mode = attrs.get("mode", "?")
    if mode == "vanilla":
        return mode
    layers = ",".join(map(str, attrs.get("receiving_layers", [])))
    src = "+ve" if attrs.get("source") == "value_embedding" else ""
    return f"{mode}{src}[{layers}]"


class Objective:
    def __init__(self, spec: StudySpec, target: int | None):
        self.spec = spec
        self.target = target
        self.space = spec.merged_space
        self.pareto = pareto_pruner(spec)

    def _claim_slot(self, trial: optuna.Trial) -> None:
        """With a target count, a trial started after the last slot was taken does not run."""
        if self.target is None:
            return
        others = trial.study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING))
        if sum(t.number < trial.number for t in others) >= self.target:
            trial.study.stop()
            trial.set_user_attr("failure", "surplus: the study already has its trials")
            raise SurplusTrial(f"study already has {self.target} trials")

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, ...]:
        from .lit import DivergenceError
        from .model import count_params
        from .train import train

        self._claim_slot(trial)
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
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        if self.spec.max_params is not None:
            trial.set_constraint("n_params", counts["n_params"] - self.spec.max_params)
            if counts["n_params"] > self.spec.max_params:
                reason = f"over budget: {counts['n_params']:,} > {self.spec.max_params:,} params"
                trial.set_user_attr("pruned_reason", reason)
                raise optuna.TrialPruned(reason)

        curve: list[list[float]] = []

        def on_validation(step: int, loss: float) -> None:
            curve.append([step, round(loss, 6)])
            trial.set_user_attr("curve", curve)
            if self.pareto is not None:
                reason = self.pareto.reason_to_prune(trial.study, counts["n_params"], step,
                                                     cfg.train.steps, loss)
                if reason:
                    trial.set_user_attr("pruned_reason", reason)
                    trial.set_user_attr("steps_trained", step)
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
        except DivergenceError as exc:
            trial.set_user_attr("failure", str(exc))
            raise
        for key in ("val_loss", "val_ppl", "tokens", "tokens_per_s", "train_seconds",
                    "coefficients", "curve"):
            trial.set_user_attr(key, metrics[key])
        trial.set_user_attr("steps_trained", metrics["steps"])
        values = tuple(float(metrics[o]) for o in self.spec.objectives)
        return values if self.spec.multi_objective else values[0]


# -- the search loop --------------------------------------------------------------------------


def finished_count(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def worker_seed_offset(study_storage_has_running: bool, worker_id: int | None) -> int:
    """Workers must not share a sampler seed, or their random start-up trials repeat."""
    if worker_id is not None:
        return worker_id
    return os.getpid() if study_storage_has_running else 0


def run_search(spec: StudySpec, storage_url: str | None = None, n_trials: int | None = None,
               timeout: float | None = None, worker_id: int | None = None,
               progress: bool = True, echo=print) -> optuna.Study:
    """Create or resume the study and run trials; returns the study."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_study(spec, storage_url)
    running = bool(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
    offset = worker_seed_offset(running, worker_id)
    if offset:
        study.sampler = make_sampler(spec, spec.seed + offset)
    queued = enqueue_baselines(study, spec)
    done = finished_count(study)
    if n_trials is None:
        target: int | None = spec.n_trials
        todo = spec.n_trials - done
    else:
        target, todo = None, n_trials
    where = storage_url or spec.storage or spec.default_storage()
    echo(f"study {spec.name!r} in {where}: {done} finished trial(s); running {max(todo, 0)} more"
         + (f" ({queued} vanilla baseline(s) queued)" if queued else ""))
    if todo <= 0:
        return study
    from .lit import DivergenceError

    study.optimize(
        Objective(spec, target),
        n_trials=todo,
        timeout=timeout,
        catch=(DivergenceError, SurplusTrial),
        callbacks=[TrialPrinter(spec, echo, progress)],
        gc_after_trial=True,
        show_progress_bar=progress,
    )
    return study


class TrialPrinter:
    """One line per finished trial, written above the study's progress bar."""

    def __init__(self, spec: StudySpec, echo, progress: bool):
        self.spec, self.echo, self.progress = spec, echo, progress

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        a = trial.user_attrs
        if a.get("failure", "").startswith("surplus"):
            return
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


def front(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The Pareto front (multi-objective) or the five best trials (single objective)."""
    if len(study.directions) > 1:
        return sorted(study.best_trials, key=lambda t: t.values[1])
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return sorted(done, key=lambda t: t.value)[:5]


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
