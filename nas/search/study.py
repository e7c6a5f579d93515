"""Opening a study: create it from a spec or resume it, refuse a spec that no longer matches
what is stored, queue the vanilla baselines (and the lr_sweep queue), seed a new study from a
warm start (`nas.search.warm_start`), and load a stored study for reading (export, report,
dashboard). Storages themselves live in `nas.search.storage`; the worker loop in
`nas.search.worker`. Knows nothing of torch (the data fingerprint imports the data module).

A study stores one fingerprint (the user attribute `fingerprint`): a digest of each thing that
changes a trial's numbers, namely the objectives, the budgets (`max_params`; `max_kv_bytes`
where set), the `--set` overrides it was searched with (where there were any; the overrides
themselves are the attribute `overrides`, which `nas.search.stored_overrides` applies again), the
space merged with the base config (less `data.source`, a path that may differ per machine) and
the validation and test tokens themselves (`nas.search.spec.data_fingerprint`). A
search that resumes the study with any of them changed is refused, naming what changed; so a
corpus moved elsewhere resumes, another corpus does not. Reading commands compare all but the
data (they add no measurements and may run where the corpus is not) and never write. A study
from before fingerprints is checked as far as its attributes tell (objectives, space,
max_params) and adopts the fingerprint on its first search, with a one-line note.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import time
from collections.abc import Callable, Container
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from nas import overrides
from nas.errors import ConfigError
from nas.modes import BASELINE_MODE
from nas.paths import check_output, removed_if_refused
from nas.search import lr_sweep, warm_start
from nas.search import space as spaces
from nas.search.artifacts import CHECKPOINTS, artifact_dir
from nas.search.samplers import make_pruner, make_sampler
from nas.search.spec import CONSTRAINTS, StudySpec, data_fingerprint
from nas.search.storage import (
    check_access,
    in_memory,
    make_storage,
    redact,
    side_files,
    storage_file,
)
from nas.search.trials import OBJECTIVES, TrialRecord, record_attrs

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)  # the trials that count toward n_trials
FINGERPRINT = "fingerprint"  # the study's user attribute: part name -> digest
# How long a search waits for the fingerprint of a study without one and without trials, which
# another worker may have created a moment ago; the creator writes it within milliseconds.
FINGERPRINT_WAIT = 15.0


def open_study(spec: StudySpec, storage_url: str | None = None, *, create: bool = True,
               seed_offset: int = 0, echo: Callable[[str], None] = print) -> optuna.Study:
    """Create or load the spec's study. A new study records its objectives, space and
    fingerprint and gets its vanilla baselines queued. A stored study whose fingerprint differs
    from the spec's is refused before anything is written. `create` (a search) also reads the
    data for the fingerprint; without it (reading commands) nothing is created or written."""
    url = resolve_storage(spec, storage_url)
    where = storage_where(spec, storage_url)
    if create:
        check_outputs(spec, storage_url)
    check_access(url, write=create, where=where)
    # Before the storage is touched: a corpus that does not open is refused with nothing written.
    data = data_fingerprint(spec) if create else None
    sampler, pruner = make_sampler(spec, spec.seed + seed_offset), make_pruner(spec)
    warm = create and spec.warm_start is not None
    file, source = storage_file(url), None
    if warm and file is not None and not file.exists():
        # a new study in a file still to be made: its source is checked first, so a warm
        # start that fails names the storages as they were and makes no file at all
        source, source_at = warm_start.load_source(spec, url)
    # A refusal before the study is created (a bad warm start) removes the new storage file.
    with removed_if_refused(file, side_files(url)):
        storage = make_storage(url, where=where)
        try:
            names = optuna.get_all_study_names(storage)
            if spec.name not in names and not create:
                listed = ", ".join(names) if names else "none"
                raise ConfigError(f"{spec.path}: name: no study {spec.name!r} in "
                                  f"{redact(url)} (studies there: {listed})")
            if warm and spec.name in names:
                echo(f"warm start: study {spec.name!r} exists already; a warm start seeds "
                     "only a new study")
            elif warm and source is None:  # checked before the study is created
                source, source_at = warm_start.load_source(spec, url)
        except ConfigError:
            _close(storage)  # before its new file is removed
            raise
    if spec.name not in names:
        try:
            study = optuna.create_study(
                study_name=spec.name, storage=storage, sampler=sampler, pruner=pruner,
                directions=[OBJECTIVES[o] for o in spec.objectives])
        except optuna.exceptions.DuplicatedStudyError:
            pass  # another worker created it a moment ago: load it below
        else:
            study.set_metric_names(spec.objectives)
            for key, value in spec.attrs.items():
                study.set_user_attr(key, value)
            study.set_user_attr("objectives", spec.objectives)
            study.set_user_attr("space", spec.merged_space)
            study.set_user_attr(overrides.STUDY_ATTR, spec.overrides)
            for key in CONSTRAINTS:
                study.set_user_attr(key, getattr(spec, key))
            # Last of the attributes: a worker that finds it finds the others.
            study.set_user_attr(FINGERPRINT, fingerprint(spec, data))
            enqueue_baselines(study, spec)
            if spec.queue:
                lr_sweep.enqueue_missing(study, spec.queue)
            elif spec.queue_driven:
                lr_sweep.enqueue_pending(study, spec.merged_space, spec.lr_sweep, spec.seed)
                study.set_user_attr(lr_sweep.PROTOCOL_ATTR, spec.lr_sweep.protocol)
            if warm:
                warm_start.seed(study, spec, source, source_at, echo)
            return study
    study = optuna.load_study(study_name=spec.name, storage=storage, sampler=sampler,
                              pruner=pruner)
    _check_stored(study, spec, data, echo)
    if create:
        _complete_queued_baselines(study, spec, storage)
    return study


def storage_where(spec: StudySpec, storage_url: str | None) -> str:
    """What a storage's errors name: the option, or the spec's key (its default included)."""
    return "--storage" if storage_url else f"{spec.path}: storage"


def check_outputs(spec: StudySpec, storage_url: str | None = None) -> None:
    """Refuse, before a search does any work, a storage it could not keep or write: an
    in-memory database (gone when the search ends) or a storage file, or an artifact folder,
    whose path cannot be written (`paths.check_output`: a study name too long for a file name
    included)."""
    url, where = resolve_storage(spec, storage_url), storage_where(spec, storage_url)
    if in_memory(url):
        raise ConfigError(f"{where}: {redact(url)!r} is an in-memory database: the study would "
                          "be lost when the search ends; use sqlite:///PATH, journal:PATH or a "
                          "database server")
    path = storage_file(url)
    if path is not None:
        check_access(url, write=True, where=where)  # an existing file: its own line first
        check_output(path, where, folder=False, suffixes=side_files(url))
    folder = artifact_dir(url, spec.name, spec.artifacts)
    check_output(folder, f"{spec.path}: artifacts" if spec.artifacts else where, folder=True,
                 inside=[CHECKPOINTS, spec.name])


def _close(storage: optuna.storages.BaseStorage) -> None:
    engine = getattr(storage, "engine", None)
    if engine is not None:
        engine.dispose()


def fingerprint(spec: StudySpec, data: str | None) -> dict[str, str]:
    """A digest of each part of the spec that changes a trial's numbers (see the module
    docstring); `data` is the data's own digest, None where it is not read."""
    parts = {"objectives": spec.objectives, "max_params": spec.max_params,
             **({"overrides": overrides.canonical(spec.overrides)} if spec.overrides else {}),
             # data.source is a path: the data digest stands for what it holds
             "space": _without_source(spec.merged_space),
             # the budgets newer than max_params only where set: studies from before them
             # resume unchanged
             **{key: getattr(spec, key) for key in CONSTRAINTS
                if key != "max_params" and getattr(spec, key) is not None},
             # the extension decides which trials run (the protocols differ in how the same
             # trials are read, except first_seed, whose studies predate this part)
             **({"lr_extend": spec.lr_sweep.extend} if spec.lr_sweep.extend else {})}
    digests = {part: _digest(value) for part, value in parts.items()}
    return digests if data is None else {**digests, "data": data}


def _digest(value: Any) -> str:
    # Through JSON first, as the storage keeps attributes: tuples become lists, keys strings.
    canonical = json.dumps(json.loads(json.dumps(value)), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _check_stored(study: optuna.Study, spec: StudySpec, data: str | None,
                  echo: Callable[[str], None]) -> None:
    """Refuse a spec whose fingerprint differs from its stored study's: mixing objectives,
    spaces, budgets or data in one study would fail every new trial or compare unlike trials."""
    _check_directions(study, spec)
    stored = _stored_fingerprint(study, wait=data is not None)
    if stored is None:  # a study from before fingerprints
        changed = _changed_attributes(study, spec)
    else:
        current = fingerprint(spec, data)
        # A part only one side holds changed too (a budget set or dropped); the data is
        # compared only where it was read, the overrides only where the study stored them
        # (a study from before it did holds their effect in its space).
        unread = {"data"} if data is None else set()
        if overrides.STUDY_ATTR not in study.user_attrs:
            unread.add("overrides")
        parts = [*(p for p in current if p not in unread),
                 *(p for p in stored if p not in current and p not in unread)]
        # overrides first, set or dropped: the space they change follows
        parts.sort(key=lambda part: part != "overrides")
        changed = [part for part in parts if stored.get(part) != current.get(part)]
    if changed and changed[0] == "overrides":  # its line says what to do (and the space follows)
        raise ConfigError(f"{spec.path}: {_what_changed(study, spec, 'overrides')}")
    if changed:
        also = f" (also changed: {', '.join(changed[1:])})" if changed[1:] else ""
        raise ConfigError(f"{spec.path}: {_what_changed(study, spec, changed[0])}{also}; use "
                          "a new study name to measure anything else")
    if stored is None and data is not None:
        study.set_user_attr(FINGERPRINT, fingerprint(spec, data))
        echo(f"study {spec.name!r} predates fingerprints: it adopts this spec's, data included "
             "(its earlier trials are taken to be measured on this data)")


def _stored_fingerprint(study: optuna.Study, wait: bool) -> dict[str, str] | None:
    """The study's fingerprint. A study without one and without trials may have been created
    a moment ago by a worker that has not written it yet: with `wait` (a search) this waits up
    to FINGERPRINT_WAIT seconds for it rather than skip the check. The creator writes it before
    any trial, so a study holding trials and no fingerprint predates them."""
    deadline = time.monotonic() + (FINGERPRINT_WAIT if wait else 0)
    while True:
        stored = study.user_attrs.get(FINGERPRINT)
        if stored is not None or study.get_trials(deepcopy=False) or \
                time.monotonic() >= deadline:
            return stored
        time.sleep(0.2)


def _what_changed(study: optuna.Study, spec: StudySpec, part: str) -> str:
    """`key: what` for a changed fingerprint part, from the attributes stored beside it."""
    attrs = study.user_attrs
    if part == "objectives":
        return (f"objectives: the stored study {spec.name!r} has {attrs.get('objectives')}, "
                f"the spec {spec.objectives}")
    if part == "overrides":
        return overrides.mismatch(spec.name, attrs.get(overrides.STUDY_ATTR) or [],
                                  spec.overrides, complete=True) or "--set: differs"
    if part in CONSTRAINTS:
        return (f"{part}: the stored study {spec.name!r} has {attrs.get(part)}, the spec "
                f"{getattr(spec, part)}")
    if part == "space":
        theirs, ours = _without_source(attrs.get("space") or {}), _without_source(spec.merged_space)
        key = _first_difference(theirs, ours)
        if key in (None, "space"):  # not a dotted key's value
            return f"space: differs from the stored study {spec.name!r}"
        return (f"{key}: differs from the stored study {spec.name!r} ({_at(theirs, key)} "
                f"there, {_at(ours, key)} here)")
    source = spec.merged_space.get("data", {}).get("source", "builtin")
    return (f"data.source: the validation and test data of {source!r} differ from those the "
            f"stored study {spec.name!r} was measured on")


def _check_directions(study: optuna.Study, spec: StudySpec) -> None:
    stored = study.user_attrs.get("objectives") or study.metric_names
    directions = [d.name.lower() for d in study.directions]
    if directions != [OBJECTIVES[o] for o in spec.objectives] or (
            stored is not None and stored != spec.objectives):
        raise ConfigError(f"{spec.path}: objectives: the stored study {spec.name!r} has "
                          f"{stored or directions}, the spec {spec.objectives}; use a new "
                          "study name for other objectives")


def _changed_attributes(study: optuna.Study, spec: StudySpec) -> list[str]:
    """The parts a study from before fingerprints still tells apart, from the attributes it
    stored (it never recorded its data)."""
    attrs = study.user_attrs
    changed = []
    if "max_params" in attrs and attrs["max_params"] != spec.max_params:
        changed.append("max_params")
    # data.source may differ: every machine may keep the same shards at its own path.
    if "space" in attrs and _first_difference(_without_source(attrs["space"]),
                                              _without_source(spec.merged_space)):
        changed.append("space")
    return changed


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


def _at(space: dict, key: str) -> str:
    """The value at a dotted key of a space, for a message ("unset" where it has none)."""
    node: Any = space
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return "unset" if node is None else json.dumps(node)


def baseline_sizes(spec: StudySpec) -> list[dict[str, Any]]:
    """Every combination of the model section's categorical choices, as trial params."""
    model = spec.merged_space.get("model", {})
    keys = [k for k, v in model.items() if isinstance(v, list)]
    return [{f"model.{k}": v for k, v in zip(keys, combo, strict=True)}
            for combo in itertools.product(*(model[k] for k in keys))]


def enqueue_baselines(study: optuna.Study, spec: StudySpec) -> int:
    """Queue one vanilla trial per model size that the study does not hold yet, with its size
    and the choice by which the space picks vanilla (`space.mode_params`): so it records the
    mode as every other trial does, and GP and NSGA-II, which model only the parameters every
    finished trial has, model the mode."""
    if not spec.baselines:
        return 0
    baselines = [t for t in study.get_trials(deepcopy=False)
                 if TrialRecord.from_trial(t).baseline]
    held = [t.params for t in baselines]
    held += [t.system_attrs.get("fixed_params", {}) for t in baselines
             if t.state == TrialState.WAITING]
    choice = spaces.mode_params(spec.merged_space, BASELINE_MODE)
    added = 0
    for size in baseline_sizes(spec):
        # by size alone: a baseline queued before baselines carried the choice counts too
        if any(all(h.get(k) == v for k, v in size.items()) for h in held):
            continue
        study.enqueue_trial({**size, **choice}, user_attrs=record_attrs(baseline=True),
                            skip_if_exists=False)
        added += 1
    return added


def _complete_queued_baselines(study: optuna.Study, spec: StudySpec,
                               storage: optuna.storages.BaseStorage) -> None:
    """Add the choice of vanilla (`space.mode_params`) to the baselines a study queued before
    baselines carried it (their size alone) and has not run yet: `space.sample` would refuse
    them, as the sampler, not their queue entry, would make the choice."""
    choice = spaces.mode_params(spec.merged_space, BASELINE_MODE)
    for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        fixed = t.system_attrs.get("fixed_params", {})
        if TrialRecord.from_trial(t).baseline and any(
                fixed.get(k) != v for k, v in choice.items()):
            storage.set_trial_system_attr(t._trial_id, "fixed_params", {**fixed, **choice})


def own_trials(study: optuna.Study, states: Container[TrialState] | None = None
               ) -> list[FrozenTrial]:
    """The study's trials (in `states`) less those a warm start seeded: the trials that count
    toward its n_trials."""
    return [t for t in study.get_trials(deepcopy=False, states=states)
            if TrialRecord.from_trial(t).warm_start is None]


def finished_count(study: optuna.Study) -> int:
    return len(own_trials(study, FINISHED))


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
