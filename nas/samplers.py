"""The sampler and pruners a study spec names, constructed explicitly and seeded. Never reads
or writes a study. Knows nothing of torch.
"""

from __future__ import annotations

import optuna

from .config import ConfigError
from .pruning import ParetoPruner
from .spec import StudySpec


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
