"""What a study says about scaling: loss against parameters (or tokens) per variant, and the
paper's two savings against `vanilla`, with intervals.

- Levels: per variant, its arm (`nas.reading.arms`: the plan at its chosen learning rate, reported
  on test loss) at each model shape, or at each training budget of one shape.
- Equivalent parameter saving: fit loss against non-embedding parameters per variant
  (`fit_scaling`) and read off 1 - N_variant(L) / N_vanilla(L) at vanilla's fitted losses L
  (the paper's metric). Only readings inside the variant's measured sizes make the headline;
  the others are listed apart as extrapolated. Every seed is read alone too, and the 95%
  interval is over those per-seed savings (`nas.reading.stats.mean_interval`: a t-interval over a
  few seeds), since seeds are the unit of replication.
- Data saving, primary: the same reading along a tokens axis, from the final losses of runs
  that each had their own full schedule (a study with several budgets at one shape), through
  an interpolation between adjacent budgets (`Interpolation`) rather than a fitted law.
- Data saving, secondary: on one shape and seed, the share of vanilla's training tokens the
  variant needs to reach vanilla's final loss, read off its validation curve (the middle of
  a cosine schedule, so it favours the variant less cleanly; labelled as such).

Reads TrialRecords only: numpy and scipy, no torch, no plotly.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from nas.modes import BASELINE_MODE
from nas.reading.arms import Arm
from nas.reading.fits import FITTERS, Curve, Interpolation, ScalingFit
from nas.reading.stats import mean_interval
from nas.search.trials import TrialRecord

# -- levels: one variant's loss at each size (or budget), per seed --------------------------------


@dataclass
class Level:
    """One variant at one x (non-embedding parameters, or training tokens): loss per seed."""

    x: float
    label: str
    by_seed: dict[int, float]
    tokens_per_model_param: float

    @property
    def loss(self) -> float:
        return float(np.mean(list(self.by_seed.values())))


def _level(arm: Arm, x: float, label: str) -> Level:
    return Level(x, label, arm.by_seed, arm.tokens_per_model_param)


def parameter_levels(arms: Iterable[Arm]) -> dict[str, list[Level]]:
    """Per variant, one Level per model shape (at the shape's longest budget), by size."""
    best: dict[tuple[str, str], Arm] = {}
    for arm in arms:
        key = (arm.variant, arm.shape)
        if key not in best or arm.tokens > best[key].tokens:
            best[key] = arm
    out: dict[str, list[Level]] = {}
    for (name, label), arm in best.items():
        out.setdefault(name, []).append(_level(arm, arm.n_params, label))
    return {k: sorted(v, key=lambda lv: lv.x) for k, v in sorted(out.items())}


def token_levels(arms: Iterable[Arm]) -> dict[str, dict[str, list[Level]]]:
    """Per model shape with two or more budgets, per variant, one Level per budget."""
    out: dict[str, dict[str, list[Level]]] = {}
    for arm in arms:
        out.setdefault(arm.shape, {}).setdefault(arm.variant, []).append(
            _level(arm, arm.tokens, arm.budget))
    return {shape: {k: sorted(v, key=lambda lv: lv.x) for k, v in sorted(by_name.items())}
            for shape, by_name in out.items()
            if max(len(v) for v in by_name.values()) >= 2}


# -- equivalent savings: of parameters (across sizes) or of data (across budgets) ----------------


@dataclass
class LevelSaving:
    label: str
    x: float  # vanilla's parameters or tokens at this level
    saving: float  # 1 - x_variant(L) / x at vanilla's fitted loss L; 0.2 = 20% fewer
    interpolated: bool  # x_variant lies within the sizes (budgets) the variant was run at


@dataclass
class Saving:
    """A variant's equivalent saving against vanilla along one axis ("parameters" or
    "tokens"): the headline averages the levels read by interpolation only."""

    variant: str
    axis: str
    fit: ScalingFit | Interpolation | None
    levels: list[LevelSaving] = field(default_factory=list)
    headline: float | None = None
    interval: tuple[float, float] | None = None  # 95%, refitting on resampled seeds per level
    per_seed: dict[int, float | None] = field(default_factory=dict)
    per_seed_extrapolated: dict[int, bool] = field(default_factory=dict)
    note: str = ""

    @property
    def extrapolated(self) -> list[LevelSaving]:
        return [lv for lv in self.levels if not lv.interpolated]


def _fit(levels: list[Level], seeds: dict[str, list[int]] | None = None,
         axis: str = "parameters") -> Curve | None:
    """The axis's curve through a variant's levels (on the seed means, or on the given seeds
    per level label): a power law across sizes, an interpolation across budgets."""
    losses = [lv.loss if seeds is None else float(np.mean([lv.by_seed[s] for s in
                                                           seeds[lv.label]]))
              for lv in levels]
    return FITTERS[axis]([lv.x for lv in levels], losses)


def _read(base: Curve, fit: Curve, x: float) -> tuple[float, bool] | None:
    """The saving at vanilla's x, and whether it was read within the measured range:
    1 - x_variant(L) / x at vanilla's loss L there. An interpolation cannot extrapolate, so
    where the variant is worse at x it reads the other way, x_vanilla(L_variant) / x - 1, on
    vanilla's curve (dropping those readings would keep only the levels the variant wins)."""
    target = float(base.loss(x))
    if isinstance(fit, Interpolation) and float(fit.loss(x)) > target:
        n = base.size(float(fit.loss(x)))
        return None if n is None else (n / x - 1.0, True)
    n = fit.size(target)
    if n is None:
        return None
    return 1.0 - n / x, fit.n_min <= n <= fit.n_max


def equivalent_saving(name: str, axis: str, base_levels: list[Level],
                      levels: list[Level]) -> Saving:
    """The paper's saving of `levels` (one variant) against `base_levels` (vanilla)."""
    s = Saving(name, axis, _fit(levels, axis=axis))
    base = _fit(base_levels, axis=axis)
    what = "model sizes" if axis == "parameters" else "budgets"
    if len(levels) < 2 or len(base_levels) < 2:
        s.note = f"too few {what} to fit (needs 2)"
        return s
    if s.fit is None or base is None:
        s.note = f"loss does not fall with {'size' if axis == 'parameters' else 'tokens'}"
        return s
    for lv in base_levels:
        read = _read(base, s.fit, lv.x)
        if read is not None:
            s.levels.append(LevelSaving(lv.label, lv.x, *read))
    inside = [lv.label for lv in s.levels if lv.interpolated]
    if not s.levels:
        s.note = "never reaches vanilla's loss" + (
            "" if axis == "parameters" else " within the budgets it ran")
        return s
    if not inside:
        s.note = "every reading is extrapolated: no headline"
        return s
    s.headline = float(np.mean([lv.saving for lv in s.levels if lv.interpolated]))
    paired = {lv.label: lv for lv in levels}
    common = {b.label: sorted(set(b.by_seed) & set(paired[b.label].by_seed))
              for b in base_levels if b.label in paired}
    seeds = sorted(set.intersection(*(set(v) for v in common.values()))) if common else []

    def headline(chosen: dict[str, list[int]]) -> float:
        mine = [lv for lv in levels if lv.label in chosen]
        theirs = [lv for lv in base_levels if lv.label in chosen]
        fit, ref = _fit(mine, chosen, axis), _fit(theirs, chosen, axis)
        if fit is None or ref is None:
            return math.nan
        reads = [_read(ref, fit, lv.x) for lv in theirs if lv.label in inside]
        return math.nan if any(r is None for r in reads) else float(
            np.mean([r[0] for r in reads]))

    labels = list(common)
    if len(labels) == len(base_levels):
        for seed in seeds if len(seeds) > 1 else []:
            alone = {lab: [seed] for lab in labels}
            value = headline(alone)
            s.per_seed[seed] = None if math.isnan(value) else value
            mine, theirs = _fit(levels, alone, axis), _fit(base_levels, alone, axis)
            s.per_seed_extrapolated[seed] = mine is None or theirs is None or any(
                r is None or not r[1] for lv in base_levels if lv.label in inside
                for r in [_read(theirs, mine, lv.x)])
        # over the per-seed savings (seeds are the unit of replication): a t-interval, a BCa
        # bootstrap from stats.BOOTSTRAP_MIN seeds on; none from fewer than two
        readings = [v for v in s.per_seed.values() if v is not None]
        if len(readings) >= 2:
            iv = mean_interval(readings)
            s.interval = (iv.low, iv.high)
    return s


def parameter_savings(arms: list[Arm]) -> tuple[ScalingFit | None, list[Saving]]:
    """Vanilla's loss-against-parameters fit and every other variant's parameter saving."""
    levels = parameter_levels(arms)
    base = levels.get(BASELINE_MODE, [])
    return _fit(base) if len(base) >= 2 else None, [
        equivalent_saving(name, "parameters", base, lv) for name, lv in levels.items()
        if name != BASELINE_MODE]


def token_savings(arms: list[Arm]) -> dict[str, list[Saving]]:
    """Per model shape with a tokens axis, every variant's data saving from the final losses
    of separately scheduled runs (loss against tokens per variant)."""
    out = {}
    for shape, by_name in token_levels(arms).items():
        base = by_name.get(BASELINE_MODE, [])
        out[shape] = [equivalent_saving(name, "tokens", base, lv)
                      for name, lv in by_name.items() if name != BASELINE_MODE]
    return out


# -- the data saving ---------------------------------------------------------------------------


def tokens_to_reach(t: TrialRecord, target: float) -> float | None:
    """Training tokens after which the trial's validation curve first reaches `target`,
    interpolated linearly between validations; None if it never does."""
    per_step = t.tokens_per_step
    prev_step, prev_loss = 0.0, math.inf
    for step, loss in t.curve:
        if loss <= target:
            if math.isinf(prev_loss):
                return float(step) * per_step
            share = (prev_loss - target) / (prev_loss - loss)
            return (prev_step + share * (step - prev_step)) * per_step
        if loss < prev_loss:  # the running minimum: a noisy bump does not undo progress
            prev_step, prev_loss = float(step), loss
    return None


def data_saving(trial: TrialRecord, vanilla: TrialRecord) -> float | None:
    """1 - T_variant(L_vanilla) / T when the variant ends at least as low as vanilla, else
    T_vanilla(L_variant) / T - 1 (T: the run's tokens); None if a curve is missing."""
    tokens = float(vanilla.tokens)
    mine, theirs = float(trial.val_loss), float(vanilla.val_loss)
    if mine <= theirs:
        needed = tokens_to_reach(trial, theirs)
        return None if needed is None else 1.0 - needed / tokens
    needed = tokens_to_reach(vanilla, mine)
    return None if needed is None else needed / tokens - 1.0


@dataclass
class DataSaving:
    variant: str
    saving: float | None  # mean over model shapes and seeds
    per_seed: dict[int, float] = field(default_factory=dict)  # mean over shapes, per seed
    per_size: dict[str, float] = field(default_factory=dict)  # shape label -> mean over seeds
    pairs: int = 0


def curve_data_savings(arms: list[Arm]) -> list[DataSaving]:
    """Per variant, the curve-read data saving against vanilla's arm of the same shape and
    budget, seed by seed (the secondary data saving: see the module docstring)."""
    vanilla = {(a.shape, a.tokens): a for a in arms if a.variant == BASELINE_MODE}
    values: dict[str, list[tuple[str, int, float]]] = {}
    for arm in arms:
        base = vanilla.get((arm.shape, arm.tokens))
        if arm.variant == BASELINE_MODE or base is None:
            continue
        theirs = {t.seed: t for t in base.trials}
        for t in arm.trials:
            if t.seed in theirs and (s := data_saving(t, theirs[t.seed])) is not None:
                values.setdefault(arm.variant, []).append((arm.shape, t.seed, s))
    out = []
    for name in sorted({a.variant for a in arms} - {BASELINE_MODE}):
        rows = values.get(name, [])
        d = DataSaving(name, float(np.mean([v for *_, v in rows])) if rows else None,
                       pairs=len(rows))
        for seed in sorted({s for _, s, _ in rows}):
            d.per_seed[seed] = float(np.mean([v for _, s, v in rows if s == seed]))
        for label in dict.fromkeys(n for n, _, _ in rows):  # in the order met
            d.per_size[label] = float(np.mean([v for m, _, v in rows if m == label]))
        out.append(d)
    return out


# -- per-layer profiles ------------------------------------------------------------------------


def layer_runs(trials: Iterable[TrialRecord], read: str, modes: Iterable[str] | None = None
               ) -> dict[str, dict[str, list[list[float]]]]:
    """Per model shape (its label; smallest first) and variant, one per-layer list per trial:
    `read` is an analysis key (`attention_entropy`, `value_cosine`, `mixed_value_cosine`) or
    a coefficient name (`lambda1`, `v_lambda`, ...; NaN where a layer does not receive); `modes`
    keeps only trials of those modes."""
    groups: dict[tuple[tuple[int, int, str], str], list[list[float]]] = {}
    for t in trials:
        if modes is not None and t.mode not in modes:
            continue
        n_layer = int(t.model.get("n_layer", 0))
        if read in t.analysis:
            row = [float(v) for v in t.analysis[read]]
        else:
            row = [float(t.coefficients.get(f"L{i}.{read}", math.nan)) for i in range(n_layer)]
            if all(math.isnan(v) for v in row):
                continue
        size = (n_layer, int(t.model.get("d_model", 0)), t.shape)
        groups.setdefault((size, t.arm_name), []).append(row)
    out: dict[str, dict[str, list[list[float]]]] = {}
    for ((*_, shape), name), rows in sorted(groups.items()):
        out.setdefault(shape, {})[name] = rows
    return out


def layer_profile(trials: Iterable[TrialRecord], read: str,
                  modes: Iterable[str] | None = None) -> dict[str, dict[str, list[float]]]:
    """`layer_runs` averaged over trials (seeds)."""
    return {shape: {name: [float(np.mean(col)) for col in zip(*rows, strict=True)]
                    for name, rows in by_name.items()}
            for shape, by_name in layer_runs(trials, read, modes).items()}
