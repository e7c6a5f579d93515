"""Arms: a study's trials grouped into what a comparison compares, each at its own learning rate.

An *arm* is one plan: a variant at one model shape and training budget, with every run-config
key but the seed and the learning rate fixed. Where an arm ran several learning rates, the rate
is chosen on validation loss alone, by the study's protocol (`nas.search.lr_sweep`): under
`all_seeds` (and `first_seed`, whose first seed alone ran every rate) the rate with the lowest mean
`val_loss` over the seeds that ran at every rate; under `crossfit` each half of those seeds is
reported at the rate the other half chose. A choice at either end of the grid is flagged (the
best rate may lie outside it), and so is a choice whose margin over the next-best rate is within
its own noise (a coin flip). What an arm reports is its *test* loss, the mean over its seeds at
the chosen rate, which no choice, pruner or sampler reads; a study without a test split reports
validation loss and says so.

Paired differences compare an arm with vanilla's arm of the same shape and budget on the same
seed (the same initialisation seed and data order): per shape a 95% interval over seeds
(`nas.reading.stats.mean_interval`), and per variant an exact sign-flip p-value over every pair.
Reads TrialRecords only; no torch.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from nas.config import BUDGET_KEYS
from nas.modes import BASELINE_MODE
from nas.reading.stats import Interval, mean_interval, sign_flip_p
from nas.search.lr_sweep import best_rate, choosing_halves
from nas.search.trials import TrialRecord

COIN_FLIP_Z = 1.96  # a margin under this many standard errors is a coin flip


def budget_key(r: TrialRecord) -> str:
    return json.dumps({k: r.train[k] for k in BUDGET_KEYS if r.train.get(k) is not None},
                      sort_keys=True)


def plan_key(config: dict) -> str:
    """A run config but its seed, learning rate and data paths: one arm's trials."""
    cfg = json.loads(json.dumps(config))
    cfg.get("train", {}).pop("seed", None)
    cfg.get("train", {}).pop("lr", None)
    for key in ("source", "test_source"):  # the same data at another path
        cfg.get("data", {}).pop(key, None)
    return json.dumps(cfg, sort_keys=True)


def reports_test(trials: Iterable[TrialRecord]) -> bool:
    return all(r.test_loss is not None for r in trials)


@dataclass
class Arm:
    variant: str
    trials: list[TrialRecord]  # the runs at the chosen rate, one per seed
    lr: float
    grid: list[float] = field(default_factory=list)  # the rates this arm ran
    missing: list[float] = field(default_factory=list)  # rates others ran, due here (`_missing`)
    val_by_lr: dict[float, float] = field(default_factory=dict)  # mean over the common seeds
    choice_seeds: list[int] = field(default_factory=list)  # the seeds the choice averaged
    runs: dict[float, dict[int, TrialRecord]] = field(default_factory=dict)  # by rate and seed
    # crossfit: (the seeds that chose, the rate they chose), one per half
    halves: list[tuple[list[int], float]] = field(default_factory=list)

    @property
    def chosen_rates(self) -> list[float]:
        return [lr for _, lr in self.halves] or [self.lr]

    @property
    def at_edge(self) -> bool:
        """A chosen rate is the lowest or highest of a grid of 2 or more."""
        return len(self.grid) > 1 and any(lr in (self.grid[0], self.grid[-1])
                                          for lr in self.chosen_rates)

    @property
    def margin(self) -> tuple[float, float] | None:
        """How far the next-best rate's mean validation loss is above the chosen one's, and
        the standard error of that gap: over the choosing seeds' paired differences, or for
        one seed over the validation windows both runs were scored on. None without a
        second rate."""
        if len(self.val_by_lr) < 2 or not self.choice_seeds:
            return None
        best, second = sorted(self.val_by_lr, key=self.val_by_lr.get)[:2]
        gap = self.val_by_lr[second] - self.val_by_lr[best]
        pairs = [(self.runs[second][s], self.runs[best][s]) for s in self.choice_seeds]
        if len(pairs) > 1:
            se = float(np.std([a.val_loss - b.val_loss for a, b in pairs], ddof=1)
                       / math.sqrt(len(pairs)))
        else:
            se = paired_window_se(*pairs[0], split="val") or math.nan
        return gap, se

    @property
    def coin_flip(self) -> bool:
        """The choice's margin is within COIN_FLIP_Z standard errors of its noise."""
        m = self.margin
        return m is not None and not math.isnan(m[1]) and m[0] < COIN_FLIP_Z * m[1]

    @property
    def first(self) -> TrialRecord:
        return self.trials[0]

    @property
    def n_params(self) -> float:
        """Non-embedding parameters (the axis of every fit here)."""
        return float(self.first.n_params_non_embedding)

    @property
    def tokens(self) -> float:
        return float(self.first.tokens)

    @property
    def tokens_per_model_param(self) -> float:
        """Tokens per non-embedding parameter of this plan's model, as its run measured them."""
        return float(self.first.tokens_per_model_param)

    @property
    def shape(self) -> str:
        return self.first.shape

    @property
    def budget(self) -> str:
        """The budget as configured (the same for every plan of a shape): `20 tok/param`."""
        train = self.first.train
        if train.get("tokens_per_param") is not None:
            return f"{train['tokens_per_param']:g} tok/param"
        if train.get("tokens") is not None:
            return f"{train['tokens']:,} tokens"
        return f"{train.get('steps', '?')} steps"

    @property
    def by_seed(self) -> dict[int, float]:
        return {r.seed: r.reported_loss for r in self.trials}

    @property
    def loss(self) -> float:
        return float(np.mean(list(self.by_seed.values())))

    @property
    def val(self) -> float:
        return float(np.mean([r.val_loss for r in self.trials]))

    @property
    def spread(self) -> tuple[float, float]:
        values = list(self.by_seed.values())
        return min(values), max(values)


def _missing(every_rate: list[float], grid: list[float], chosen: float) -> list[float]:
    """The rates other arms ran that this arm (its `grid`, its `chosen` rate) has yet to run:
    a hole inside its grid, or the next rate beyond the edge its choice sits at (the
    extension it is due). The rates further out, or beyond an edge it did not choose, are
    other arms' extensions, which this arm may never run."""
    low, high = grid[0], grid[-1]
    below, above = [r for r in every_rate if r < low], [r for r in every_rate if r > high]
    due = ([above[0]] if above and chosen == high else []) + (
        [below[-1]] if below and chosen == low else [])
    return sorted([r for r in every_rate if low < r < high and r not in grid] + due)


def choose_arms(trials: Iterable[TrialRecord], protocol: str = "all_seeds") -> list[Arm]:
    """Every plan of completed `trials` as an Arm at its chosen learning rate, under the study's
    lr_sweep `protocol` (see the module docstring)."""
    plans: dict[tuple[str, str], dict[float, dict[int, TrialRecord]]] = {}
    for r in trials:
        if r.val_loss is None:
            continue
        by_seed = plans.setdefault((r.arm_name, plan_key(r.config)), {}).setdefault(r.lr, {})
        if r.seed not in by_seed or r.val_loss < by_seed[r.seed].val_loss:
            by_seed[r.seed] = r
    every_rate = sorted({lr for by_lr in plans.values() for lr in by_lr})
    arms = []
    for (name, _), by_lr in plans.items():
        grid = sorted(by_lr)
        common = sorted(set.intersection(*(set(runs) for runs in by_lr.values())))
        val = {lr: {s: by_lr[lr][s].val_loss for s in common} for lr in grid}
        val_by_lr = ({lr: float(np.mean(list(v.values()))) for lr, v in val.items()}
                     if common else {})
        lr = min(val_by_lr, key=val_by_lr.get) if val_by_lr else grid[0]
        reported = [by_lr[lr][s] for s in sorted(by_lr[lr])]
        halves: list[tuple[list[int], float]] = []
        if protocol == "crossfit" and len(common) >= 2:
            first, second = choosing_halves(common)
            rate_1, rate_2 = best_rate(val, first), best_rate(val, second)
            halves = [(first, rate_1), (second, rate_2)]
            # each half reported at the rate the other chose
            reported = sorted([by_lr[rate_2][s] for s in first]
                              + [by_lr[rate_1][s] for s in second], key=lambda r: r.seed)
        missing = _missing(every_rate, grid, lr) if len(grid) > 1 else []
        arms.append(Arm(name, reported, lr, grid, missing, val_by_lr, common, by_lr, halves))
    return arms


def best_arms(trials: Iterable[TrialRecord], protocol: str = "all_seeds") -> list[Arm]:
    """Per (variant, shape, budget) the arm with the lowest validation loss (a search study
    holds many plans per shape), sorted by variant, then parameters, then tokens."""
    best: dict[tuple[str, str, str], Arm] = {}
    for arm in choose_arms(trials, protocol):
        key = (arm.variant, arm.first.shape_key, budget_key(arm.first))
        if key not in best or arm.val < best[key].val:
            best[key] = arm
    return sorted(best.values(), key=lambda a: (a.variant, a.n_params, a.tokens))


def profiled_trials(arms: Iterable[Arm]) -> list[TrialRecord]:
    """The runs that per-layer readings (coefficients, entropy) average: every variant and
    size at its chosen rate and longest budget, so seeds pool but budgets and rates do not."""
    longest: dict[tuple[str, str], Arm] = {}
    for a in arms:
        if (a.variant, a.shape) not in longest or a.tokens > longest[a.variant, a.shape].tokens:
            longest[a.variant, a.shape] = a
    return [t for a in longest.values() for t in a.trials]


def level_key(arm: Arm) -> tuple[str, str]:
    return arm.first.shape_key, budget_key(arm.first)


# -- paired differences from vanilla -----------------------------------------------------------


@dataclass
class Difference:
    """A variant's reported loss minus vanilla's, per seed, at one shape and budget."""

    variant: str
    arm: Arm
    vanilla: Arm
    by_seed: dict[int, float]

    @property
    def interval(self) -> Interval:
        return mean_interval(list(self.by_seed.values()))

    @property
    def label(self) -> str:
        return self.arm.shape


def paired_differences(arms: list[Arm]) -> dict[str, list[Difference]]:
    """Per variant (vanilla aside) of `arms` (best_arms), one Difference per shape and budget
    that vanilla ran too, over the seeds both report, smallest model first."""
    vanilla = {level_key(a): a for a in arms if a.variant == BASELINE_MODE}
    out: dict[str, list[Difference]] = {}
    for arm in arms:
        base = vanilla.get(level_key(arm))
        if arm.variant == BASELINE_MODE or base is None:
            continue
        mine, theirs = arm.by_seed, base.by_seed
        pairs = {s: mine[s] - theirs[s] for s in sorted(set(mine) & set(theirs))}
        if pairs:
            out.setdefault(arm.variant, []).append(Difference(arm.variant, arm, base, pairs))
    return {k: sorted(v, key=lambda d: (d.arm.n_params, d.arm.tokens))
            for k, v in sorted(out.items())}


def pooled_p(differences: list[Difference]) -> float:
    """The exact sign-flip p-value over every (shape, budget, seed) pair of a variant."""
    return sign_flip_p([v for d in differences for v in d.by_seed.values()])


def paired_window_se(a: TrialRecord, b: TrialRecord, split: str = "test") -> float | None:
    """The standard error of a's loss minus b's over the batches both were scored on (the
    same windows), or None when either lacks per-batch losses."""
    xa, xb = getattr(a, f"{split}_batch_losses"), getattr(b, f"{split}_batch_losses")
    if not xa or not xb or len(xa) != len(xb) or len(xa) < 2:
        return None
    d = np.asarray(xa) - np.asarray(xb)
    return float(d.std(ddof=1) / math.sqrt(len(d)))
