"""What a study says about scaling: loss against parameters (or tokens) per variant, and the
paper's two savings against `vanilla`, with intervals.

- Levels: per variant, its arm (`nas.arms`: the plan at its chosen learning rate, reported on
  test loss) at each model shape, or at each training budget of one shape.
- Equivalent parameter saving: fit loss against non-embedding parameters per variant
  (`fit_scaling`) and read off 1 - N_variant(L) / N_vanilla(L) at vanilla's fitted losses L
  (the paper's metric). Only readings inside the variant's measured sizes make the headline;
  the others are listed apart as extrapolated. Its 95% interval refits on seeds resampled
  within each size (scipy.stats.bootstrap), and every seed is read alone too.
- Data saving, primary: the same reading along a tokens axis, from the final losses of runs
  that each had their own full schedule (a study with several budgets at one shape).
- Data saving, secondary: on one shape and seed, the share of vanilla's training tokens the
  variant needs to reach vanilla's final loss, read off its validation curve (the middle of
  a cosine schedule, so it favours the variant less cleanly; labelled as such).

Reads FrozenTrials' user attributes only: numpy, scipy and optuna, no torch, no plotly.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from optuna.trial import FrozenTrial

from .arms import Arm, seed_of, shape_label, variant
from .stats import bootstrap_interval

# -- fits --------------------------------------------------------------------------------------


@dataclass
class ScalingFit:
    """loss = a + b * (N / n_ref)^-alpha ("power"), or loss = a + b * log(N / n_ref) ("log")."""

    kind: str
    a: float
    b: float
    alpha: float
    n_ref: float
    n_min: float
    n_max: float
    residuals: list[float] = field(default_factory=list)  # measured minus fitted, by size

    @property
    def n_free(self) -> int:
        return 3 if self.kind == "power" else 2

    def loss(self, n: np.ndarray | float) -> np.ndarray | float:
        x = np.asarray(n, dtype=float) / self.n_ref
        if self.kind == "power":
            return self.a + self.b * x ** -self.alpha
        return self.a + self.b * np.log(x)

    def size(self, loss: float) -> float | None:
        """The parameter count at which the fit reaches `loss`, or None if it never does."""
        if self.kind == "power":
            if loss <= self.a:
                return None
            return float(self.n_ref * ((loss - self.a) / self.b) ** (-1.0 / self.alpha))
        return float(self.n_ref * math.exp((loss - self.a) / self.b))

    def describe(self) -> str:
        if self.kind == "power":
            return f"L = {self.a:.3f} + {self.b:.3f}·(N/{self.n_ref:,.0f})^-{self.alpha:.2f}"
        return f"L = {self.a:.3f} {self.b:+.3f}·ln(N/{self.n_ref:,.0f})"


def fit_scaling(n_params: list[float], losses: list[float]) -> ScalingFit | None:
    """Fit loss against parameters: a power law with an offset from three sizes on, a
    log-linear law from two; None when there are fewer sizes or the loss does not fall."""
    n, y = np.asarray(n_params, dtype=float), np.asarray(losses, dtype=float)
    if len(np.unique(n)) < 2:
        return None
    n_ref = float(np.exp(np.log(n).mean()))
    x = n / n_ref
    if len(np.unique(n)) >= 3:
        power = _fit_power(x, y)
        if power is not None:
            fit = ScalingFit("power", *power[:2], power[2], n_ref, float(n.min()),
                             float(n.max()))
            fit.residuals = [float(r) for r in y - fit.loss(n)]
            return fit
    slope, intercept = np.polyfit(np.log(x), y, 1)
    if slope >= 0:
        return None
    fit = ScalingFit("log", float(intercept), float(slope), 0.0, n_ref, float(n.min()),
                     float(n.max()))
    fit.residuals = [float(r) for r in y - fit.loss(n)]
    return fit


def _fit_power(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float] | None:
    """Least squares over alpha (a grid, then a finer one around the best); a and b are
    linear given alpha, solved in closed form for every alpha of a grid at once."""
    best: tuple[float, float, float, float] | None = None
    grid = np.linspace(0.02, 2.0, 199)
    for _ in range(2):
        basis = x[None, :] ** -grid[:, None]  # (alphas, points)
        centred = basis - basis.mean(axis=1, keepdims=True)
        b = (centred @ (y - y.mean())) / (centred ** 2).sum(axis=1)
        a = y.mean() - b * basis.mean(axis=1)
        sse = ((a[:, None] + b[:, None] * basis - y[None, :]) ** 2).sum(axis=1)
        sse = np.where(b > 0, sse, np.inf)
        i = int(np.argmin(sse))
        if not np.isfinite(sse[i]):
            return None
        best = (float(sse[i]), float(a[i]), float(b[i]), float(grid[i]))
        grid = np.linspace(max(0.005, best[3] - 0.01), best[3] + 0.01, 81)
    assert best is not None
    return best[1], best[2], best[3]


# -- levels: one variant's loss at each size (or budget), per seed --------------------------------


@dataclass
class Level:
    """One variant at one x (non-embedding parameters, or training tokens): loss per seed."""

    x: float
    label: str
    by_seed: dict[int, float]
    tokens_per_param: float

    @property
    def loss(self) -> float:
        return float(np.mean(list(self.by_seed.values())))


def _level(arm: Arm, x: float, label: str) -> Level:
    return Level(x, label, arm.by_seed, arm.tokens_per_param)


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
    fit: ScalingFit | None
    levels: list[LevelSaving] = field(default_factory=list)
    headline: float | None = None
    interval: tuple[float, float] | None = None  # 95%, refitting on resampled seeds per level
    per_seed: dict[int, float | None] = field(default_factory=dict)
    per_seed_extrapolated: dict[int, bool] = field(default_factory=dict)
    note: str = ""

    @property
    def extrapolated(self) -> list[LevelSaving]:
        return [lv for lv in self.levels if not lv.interpolated]


def _fit(levels: list[Level], seeds: dict[str, list[int]] | None = None) -> ScalingFit | None:
    """Fit a variant's levels (on the seed means, or on the given seeds per level label)."""
    if seeds is None:
        return fit_scaling([lv.x for lv in levels], [lv.loss for lv in levels])
    return fit_scaling([lv.x for lv in levels],
                       [float(np.mean([lv.by_seed[s] for s in seeds[lv.label]]))
                        for lv in levels])


def _read(base: ScalingFit, fit: ScalingFit, x: float) -> tuple[float, bool] | None:
    """The saving at vanilla's x, and whether it was read within the variant's range."""
    n = fit.size(float(base.loss(x)))
    if n is None:
        return None
    return 1.0 - n / x, fit.n_min <= n <= fit.n_max


def equivalent_saving(name: str, axis: str, base_levels: list[Level],
                      levels: list[Level]) -> Saving:
    """The paper's saving of `levels` (one variant) against `base_levels` (vanilla)."""
    s = Saving(name, axis, _fit(levels))
    base = _fit(base_levels)
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
        s.note = "never reaches vanilla's loss"
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
        fit, ref = _fit(mine, chosen), _fit(theirs, chosen)
        if fit is None or ref is None:
            return math.nan
        reads = [_read(ref, fit, lv.x) for lv in theirs if lv.label in inside]
        return math.nan if any(r is None for r in reads) else float(
            np.mean([r[0] for r in reads]))

    labels = list(common)
    if len(labels) == len(base_levels):
        s.interval = bootstrap_interval(
            [list(range(len(common[lab]))) for lab in labels],
            lambda *idx: headline({lab: [common[lab][i] for i in ix]
                                   for lab, ix in zip(labels, idx, strict=True)}))
        for seed in seeds if len(seeds) > 1 else []:
            alone = {lab: [seed] for lab in labels}
            value = headline(alone)
            s.per_seed[seed] = None if math.isnan(value) else value
            mine, theirs = _fit(levels, alone), _fit(base_levels, alone)
            s.per_seed_extrapolated[seed] = mine is None or theirs is None or any(
                r is None or not r[1] for lv in base_levels if lv.label in inside
                for r in [_read(theirs, mine, lv.x)])
    return s


def parameter_savings(arms: list[Arm]) -> tuple[ScalingFit | None, list[Saving]]:
    """Vanilla's loss-against-parameters fit and every other variant's parameter saving."""
    levels = parameter_levels(arms)
    base = levels.get("vanilla", [])
    return _fit(base) if len(base) >= 2 else None, [
        equivalent_saving(name, "parameters", base, lv) for name, lv in levels.items()
        if name != "vanilla"]


def token_savings(arms: list[Arm]) -> dict[str, list[Saving]]:
    """Per model shape with a tokens axis, every variant's data saving from the final losses
    of separately scheduled runs (loss against tokens per variant)."""
    out = {}
    for shape, by_name in token_levels(arms).items():
        base = by_name.get("vanilla", [])
        out[shape] = [equivalent_saving(name, "tokens", base, lv)
                      for name, lv in by_name.items() if name != "vanilla"]
    return out


# -- the data saving ---------------------------------------------------------------------------


def tokens_to_reach(t: FrozenTrial, target: float) -> float | None:
    """Training tokens after which the trial's validation curve first reaches `target`,
    interpolated linearly between validations; None if it never does."""
    curve = t.user_attrs.get("curve") or []
    train = t.user_attrs["config"]["train"]
    per_step = train["batch_size"] * t.user_attrs["config"]["model"]["seq_len"]
    prev_step, prev_loss = 0.0, math.inf
    for step, loss in curve:
        if loss <= target:
            if math.isinf(prev_loss):
                return float(step) * per_step
            share = (prev_loss - target) / (prev_loss - loss)
            return (prev_step + share * (step - prev_step)) * per_step
        if loss < prev_loss:  # the running minimum: a noisy bump does not undo progress
            prev_step, prev_loss = float(step), loss
    return None


def data_saving(trial: FrozenTrial, vanilla: FrozenTrial) -> float | None:
    """1 - T_variant(L_vanilla) / T when the variant ends at least as low as vanilla, else
    T_vanilla(L_variant) / T - 1 (T: the run's tokens); None if a curve is missing."""
    tokens = float(vanilla.user_attrs["tokens"])
    mine, theirs = float(trial.user_attrs["val_loss"]), float(vanilla.user_attrs["val_loss"])
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
    vanilla = {(a.shape, a.tokens): a for a in arms if a.variant == "vanilla"}
    values: dict[str, list[tuple[str, int, float]]] = {}
    for arm in arms:
        base = vanilla.get((arm.shape, arm.tokens))
        if arm.variant == "vanilla" or base is None:
            continue
        theirs = {seed_of(t): t for t in base.trials}
        for t in arm.trials:
            if seed_of(t) in theirs and (s := data_saving(t, theirs[seed_of(t)])) is not None:
                values.setdefault(arm.variant, []).append((arm.shape, seed_of(t), s))
    out = []
    for name in sorted({a.variant for a in arms} - {"vanilla"}):
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


def layer_runs(trials: Iterable[FrozenTrial], read: str, modes: Iterable[str] | None = None
               ) -> dict[str, dict[str, list[list[float]]]]:
    """Per model shape (its label; smallest first) and variant, one per-layer list per trial:
    `read` is an analysis key (`attention_entropy`, `value_cosine`, `mixed_value_cosine`) or
    a coefficient name (`lambda1`, `lambda2`; NaN where a layer does not receive); `modes`
    keeps only trials of those modes."""
    groups: dict[tuple[tuple[int, int, str], str], list[list[float]]] = {}
    for t in trials:
        a = t.user_attrs
        if modes is not None and a.get("mode") not in modes:
            continue
        model = a.get("config", {}).get("model", {})
        n_layer = int(model.get("n_layer", 0))
        if read in ("lambda1", "lambda2"):
            coefs = a.get("coefficients") or {}
            row = [float(coefs.get(f"L{i}.{read}", math.nan)) for i in range(n_layer)]
            if all(math.isnan(v) for v in row):
                continue
        elif read in (a.get("analysis") or {}):
            row = [float(v) for v in a["analysis"][read]]
        else:
            continue
        size = (n_layer, int(model.get("d_model", 0)), shape_label(t))
        groups.setdefault((size, variant(a)), []).append(row)
    out: dict[str, dict[str, list[list[float]]]] = {}
    for ((*_, shape), name), rows in sorted(groups.items()):
        out.setdefault(shape, {})[name] = rows
    return out


def layer_profile(trials: Iterable[FrozenTrial], read: str,
                  modes: Iterable[str] | None = None) -> dict[str, dict[str, list[float]]]:
    """`layer_runs` averaged over trials (seeds)."""
    return {shape: {name: [float(np.mean(col)) for col in zip(*rows, strict=True)]
                    for name, rows in by_name.items()}
            for shape, by_name in layer_runs(trials, read, modes).items()}
