"""Opening a study: create it from a spec or resume it, refuse a spec that no longer matches
what is stored, queue the vanilla baselines (and the lr_sweep queue), and load a stored study
for reading (export, report, dashboard). Storages themselves live in `nas.storage`; the worker
loop in `nas.search`. Knows nothing of torch.
"""

from __future__ import annotations

import itertools
from typing import Any

import optuna
from optuna.trial import TrialState

from . import lr_sweep
from .config import ConfigError
from .samplers import make_pruner, make_sampler
from .spec import StudySpec
from .storage import HEARTBEAT, make_storage, redact, storage_file
from .trials import OBJECTIVES

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)  # the trials that count toward n_trials


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


def finished_count(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


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
