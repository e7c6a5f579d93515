"""The cheaper learning-rate protocol of a named-variant study (`lr_sweep: first_seed`).

The full protocol (`lr_sweep: all_seeds`, the default) trains every (variant, size, learning
rate, seed) of the grid. `first_seed` trains the learning-rate grid on the first seed only, then
the remaining seeds at the rate that seed chose for each (variant, size): with L rates and S
seeds, L + S - 1 runs per (variant, size) instead of L x S. Its bias: the first seed's run at the
chosen rate is both what chose the rate and one of the reported runs, so its validation loss is
optimistic by the winner's curse; its test loss is not selected on, and the other seeds are
free of selection altogether.

Every trial of the protocol comes from the study's queue: the sweep is queued when the study is
created, and the follow-up seeds of a (variant, size) as soon as its sweep has finished.
Knows nothing of torch.
"""

from __future__ import annotations

import itertools
import random
from typing import Any

import optuna
from optuna.trial import TrialState

from .trials import TrialRecord

PROTOCOLS = ("all_seeds", "first_seed")


def grid(space: dict) -> list[dict[str, Any]]:
    """Every combination of the space's categorical choices of `variant` and of the model and
    train sections, as trial params (the grid a brute-force sampler walks)."""
    axes: dict[str, list] = {}
    if space.get("variants"):
        axes["variant"] = list(space["variants"])
    for section in ("model", "train"):
        for key, value in space.get(section, {}).items():
            if isinstance(value, list):
                axes[f"{section}.{key}"] = value
    return [dict(zip(axes, combo, strict=True)) for combo in itertools.product(*axes.values())]


def sweep(space: dict, seed: int) -> list[dict[str, Any]]:
    """The first seed's grid, in a seeded random order (so that an interrupted study has
    sampled every variant and size alike)."""
    first = space["train"]["seed"][0]
    params = [p for p in grid(space) if p["train.seed"] == first]
    random.Random(seed).shuffle(params)
    return params


def _group(params: dict[str, Any]) -> tuple:
    return tuple(sorted((k, v) for k, v in params.items() if k not in ("train.lr", "train.seed")))


def pending(study: optuna.Study, space: dict, seed: int) -> list[dict[str, Any]]:
    """The trials the protocol needs that the study neither holds nor has queued: the sweep's
    (all of it for a new study, a failed one again), and for each (variant, size) whose sweep
    has completed, the other seeds at the rate with the lowest validation loss."""
    seeds, rates = space["train"]["seed"], space["train"]["lr"]
    trials = study.get_trials(deepcopy=False)
    present = {tuple(sorted((t.system_attrs.get("fixed_params") or t.params).items()))
               for t in trials if t.state != TrialState.FAIL}
    swept: dict[tuple, dict[float, float]] = {}
    for t in trials:
        if t.state == TrialState.COMPLETE and t.params.get("train.seed") == seeds[0]:
            swept.setdefault(_group(t.params), {})[t.params["train.lr"]] = (
                TrialRecord.from_trial(t).val_loss)
    wanted = sweep(space, seed)
    for group, losses in swept.items():
        if set(losses) == set(rates):
            best = min(losses, key=losses.get)
            wanted += [{**dict(group), "train.lr": best, "train.seed": s} for s in seeds[1:]]
    return [p for p in wanted if tuple(sorted(p.items())) not in present]


def enqueue_pending(study: optuna.Study, space: dict, seed: int) -> int:
    """Queue what `pending` finds; returns how many."""
    todo = pending(study, space, seed)
    for params in todo:
        study.enqueue_trial(params, skip_if_exists=False)
    return len(todo)
