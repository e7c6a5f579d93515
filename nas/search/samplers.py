"""The sampler and pruners a study spec names, constructed explicitly and seeded. Never reads
or writes a study. Knows nothing of torch.
"""

from __future__ import annotations

import optuna

from nas.errors import ConfigError
from nas.search.pruning import ParetoPruner
from nas.search.spec import StudySpec

# `type: auto` picks GP up to this many trials and TPE beyond (see auto_kind).
AUTO_GP_MAX_TRIALS = 200


def auto_kind(spec: StudySpec) -> tuple[str, str]:
    """The sampler `type: auto` picks for the spec, and why: by its n_trials. GP up to
    AUTO_GP_MAX_TRIALS: benchmarks/samplers.py finds it narrowly ahead of random, TPE and
    NSGA-II at 30 trials on its own space (mean and worst seed), though level with random on
    the quickstart's (which TPE and NSGA-II lead at 30: there GP models only the size and the
    mode, the keys every trial has), and its refit, cubic in the trials, costs about 0.1 s a
    trial at 25 and 0.2 s at 200 on the benchmark's space (one core). TPE beyond, where
    GP's cost keeps growing and the benchmark says nothing: TPE's cost grows linearly, and it
    models every key of a conditional space (`group`), where GP models only the keys every
    trial has."""
    if spec.n_trials <= AUTO_GP_MAX_TRIALS:
        return "gp", f"n_trials {spec.n_trials} <= {AUTO_GP_MAX_TRIALS}"
    return "tpe", f"n_trials {spec.n_trials} > {AUTO_GP_MAX_TRIALS}"


def make_sampler(spec: StudySpec, seed: int) -> optuna.samplers.BaseSampler:
    opts, kind = spec.sampler.options, spec.sampler.type
    if kind == "auto":
        kind, _ = auto_kind(spec)
    try:
        if kind == "tpe":
            opts = {"multivariate": True, "group": True, "constant_liar": True, **opts}
            return optuna.samplers.TPESampler(seed=seed, **opts)
        if kind == "gp":
            # Our spaces are conditional by design (a mode's own keys): GP models the keys
            # every trial has and draws the others at random, which is no cause for a warning.
            opts = {"warn_independent_sampling": False, **opts}
            return optuna.samplers.GPSampler(seed=seed, **opts)
        if kind == "nsga2":
            return optuna.samplers.NSGAIISampler(seed=seed, **opts)
        if kind == "random":
            return optuna.samplers.RandomSampler(seed=seed, **opts)
        return optuna.samplers.BruteForceSampler(seed=seed, **opts)
    except TypeError as exc:
        raise ConfigError(f"{spec.path}: sampler: {exc}") from None


def make_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    opts, kind = spec.pruner.options, spec.pruner.type
    try:
        if kind == "median":
            return optuna.pruners.MedianPruner(**opts)
        if kind == "hyperband":
            return optuna.pruners.HyperbandPruner(**opts)
    except TypeError as exc:
        raise ConfigError(f"{spec.path}: pruner: {exc}") from None
    return optuna.pruners.NopPruner()  # pareto runs inside the objective


def pareto_pruner(spec: StudySpec) -> ParetoPruner | None:
    if spec.pruner.type != "pareto":
        return None
    try:
        return ParetoPruner(**spec.pruner.options)
    except TypeError as exc:
        raise ConfigError(f"{spec.path}: pruner: {exc}") from None
