"""A study remembers how it was run: the `--set` overrides `nas search` created it with are
stored with it (the user attribute `nas.overrides.STUDY_ATTR`, and a part of its fingerprint),
and every later command on the study (a resumed search, export, report, analyze, dashboard)
loads the spec with them, saying so in one line. A resume given other values for them is
refused, naming the key and both values. Knows nothing of torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import optuna

from nas import overrides
from nas.errors import ConfigError
from nas.search.spec import StudySpec, load_spec
from nas.search.storage import check_access, make_storage, storage_file
from nas.search.study import resolve_storage


def load_study_spec(path: str | Path, storage: str | None = None, *, data: str | None = None,
                    sets: Sequence[str] = (), warm_start: str | None = None,
                    note: Callable[[str], None] = print, write: bool = False) -> StudySpec:
    """`nas.search.spec.load_spec`, with the overrides the spec's study (in `storage`, the --storage
    URL if given) was searched with applied where `sets` leaves them out; `note` gets the
    line that says so. Given overrides that depart from the stored ones are a ConfigError.
    `write`: the command will write to the storage (a search), so a file it may not write is
    refused now, in its own words."""
    spec = load_spec(path, data=data, sets=sets, warm_start=warm_start)
    stored = stored_overrides(spec, storage, write)
    if stored is None:
        return spec
    problem = overrides.mismatch(spec.name, stored, spec.overrides, complete=False)
    if problem:
        raise ConfigError(problem)
    given = overrides.by_key(spec.overrides)
    missing = [text for key, (text, _) in overrides.by_key(stored).items() if key not in given]
    if not missing:
        return spec
    note("applying the study's stored " + " ".join(f"--set {text}" for text in missing))
    return load_spec(path, data=data, sets=stored, warm_start=warm_start)


def stored_overrides(spec: StudySpec, storage: str | None = None,
                     write: bool = False) -> list[str] | None:
    """The overrides the spec's study was searched with; None where the storage or the study
    does not exist yet, or the study predates stored overrides. Reads only: creates nothing."""
    url = resolve_storage(spec, storage)
    file = storage_file(url)
    if file is not None and not file.is_file():
        return None
    where = "--storage" if storage else f"{spec.path}: storage"
    check_access(url, write=write, where=where)
    backend = make_storage(url, where=where)
    try:
        try:
            study_id = backend.get_study_id_from_name(spec.name)
        except KeyError:
            return None
        return backend.get_study_user_attrs(study_id).get(overrides.STUDY_ATTR)
    finally:
        if isinstance(backend, optuna.storages.RDBStorage):
            # Now, not whenever it is collected: closing a connection to an SQLite file drops
            # every lock this process holds on it, the study's own storage's included.
            backend.engine.dispose()
