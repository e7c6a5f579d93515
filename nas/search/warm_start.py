"""Warm starts: a new study seeded with the finished trials of an earlier one (`warm_start:
{study: NAME, storage: URL}` in a spec, or `nas search --warm-start NAME@URL`), so that, say, a
GPU study's sampler starts from what a CPU study learned. Without a storage, the earlier study
is looked for in this study's storage, then in its own default one (`runs/<NAME>.db`, where
`nas search` put it).

Each completed trial of the earlier study is replayed through this study's space: every
parameter the space asks for must be among the trial's, with a value this space allows (a
range may have changed; a key the earlier study did not search, or a value now outside, puts
the trial outside this space). A trial inside becomes a COMPLETE trial of the new study with
the parameters, as this space names and bounds them, and its stored values of this study's
objectives, read from its attributes (a trial without one is skipped), under this study's
budgets (a trial over one is skipped, and the others carry their constraints, as every trial
here does). What is skipped is counted, in the one line the search prints.

A seeded trial carries one attribute, `warm_start` (where it came from), and none of the
measurements the front, the tables, the trial figures, exports and the Pareto pruner read: they
were taken under the earlier study's base (its data, steps, model sizes), so they steer where
the sampler looks, not what this study reports (only the hypervolume history and the
importances, drawn from Optuna's values, start from them); nor do they count toward its
n_trials. TPE and GP model them; random and NSGA-II (whose generations hold only trials it
sampled) do not use them.
Knows nothing of torch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import FrozenTrial, TrialState, create_trial

from nas.errors import ConfigError
from nas.modes import BASELINE_MODE
from nas.search import space as spaces
from nas.search.spec import CONSTRAINTS, StudySpec, default_storage
from nas.search.storage import check_access, make_storage, redact, storage_file
from nas.search.trials import TrialRecord, record_attrs


class Outside(Exception):
    """A trial's parameters do not answer this space's suggestions."""


class Replay:
    """A `space.Suggester` that answers each suggestion with an earlier trial's parameter,
    recording this space's distribution for it."""

    def __init__(self, params: dict[str, Any]):
        self.params = params
        self.distributions: dict[str, BaseDistribution] = {}

    def _take(self, name: str, distribution: BaseDistribution) -> Any:
        if name not in self.params:
            raise Outside(name)
        self.distributions[name] = distribution
        return self.params[name]

    def suggest_categorical(self, name: str, choices: Any) -> Any:
        return self._take(name, CategoricalDistribution(choices))

    def suggest_int(self, name: str, low: int, high: int, step: int = 1,
                    log: bool = False) -> int:
        return self._take(name, IntDistribution(low, high, log=log, step=step))

    def suggest_float(self, name: str, low: float, high: float, *, step: float | None = None,
                      log: bool = False) -> float:
        return self._take(name, FloatDistribution(low, high, log=log, step=step))


def source_urls(spec: StudySpec, storage_url: str) -> list[str]:
    """Where the warm-start study may be, in order: its storage as given; else this study's
    (`storage_url`), then the earlier study's own default storage."""
    if spec.warm_start.storage is not None:
        return [spec.warm_start.storage]
    own = default_storage(spec.warm_start.study)
    return [storage_url, *([own] if own != storage_url else [])]


def load_source(spec: StudySpec, storage_url: str) -> tuple[optuna.Study, str]:
    """The study the spec warm-starts from and its storage's URL (this study's storage is
    `storage_url`), checked before the new study is created: it exists, holds completed
    trials, and searched some key this space searches."""
    name = spec.warm_start.study
    where = f"warm start from {name!r}"
    missed = []
    for url in source_urls(spec, storage_url):
        path = storage_file(url)
        if path is not None and not path.is_file():
            missed.append(f"storage {redact(url)} does not exist")
            continue
        if url != storage_url:  # this study's was checked before it was opened; opening and
            # closing an SQLite file this process holds open would drop its locks on it
            check_access(url, write=False, where=where)
        storage = make_storage(url, where=where)
        names = optuna.get_all_study_names(storage)
        if name in names:
            break
        missed.append(f"no study {name!r} in {redact(url)} (studies there: "
                      f"{', '.join(names) or 'none'})")
    else:
        raise ConfigError(f"{where}: {'; '.join(missed)}")
    source = optuna.load_study(study_name=name, storage=storage)
    done = _candidates(source)
    if not done:
        raise ConfigError(f"{where}: it has no completed trials to start from")
    theirs = set().union(*(t.params for t in done))
    ours = searched_keys(spec)
    if not theirs & ours:
        raise ConfigError(f"{where}: its trials share no searched key with this space (they "
                          f"set {', '.join(sorted(theirs)) or 'none'}; this space searches "
                          f"{', '.join(sorted(ours)) or 'none'})")
    return source, url


def searched_keys(spec: StudySpec, draws: int = 64) -> set[str]:
    """The parameter names this space suggests, from random draws (a mode's own keys appear
    only in draws of that mode)."""
    probe = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    keys: set[str] = set()
    for _ in range(draws):
        trial = probe.ask()
        spaces.sample(spec.merged_space, trial)
        keys |= set(trial.params)
        probe.tell(trial, 0.0)
    return keys


def _candidates(study: optuna.Study) -> list[FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def seed(study: optuna.Study, spec: StudySpec, source: optuna.Study, url: str,
         echo: Callable[[str], None]) -> int:
    """Add the completed trials of `source` (in storage `url`) that fit this study (see the
    module docstring); returns how many, and echoes one line saying so and what was
    skipped."""
    origin = f"{source.study_name}@{redact(url)}"
    skipped: dict[str, int] = {}
    seeded = []
    for t in _candidates(source):
        made = _seeded(t, spec, f"{origin} trial {t.number}")
        if isinstance(made, str):
            skipped[made] = skipped.get(made, 0) + 1
        else:
            seeded.append(made)
    study.add_trials(seeded)
    why = ", ".join(f"{n} {reason}" for reason, n in skipped.items())
    echo(f"warm start: seeded {len(seeded)} trial(s) from study {source.study_name!r} in "
         f"{redact(url)}" + (f"; skipped {why}" if why else ""))
    return len(seeded)


def _seeded(t: FrozenTrial, spec: StudySpec, origin: str) -> FrozenTrial | str:
    """The trial `t` as a seeded trial of the spec's study, or why it cannot be one."""
    record = TrialRecord.from_trial(t)
    values = [record.objective(o) for o in spec.objectives]
    missing = [o for o, v in zip(spec.objectives, values, strict=True) if v is None]
    if missing:
        return f"without {missing[0]}"
    constraints = {}
    for key, (name, _) in CONSTRAINTS.items():
        limit = getattr(spec, key)
        if limit is None:
            continue
        value = record.objective(name)
        if value is None:
            return f"without {name} (for {key})"
        if value > limit:
            return f"over {key}"
        constraints[name] = value - limit
    replay = Replay(t.params)
    try:
        # a baseline's mode is forced, as this study's are; one queued with its size alone
        # (before baselines recorded their mode) falls outside a space that searches it
        spaces.sample(spec.merged_space, replay,
                      force_mode=BASELINE_MODE if record.baseline else None)
        return create_trial(params={k: t.params[k] for k in replay.distributions},
                            distributions=replay.distributions, values=values,
                            user_attrs=record_attrs(warm_start=origin),
                            constraints=constraints or None)
    except (Outside, ValueError):  # ValueError: a value this space's distribution lacks
        return "outside this space"
