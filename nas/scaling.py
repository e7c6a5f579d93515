"""What a study says about scaling: loss against parameters per variant, and the paper's two
savings against `vanilla`, with their spread across seeds.

- Points: per variant and model shape, the loss of the best plan, where a plan's loss is the
  mean over the seeds it was trained with (a search study has one seed per plan; a scaling
  study such as studies/resformer_scaling.yaml has several).
- Equivalent parameter saving: fit loss against parameters per variant (`fit_scaling`) and read
  off 1 - N_variant(L) / N_vanilla(L) at vanilla's fitted losses L (the paper's metric).
  Computed on the seed means, and again on each seed alone for the spread.
- Data saving: on one model shape and seed, the share of vanilla's training tokens the variant
  needs to reach vanilla's final validation loss, read off its validation curve (1 - T_v / T);
  when the variant ends worse, the tokens vanilla needs to reach the variant's final loss
  (T_vanilla / T - 1, negative). Both curves come from the same runs with their full cosine
  schedule, as the paper compares loss-against-tokens curves.

Reads FrozenTrials' user attributes only: numpy and optuna, no torch, no plotly.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from optuna.trial import FrozenTrial


def variant(attrs: dict[str, Any]) -> str:
    """The trial's named variant, else its mode plus `+ve` for a value-embedding source."""
    if attrs.get("variant"):
        return str(attrs["variant"])
    mode = attrs.get("mode", "?")
    return f"{mode}+ve" if attrs.get("source") == "value_embedding" else mode


def seed_of(t: FrozenTrial) -> int:
    return int(t.user_attrs.get("config", {}).get("train", {}).get("seed", 0))


def _shape(t: FrozenTrial) -> str:
    return json.dumps(t.user_attrs.get("config", {}).get("model", {}), sort_keys=True)


def _plan(t: FrozenTrial) -> str:
    """The trial's whole run config but its seed: trials that differ only by seed."""
    cfg = json.loads(json.dumps(t.user_attrs.get("config", {})))
    cfg.get("train", {}).pop("seed", None)
    cfg.get("data", {}).pop("source", None)  # the same data at another path
    return json.dumps(cfg, sort_keys=True)


def shape_label(t: FrozenTrial) -> str:
    """`8L d128`: the model's depth and width."""
    model = t.user_attrs.get("config", {}).get("model", {})
    return f"{model.get('n_layer', '?')}L d{model.get('d_model', '?')}"


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
            a, b, alpha = power
            return ScalingFit("power", a, b, alpha, n_ref, float(n.min()), float(n.max()))
    slope, intercept = np.polyfit(np.log(x), y, 1)
    if slope >= 0:
        return None
    return ScalingFit("log", float(intercept), float(slope), 0.0, n_ref, float(n.min()),
                      float(n.max()))


def _fit_power(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float] | None:
    """Least squares over alpha (grid, then a finer grid); a and b are linear given alpha."""
    def solve(alpha: float) -> tuple[float, float, float]:
        basis = np.stack([np.ones_like(x), x ** -alpha], axis=1)
        (a, b), *_ = np.linalg.lstsq(basis, y, rcond=None)
        return float(((basis @ np.array([a, b]) - y) ** 2).sum()), float(a), float(b)

    best: tuple[float, float, float, float] | None = None
    grid = np.linspace(0.02, 2.0, 199)
    for _ in range(2):
        for alpha in grid:
            sse, a, b = solve(float(alpha))
            if b > 0 and (best is None or sse < best[0]):
                best = (sse, a, b, float(alpha))
        if best is None:
            return None
        grid = np.linspace(max(0.005, best[3] - 0.01), best[3] + 0.01, 81)
    return best[1], best[2], best[3]


# -- points ------------------------------------------------------------------------------------


@dataclass
class Point:
    """One variant at one model shape: the best plan's loss, averaged over its seeds."""

    n_params: float
    loss: float
    trials: list[FrozenTrial]

    @property
    def losses(self) -> list[float]:
        return [float(t.user_attrs["val_loss"]) for t in self.trials]

    @property
    def spread(self) -> tuple[float, float]:
        return min(self.losses), max(self.losses)


def scaling_points(trials: Iterable[FrozenTrial]) -> dict[str, list[Point]]:
    """Per variant, one Point per model shape, sorted by parameter count."""
    plans: dict[tuple[str, str, str], list[FrozenTrial]] = {}
    for t in trials:
        plans.setdefault((variant(t.user_attrs), _shape(t), _plan(t)), []).append(t)
    best: dict[tuple[str, str], Point] = {}
    for (name, shape, _), ts in plans.items():
        p = Point(float(ts[0].user_attrs["n_params"]),
                  float(np.mean([t.user_attrs["val_loss"] for t in ts])), ts)
        if (name, shape) not in best or p.loss < best[(name, shape)].loss:
            best[(name, shape)] = p
    out: dict[str, list[Point]] = {}
    for (name, _), p in best.items():
        out.setdefault(name, []).append(p)
    return {k: sorted(v, key=lambda p: p.n_params) for k, v in sorted(out.items())}


def seeds(trials: Iterable[FrozenTrial]) -> list[int]:
    return sorted({seed_of(t) for t in trials})


# -- the equivalent parameter saving -----------------------------------------------------------


@dataclass
class Saving:
    """The equivalent parameter saving of one variant against vanilla."""

    variant: str
    sizes: int
    fit: ScalingFit | None
    saving: float | None = None  # mean over vanilla's sizes; 0.2 = 20% fewer parameters
    per_size: list[tuple[float, float]] = field(default_factory=list)  # (N_vanilla, saving)
    extrapolated: bool = False
    note: str = ""
    per_seed: dict[int, float | None] = field(default_factory=dict)  # the same, seed by seed

    @property
    def seed_values(self) -> list[float]:
        return [v for v in self.per_seed.values() if v is not None]


def _savings(points: dict[str, list[Point]]) -> tuple[ScalingFit | None, list[Saving]]:
    base_points = points.get("vanilla", [])
    base = fit_scaling([p.n_params for p in base_points], [p.loss for p in base_points])
    out = []
    for name, pts in points.items():
        if name == "vanilla":
            continue
        fit = fit_scaling([p.n_params for p in pts], [p.loss for p in pts])
        s = Saving(name, len(pts), fit)
        if len(pts) < 2:
            s.note = "too few sizes to fit (needs 2 model sizes)"
        elif fit is None:
            s.note = "loss does not fall with size; no fit"
        elif base is None:
            s.note = ("vanilla has too few sizes to fit" if len(base_points) < 2
                      else "vanilla's loss does not fall with size; no fit")
        else:
            # Compare where the variant was measured; extrapolate only if the ranges are apart.
            near = [p.n_params for p in base_points
                    if fit.n_min / 1.5 <= p.n_params <= fit.n_max * 1.5]
            s.extrapolated = not near
            for n_v in near or [p.n_params for p in base_points]:
                n_m = fit.size(float(base.loss(n_v)))
                if n_m is not None:
                    s.per_size.append((n_v, 1.0 - n_m / n_v))
                    s.extrapolated |= not fit.n_min / 1.5 <= n_m <= fit.n_max * 1.5
            if s.per_size:
                s.saving = float(np.mean([v for _, v in s.per_size]))
                s.note = "extrapolated beyond its sizes" if s.extrapolated else ""
            else:
                s.note = "never reaches vanilla's loss"
        out.append(s)
    return base, out


def parameter_savings(trials: list[FrozenTrial]) -> tuple[ScalingFit | None, list[Saving]]:
    """Vanilla's fit and, per other variant, 1 - N_variant(L) / N_vanilla(L) at vanilla's
    fitted losses L, averaged over vanilla's model sizes within the variant's measured range
    (all of them, flagged as extrapolated, if none is). With several seeds, the fits use the
    seed means and `per_seed` repeats the whole computation on each seed's trials alone."""
    base, out = _savings(scaling_points(trials))
    all_seeds = seeds(trials)
    if len(all_seeds) > 1:
        for seed in all_seeds:
            _, alone = _savings(scaling_points(t for t in trials if seed_of(t) == seed))
            by_name = {s.variant: s.saving for s in alone}
            for s in out:
                s.per_seed[seed] = by_name.get(s.variant)
    return base, out


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


def _best_per_seed(trials: Iterable[FrozenTrial]) -> dict[tuple[str, str, int], FrozenTrial]:
    """The lowest-loss trial per (variant, model shape, seed)."""
    best: dict[tuple[str, str, int], FrozenTrial] = {}
    for t in trials:
        key = (variant(t.user_attrs), _shape(t), seed_of(t))
        if key not in best or t.user_attrs["val_loss"] < best[key].user_attrs["val_loss"]:
            best[key] = t
    return best


def loss_differences(trials: list[FrozenTrial]) -> dict[str, dict[str, list[float]]]:
    """Per variant and model shape (its label), val_loss minus vanilla's on the same seed, one
    value per seed that both ran: paired, so the seeds' shared noise cancels."""
    best = _best_per_seed(trials)
    out: dict[str, dict[str, list[float]]] = {}
    for (name, shape, seed), t in sorted(best.items(), key=lambda kv: kv[1].user_attrs[
            "n_params"]):
        base = best.get(("vanilla", shape, seed))
        if name == "vanilla" or base is None:
            continue
        out.setdefault(name, {}).setdefault(shape_label(t), []).append(
            float(t.user_attrs["val_loss"]) - float(base.user_attrs["val_loss"]))
    return dict(sorted(out.items()))


@dataclass
class DataSaving:
    variant: str
    saving: float | None  # mean over model shapes and seeds
    per_seed: dict[int, float] = field(default_factory=dict)  # mean over shapes, per seed
    per_size: dict[str, float] = field(default_factory=dict)  # shape label -> mean over seeds
    pairs: int = 0


def data_savings(trials: list[FrozenTrial]) -> list[DataSaving]:
    """Per variant, the data saving against vanilla on each (model shape, seed) that both
    were trained on with the same token budget (the best trial of each, if several)."""
    best = _best_per_seed(trials)
    out = []
    for name in sorted({k[0] for k in best} - {"vanilla"}):
        values: list[tuple[str, int, float]] = []  # (shape label, seed, saving)
        for (other, shape, seed), t in best.items():
            base = best.get(("vanilla", shape, seed))
            if other != name or base is None or t.user_attrs["tokens"] != base.user_attrs[
                    "tokens"]:
                continue
            s = data_saving(t, base)
            if s is not None:
                values.append((shape_label(t), seed, s))
        d = DataSaving(name, float(np.mean([v for *_, v in values])) if values else None,
                       pairs=len(values))
        for seed in sorted({s for _, s, _ in values}):
            d.per_seed[seed] = float(np.mean([v for _, s, v in values if s == seed]))
        for label in dict.fromkeys(n for n, _, _ in values):  # in the order met
            d.per_size[label] = float(np.mean([v for m, _, v in values if m == label]))
        out.append(d)
    return out


# -- per-layer profiles ------------------------------------------------------------------------


LEARNED = ("learnable", "learnable_plus", "dense")  # modes whose coefficients train


def layer_profile(trials: list[FrozenTrial], read: str,
                  modes: Iterable[str] | None = None) -> dict[str, dict[str, list[float]]]:
    """Per model shape (its label; smallest first) and variant, a per-layer list averaged over
    trials (seeds):
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
    out: dict[str, dict[str, list[float]]] = {}
    for ((*_, shape), name), rows in sorted(groups.items()):
        out.setdefault(shape, {})[name] = [float(np.mean(col)) for col in zip(*rows,
                                                                             strict=True)]
    return out


# -- the summary (markdown, for the terminal and docs/RESULTS.md) ------------------------------


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:+.1%}"


def with_seeds(mean: float | None, per_seed: dict[int, Any]) -> str:
    """`+5.1%`, or with several seeds `+5.1% (sd 2.0%; seed 0: +3.7%, seed 1: +6.5%)`."""
    values = [v for v in per_seed.values() if v is not None]
    if len(values) < 2:
        return _pct(mean)
    return (f"{_pct(mean)} (sd {np.std(values, ddof=1):.1%}; "
            + ", ".join(f"seed {k}: {_pct(v)}" for k, v in per_seed.items()) + ")")


def markdown_table(head: list[str], rows: list[list[Any]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
            *("| " + " | ".join(map(str, r)) + " |" for r in rows)]


def savings_rows(trials: list[FrozenTrial]) -> list[dict[str, Any]]:
    """Rows of the savings table: both savings with their spread across seeds."""
    base, savings = parameter_savings(trials)
    data = {d.variant: d for d in data_savings(trials)}
    n_base = len(scaling_points(trials).get("vanilla", []))
    note = "" if base else ("too few sizes to fit (needs 2 model sizes)" if n_base < 2
                            else "loss does not fall with size; no fit")
    rows = [{"variant": "vanilla", "sizes": n_base, "fit": base.describe() if base else "-",
             "parameter saving": "reference", "data saving": "reference", "note": note}]
    for s in savings:
        d = data.get(s.variant)
        rows.append({"variant": s.variant, "sizes": s.sizes,
                     "fit": s.fit.describe() if s.fit else "-",
                     "parameter saving": with_seeds(s.saving, s.per_seed),
                     "data saving": with_seeds(d.saving, d.per_seed) if d else "-",
                     "note": s.note})
    return rows


def summary_markdown(trials: list[FrozenTrial]) -> str:
    """Loss per variant and size with the seed spread, both savings with their spread, and
    the learned lambda1 per layer, as markdown tables."""
    points = scaling_points(trials)
    n_seeds = len(seeds(trials))
    shapes: dict[str, float] = {}  # label -> vanilla's parameters, else the fewest
    for name, pts in points.items():
        for p in pts:
            label = shape_label(p.trials[0])
            if name == "vanilla" or label not in shapes:
                shapes[label] = p.n_params
            elif "vanilla" not in points:
                shapes[label] = min(shapes[label], p.n_params)
    order = sorted(shapes, key=shapes.get)
    lines = ["Validation loss per variant and model shape ("
             + (f"the best plan's mean over {n_seeds} seeds; min-max across seeds"
                if n_seeds > 1 else "the best plan at each shape") + "):", ""]
    rows = []
    for name, pts in points.items():
        by_shape = {shape_label(p.trials[0]): p for p in pts}
        row = [name]
        for label in order:
            p = by_shape.get(label)
            if p is None:
                row.append("-")
            elif len(p.trials) > 1:
                lo, hi = p.spread
                row.append(f"{p.loss:.4f} ({lo:.4f}-{hi:.4f})")
            else:
                row.append(f"{p.loss:.4f}")
        rows.append(row)
    lines += markdown_table(["variant", *(f"{label} ({shapes[label]:,.0f})" for label in order)],
                       rows)
    diffs = loss_differences(trials)
    if diffs:
        lines += ["", "Validation loss minus vanilla's on the same seed (negative: better than "
                  "vanilla; mean" + (", and min..max over seeds" if n_seeds > 1 else "") + "):",
                  ""]
        rows = []
        for name, by_shape in diffs.items():
            row = [name]
            for label in order:
                v = by_shape.get(label)
                row.append("-" if not v else f"{np.mean(v):+.4f}" + (
                    f" ({min(v):+.4f}..{max(v):+.4f})" if len(v) > 1 else ""))
            rows.append(row)
        lines += markdown_table(["variant", *order], rows)
    data = {d.variant: d for d in data_savings(trials)}
    lines += ["", "Savings against vanilla (parameter: fitted loss-vs-parameters curves; data: "
              "loss-vs-tokens curves on each size and seed):", ""]
    rows = savings_rows(trials)
    lines += markdown_table(list(rows[0]), [list(r.values()) for r in rows])
    if any(d.per_size for d in data.values()):
        lines += ["", "Data saving per model shape (mean over seeds):", ""]
        rows = [[name, *(_pct(d.per_size.get(label)) for label in order)]
                for name, d in data.items()]
        lines += markdown_table(["variant", *order], rows)
    for name, what in (("lambda1", "the weight on V_1"), ("lambda2", "the weight on V_n")):
        learned = layer_profile(trials, name, modes=LEARNED)
        if not learned:
            continue
        lines += ["", f"Learned {name} per layer at the end of training ({what}; mean over "
                  "seeds; layer 0 is the source):", ""]
        rows = [[shape, variant_name, " ".join("-" if math.isnan(v) else f"{v:.2f}"
                                               for v in vals)]
                for shape, by_name in learned.items() for variant_name, vals in by_name.items()]
        lines += markdown_table(["size", "variant", f"{name} by layer (0, 1, ...)"], rows)
    return "\n".join(lines)
