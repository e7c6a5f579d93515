"""The numbers a study supports, as tables: what `nas report` prints, the report page shows and
the dashboard note carries (one set of rows, rendered as Markdown or HTML).

Each `Section` is a title, rows (dicts with the same keys) and notes that qualify them: the
training budget and its warning, the learning rate chosen per arm, the reported loss per
variant and size, paired differences from vanilla with 95% intervals and exact p-values, the
measurement noise, and both savings with intervals. Knows nothing of torch or plotly. One
piece (about 450 lines): the sections share the row helpers and the Holm family of one table.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from nas.modes import BASELINE_MODE, LEARNED
from nas.reading.arms import (
    COIN_FLIP_Z,
    Arm,
    Difference,
    best_arms,
    paired_differences,
    paired_window_se,
    pooled_p,
    profiled_trials,
    reports_test,
)
from nas.reading.confirmation import Confirmation, mean_values
from nas.reading.scaling import (
    Saving,
    curve_data_savings,
    layer_runs,
    parameter_savings,
    token_savings,
)
from nas.reading.stats import FEW_PAIRS, LEVEL, Interval, holm, mean_interval, sign_flip_p
from nas.search.trials import TrialRecord

COMPUTE_OPTIMAL = 20  # tokens per parameter (the compute-optimal rule of thumb)


@dataclass
class Section:
    key: str
    title: str
    rows: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)


def markdown_table(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    head = list(rows[0])
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
            *("| " + " | ".join(str(r.get(k, "")) for k in head) + " |" for r in rows)]


def html_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "<p>none</p>"
    head = "".join(f"<th>{html.escape(str(k))}</th>" for k in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in r.values())
                   + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _pct(v: float | None) -> str:
    return "-" if v is None or math.isnan(v) else f"{v:+.1%}"


def _level(arm: Arm, several_budgets: bool) -> str:
    return f"{arm.shape}, {arm.budget}" if several_budgets else arm.shape


def budget_notes(arms: list[Arm]) -> list[str]:
    """The training budget of the study's points, and a warning below COMPUTE_OPTIMAL."""
    if not arms:
        return []
    ratios = [a.tokens_per_model_param for a in arms]
    lo, hi = min(ratios), max(ratios)
    notes = [f"Training budget: {lo:.3g}-{hi:.3g} tokens per non-embedding parameter."]
    if lo < COMPUTE_OPTIMAL:
        notes.append(f"Warning: points below {COMPUTE_OPTIMAL} tokens per parameter (the "
                     "compute-optimal rule of thumb) are undertrained; savings measured there "
                     "are not parameter savings at convergence.")
    return notes


def time_notes(trials: list[TrialRecord]) -> list[str]:
    """What share of the trials' wall time their training steps took (the stored
    `train_seconds` against the storage's start and end): the rest is set-up, evaluation and
    the study's own work."""
    shares = [r.train_seconds / r.wall_seconds for r in trials
              if r.train_seconds is not None and r.wall_seconds]
    if not shares:
        return []
    return [f"Training steps took a median {np.median(shares):.1%} of a trial's wall time "
            f"({min(shares):.1%}-{max(shares):.1%} over {len(shares)} trials; the rest is "
            "set-up, evaluation and the study's own work)."]


def _seeds(seeds: list[int]) -> str:
    return ",".join(map(str, seeds))


def lr_rows(arms: list[Arm]) -> list[dict[str, Any]]:
    """Per arm that ran a learning-rate grid: the mean validation loss per rate, the choice
    (per half under crossfit, with what each half reports), and its margin against its noise."""
    rows = []
    for a in arms:
        if len(a.grid) < 2:
            continue
        if a.halves:
            reported = {r.seed: r for r in a.trials}
            chosen = "; ".join(
                f"seeds {_seeds(mine)} chose {lr:g}, so seeds {_seeds(other)} report "
                f"{np.mean([reported[s].reported_loss for s in other]):.4f}"
                for (mine, lr), (other, _) in zip(a.halves, a.halves[::-1], strict=True))
            chosen += " (halves agree)" if len(set(a.chosen_rates)) == 1 else (
                " (halves disagree)")
        else:
            chosen = f"{a.lr:g}"
        margin = a.margin
        notes = []
        if a.missing:
            notes.append(f"sweep incomplete: {len(a.grid)} of {len(a.grid) + len(a.missing)} "
                         "rates")
        elif a.at_edge:
            notes.append("at the edge of the grid: widen it (lr_sweep.extend)")
        if a.coin_flip:
            notes.append("coin flip: the margin is within its noise")
        choosing = min((len(seeds) for seeds, _ in a.halves), default=len(a.choice_seeds))
        if choosing < FEW_PAIRS:
            notes.append(f"warning: chosen on {choosing} seed(s)")
        rows.append({
            "variant": a.variant, "size": a.shape,
            "tok/param": f"{a.tokens_per_model_param:.3g}",
            f"val_loss by lr (mean over seeds {_seeds(a.choice_seeds)})": "  ".join(
                f"{lr:g}: {a.val_by_lr[lr]:.4f}" for lr in a.grid if lr in a.val_by_lr),
            "chosen lr": chosen,
            "margin to next rate [se]": ("-" if margin is None else
                                         f"{margin[0]:.4f} [{margin[1]:.4f}]"),
            "note": "; ".join(notes)})
    return rows


def _paired(iv: Interval, *also: str) -> str:
    """A paired difference's interval with its number of pairs (and `also`), warned under
    FEW_PAIRS pairs."""
    if iv.n < 2:
        return iv.format() + " warning: one pair"
    text = iv.format() + f" ({'; '.join([f'n={iv.n}', *also])})"
    return text + (f" warning: {iv.n} pairs" if iv.n < FEW_PAIRS else "")


def same_rate_rows(arms: list[Arm], split: str) -> list[dict[str, Any]]:
    """Each variant minus vanilla at every rate both ran, per size: the mean over the seeds
    both ran with its interval (which part of a gain is a different best rate)."""
    vanilla = {(a.shape, a.budget): a for a in arms if a.variant == BASELINE_MODE}
    rows = []
    for a in sorted(arms, key=lambda a: (a.n_params, a.tokens, a.variant)):
        base = vanilla.get((a.shape, a.budget))
        if a.variant == BASELINE_MODE or base is None or len(a.grid) < 2:
            continue
        row: dict[str, Any] = {"variant": a.variant, "size": a.shape}
        for lr in sorted(set(a.runs) & set(base.runs)):
            mine, theirs = a.runs[lr], base.runs[lr]
            seeds = sorted(set(mine) & set(theirs))
            iv = mean_interval([getattr(mine[s], f"{split}_loss") - getattr(theirs[s],
                                                                             f"{split}_loss")
                                for s in seeds])
            row[f"lr {lr:g}"] = _paired(iv)
        rows.append(row)
    return rows


def loss_rows(arms: list[Arm], several_budgets: bool) -> list[dict[str, Any]]:
    by_level: dict[str, dict[str, Arm]] = {}
    for a in sorted(arms, key=lambda a: (a.n_params, a.tokens)):
        by_level.setdefault(_level(a, several_budgets), {})[a.variant] = a
    names = sorted({a.variant for a in arms}, key=lambda n: (n != BASELINE_MODE, n))
    rows = []
    for name in names:
        row: dict[str, Any] = {"variant": name}
        for label, at in by_level.items():
            a = at.get(name)
            if a is None:
                row[label] = "-"
            elif len(a.trials) > 1:
                lo, hi = a.spread
                row[label] = f"{a.loss:.4f} ({lo:.4f}-{hi:.4f}, {len(a.trials)} seeds)"
            else:
                row[label] = f"{a.loss:.4f}"
        rows.append(row)
    return rows


def difference_tests(arms: list[Arm], several_budgets: bool
                     ) -> dict[tuple[str, str] | str, float]:
    """The unadjusted p-values of the differences table, its one Holm family: each cell's exact
    sign-flip test ((variant, level) -> p), and each variant's pooled test where it pools
    several cells (variant -> p; over one cell it is that cell's test again)."""
    by_variant = paired_differences(arms)
    return {**{(name, _level(d.arm, several_budgets)): sign_flip_p(list(d.by_seed.values()))
               for name, diffs in by_variant.items() for d in diffs},
            **{name: pooled_p(diffs) for name, diffs in by_variant.items() if len(diffs) > 1}}


def difference_rows(arms: list[Arm], several_budgets: bool
                    ) -> tuple[list[dict[str, Any]], list[float]]:
    """Rows of paired differences (one column per size, or size and budget, each with its
    exact p-value), a pooled p-value per variant, every p-value Holm-adjusted across the
    table (`difference_tests`); and the means of those whose interval excludes zero."""
    by_variant = paired_differences(arms)
    levels = sorted({(d.arm.n_params, d.arm.tokens, _level(d.arm, several_budgets))
                     for diffs in by_variant.values() for d in diffs})
    cells = {(name, _level(d.arm, several_budgets)): d for name, diffs in by_variant.items()
             for d in diffs}
    pooled = {name: pooled_p(diffs) for name, diffs in by_variant.items()}
    tests = difference_tests(arms, several_budgets)
    adjusted = dict(zip(tests, holm(list(tests.values())), strict=True))
    for name, diffs in by_variant.items():
        if len(diffs) == 1:
            adjusted[name] = adjusted[name, _level(diffs[0].arm, several_budgets)]
    rows, significant = [], []
    for name, diffs in by_variant.items():
        row: dict[str, Any] = {"variant": name}
        for *_, label in levels:
            d = cells.get((name, label))
            if d is None:
                row[label] = "-"
                continue
            iv = d.interval
            row[label] = _paired(iv, f"Holm p {adjusted[name, label]:.2g}")
            if iv.n > 1 and iv.excludes_zero():
                significant.append(abs(iv.mean))
        values = [v for d in diffs for v in d.by_seed.values()]
        row["all pairs: exact p (Holm)"] = f"{pooled[name]:.3g} ({adjusted[name]:.3g})" + (
            f" warning: {len(values)} pair(s)" if len(values) < FEW_PAIRS else "")
        row["pairs below vanilla"] = f"{sum(v < 0 for v in values)}/{len(values)}"
        rows.append(row)
    return rows, significant


def noise_notes(arms: list[Arm], significant: list[float], split: str) -> list[str]:
    """The per-trial standard error against the smallest significant difference, and the
    paired standard error over the same windows, which is what a paired difference carries."""
    ses = [se for a in arms for t in a.trials
           if (se := getattr(t, f"{split}_loss_se")) is not None]
    if not ses:
        return [f"Noise: trials store no standard error of their {split} loss (older runs)."]
    worst = max(ses)
    notes = [f"Noise: the largest standard error of one trial's {split} loss over its "
             f"evaluation batches is {worst:.4f} (median {float(np.median(ses)):.4f})."]
    if significant:
        small = min(significant)
        ok = worst <= small / 5
        notes.append(
            f"The smallest difference whose {LEVEL:.0%} interval excludes zero is {small:.4f}; "
            + ("the per-trial error is within a fifth of it." if ok else
               f"the per-trial error is more than a fifth of it ({worst / small:.2f}x): "
               "single losses are too noisy to separate such differences; raise "
               "train.eval_batches. Paired differences are scored on the same windows, so "
               "their own error is smaller (next line)."))
    paired = []
    for diffs in paired_differences(arms).values():
        for d in diffs:
            mine = {t.seed: t for t in d.arm.trials}
            for t in d.vanilla.trials:
                if t.seed in mine and (se := paired_window_se(mine[t.seed], t, split)) is not None:
                    paired.append(se)
    if paired:
        notes.append(f"Paired over the same {split} windows, the standard error of one "
                     f"difference is {float(np.median(paired)):.4f} (median; max "
                     f"{max(paired):.4f}); the seed-to-seed spread in the intervals above "
                     "includes it.")
    return notes


def saving_rows(savings: list[Saving]) -> list[dict[str, Any]]:
    rows = []
    for s in savings:
        inside = [lv for lv in s.levels if lv.interpolated]
        headline = _pct(s.headline)
        if s.headline is not None and s.interval is not None:
            lo, hi = s.interval
            headline += " [" + (f"{_pct(lo)}, {_pct(hi)}" if not math.isnan(lo) else "n/a") + "]"
        seeds = ", ".join(
            f"seed {k}: {_pct(v)}" + (" (extrapolated)" if s.per_seed_extrapolated.get(k)
                                      else "") for k, v in s.per_seed.items())
        if len(s.per_seed) < FEW_PAIRS:
            headline += f" warning: {len(s.per_seed)} seed(s)"
        far = [str(k) for k, v in s.per_seed.items()
               if v is not None and s.per_seed_extrapolated.get(k)]
        if s.interval is not None and far:
            # the headline reads inside the measured sizes; a seed whose own curve does not
            # reach there is extrapolated, and its reading widens (or tilts) the interval
            headline += (f" warning: the interval includes seed {', '.join(far)}'s "
                         "extrapolated reading")
        fit = s.fit
        rows.append({
            "variant": s.variant,
            f"saving ({LEVEL:.0%} t-interval over per-seed savings), interpolated": headline,
            "per level (interpolated)": ", ".join(f"{lv.label}: {_pct(lv.saving)}"
                                                  for lv in inside) or "-",
            "extrapolated (not in the headline)": ", ".join(
                f"{lv.label}: {_pct(lv.saving)}" for lv in s.extrapolated) or "-",
            "each seed alone": seeds or "-",
            "fit": fit.describe() if fit else "-",
            "points / free parameters": (f"{len(fit.residuals)} / {fit.n_free}" if fit else "-"),
            "residuals": (" ".join(f"{r:+.4f}" for r in fit.residuals) if fit else "-"),
            "note": s.note})
    return rows


def profile_rows(trials: Iterable[TrialRecord], read: str,
                 modes: Iterable[str] | None = None) -> list[dict[str, Any]]:
    rows = []
    for shape, by_name in layer_runs(trials, read, modes).items():
        for name, runs in by_name.items():
            cols = [np.asarray(col) for col in zip(*runs, strict=True)]
            rows.append({"size": shape, "variant": name, "seeds": len(runs),
                         f"{read} by layer (mean ± sd over seeds)": "  ".join(
                             "-" if np.isnan(c).all() else
                             # one seed has no spread to show
                             f"{c.mean():.2f}" if len(c) == 1 else
                             f"{c.mean():.2f}±{c.std(ddof=1):.2f}"
                             for c in cols)})
    return rows


def _paired_cells(d: Difference | None, p: float, p_holm: float, minus: str,
                  other: str) -> dict[str, str]:
    """A confirmation row's paired difference: its interval over the fresh seeds (warned
    under FEW_PAIRS), its exact p and Holm's, and the pairs below `other`."""
    values = list(d.by_seed.values()) if d else []
    iv = d.interval if d else None
    return {f"{minus} [{LEVEL:.0%} t-interval over seeds]":
            "no pairs yet" if iv is None else iv.format() + f" (n={iv.n})"
            + (f" warning: {iv.n} pair(s)" if iv.n < FEW_PAIRS else ""),
            "exact p (Holm)": "-" if d is None else f"{p:.3g} ({p_holm:.3g})",
            f"pairs below {other}": f"{sum(v < 0 for v in values)}/{len(values)}"}


# The learned coefficients a mode stores per layer (`nas.model.residual`), and what each is.
COEFFICIENTS = (("lambda1", "the weight on V_1; layer 0 is the source"),
                ("lambda2", "the weight on V_n; layer 0 is the source"),
                ("v_lambda", "the weight on the layer's own values"),
                ("ve_lambda", "the weight on its value embedding"),
                ("gate_norm", "the norm of its gate's weights, which start at zero"))


def learned_sections(trials: Iterable[TrialRecord], at: str = "",
                     prefix: str = "") -> list[Section]:
    """One table per learned coefficient: its mean ± sd over seeds, per layer, per variant."""
    return [Section(prefix + name, f"Learned {name} per layer at the end of training "
                    f"({what}){at}", rows)
            for name, what in COEFFICIENTS if (rows := profile_rows(trials, name, LEARNED))]


def confirmation_sections(c: Confirmation) -> list[Section]:
    """A confirmation's tables (nas.reading.confirmation): the winner's curse and the front per
    plan, each plan against vanilla on the same fresh seeds, each searched plan against each
    named variant, and the coefficients the learned plans end at."""
    seeds = f"seeds {c.seeds[0]}..{c.seeds[-1]}"
    curse = []
    for p in c.plans:
        a, iv = p.arm, p.curse
        lo, hi = a.spread if a else (math.nan, math.nan)
        curse.append({
            "plan": p.label, "size": a.shape if a else "-", "lr": f"{a.lr:g}" if a else "-",
            "fresh seeds done": f"{len(a.trials) if a else 0}/{len(c.seeds)}",
            "study val_loss": "-" if p.search_val is None else
            f"{p.search_val:.4f} ({p.search_seeds} seed(s))",
            "fresh val_loss": f"{mean_values(a, 'val'):.4f}" if a else "-",
            f"fresh {c.split}_loss (min-max)": f"{a.loss:.4f} ({lo:.4f}-{hi:.4f})" if a else "-",
            f"winner's curse: fresh val - study val [{LEVEL:.0%} t]":
                iv.format() if iv else "-",
            f"fresh {c.split} - study val": f"{a.loss - p.search_val:+.4f}"
            if a and p.search_val is not None else "-",
            "front (study -> confirmed)": f"{'on' if p.on_front else 'off'} -> "
                                          + ("-" if a is None else 'on' if p.stays else 'off')})
    versus = [{"plan": p.label, "size": p.arm.shape if p.arm else "-",
               **_paired_cells(p.difference, p.p, p.p_holm, f"{c.split} loss minus vanilla's",
                               "vanilla")} for p in c.chosen]
    versus_named = [{"plan": r.plan.label, "size": r.plan.arm.shape if r.plan.arm else "-",
                     "named variant (fresh val_loss)": f"{r.named.label} "
                     f"({mean_values(r.named.arm, 'val'):.4f}){' best' if r.best else ''}",
                     **_paired_cells(r.difference, r.p, r.p_holm, f"{c.split} loss minus its",
                                     "it")} for r in c.rivalries]
    where = f"{c.name}: {c.choice}, fresh {seeds}"
    out = [Section("confirm_curse", f"Confirmation ({where}): the study's validation loss "
                   "against the fresh seeds' (mean at the chosen rate)", curse, [
                       "The winner's curse is the fresh seeds' mean validation loss minus the "
                       "study's, on the same split: how optimistic the search's choice was. "
                       f"The {c.split} loss, which no choice read, is what each plan is worth. "
                       "Front: on the study's (validation loss, n_params) front -> on the "
                       f"front of these plans by (fresh {c.split} loss, n_params)."])]
    if versus:
        out.append(Section("confirm_vs_vanilla", f"Confirmation ({where}): {c.split} loss "
                           "minus vanilla's at the same shape and budget, on the same fresh "
                           "seed (negative: better than vanilla; exact sign-flip p-values, "
                           "Holm-adjusted across every p-value of the confirmation)", versus))
    if versus_named:
        out.append(Section("confirm_vs_named", f"Confirmation ({where}): each searched plan's "
                           f"{c.split} loss minus each named variant's at its shape and budget, "
                           "on the same fresh seed (negative: the search beat the hand-made "
                           "plan; best: the named variant with the lowest fresh validation "
                           "loss; Holm across every p-value of the confirmation)", versus_named))
    confirmed = [t for p in c.plans if p.arm for t in p.arm.trials]
    return out + learned_sections(confirmed, f" ({where}; each plan at its chosen rate)",
                                  prefix="confirm_")


def several_budgets(arms: list[Arm]) -> bool:
    """Some shape trained on more than one budget: the tables' levels are (shape, budget)."""
    return any(len({a.tokens for a in arms if a.shape == s}) > 1 for s in {a.shape for a in arms})


def sections(trials: list[TrialRecord], protocol: str = "all_seeds",
             confirmations: Iterable[Confirmation] = ()) -> list[Section]:
    """Every table the study's completed trials support, in reading order, then those of its
    confirmations (`nas confirm`); `protocol` is the study's lr_sweep protocol (how arms
    choose their rate, nas.reading.arms)."""
    confirmed = [s for c in confirmations for s in confirmation_sections(c)]
    arms = best_arms(trials, protocol)
    if not arms:
        return confirmed
    chosen = [t for a in arms for t in a.trials]
    split = "test" if reports_test(chosen) else "val"
    several = several_budgets(arms)
    out = [Section("budget", "Training budget", [], budget_notes(arms) + time_notes(trials))]
    if rows := lr_rows(arms):
        how = ("Each half of the seeds chooses the rate (lowest mean validation loss) at which "
               "the other half is reported (lr_sweep crossfit)" if protocol == "crossfit" else
               "The rate with the lowest mean validation loss over the seeds run at every "
               "rate")
        out.append(Section("lr", "Learning rate per variant and size (chosen on validation "
                           "loss)", rows, [
                               f"{how}; the test split plays no part in the choice. A coin "
                               f"flip: the margin over the next-best rate is under "
                               f"{COIN_FLIP_Z} standard errors of the paired differences "
                               "between the two rates."]))
    if rows := same_rate_rows(arms, split):
        out.append(Section("same_rate", f"{split.capitalize()} loss minus vanilla's at the "
                           f"same rate (mean [{LEVEL:.0%} t-interval over seeds])", rows,
                           ["Every rate both ran, whether or not either chose it: a variant "
                            "that gains only at its own best rate gains by tolerating it."]))
    out.append(Section("loss", f"{split.capitalize()} loss per variant and size (mean over "
                       "seeds at the chosen rate; min-max)", loss_rows(arms, several),
                       [] if split == "test" else [
                           "No test split: these are validation losses, the same numbers "
                           "the choices were made on."]))
    diffs, significant = difference_rows(arms, several)
    if diffs:
        out.append(Section(
            "differences", f"{split.capitalize()} loss minus vanilla's on the same seed "
            f"(mean [{LEVEL:.0%} t-interval over seeds]; negative: better than vanilla; "
            "exact sign-flip p-values, Holm-adjusted across every p-value of this table)",
            diffs, noise_notes(arms, significant, split)))
    base, savings = parameter_savings(arms)
    if savings and base is not None:  # vanilla at two sizes or more: a curve to read against
        notes = [f"vanilla: {base.describe()}, {len(base.residuals)} points / {base.n_free} "
                 "free parameters, residuals " + " ".join(f"{r:+.4f}" for r in base.residuals),
                 *budget_notes(arms)[1:]]
        out.append(Section("parameter_saving", "Equivalent parameter saving against vanilla "
                           "(non-embedding parameters; the headline averages interpolated "
                           "readings only)", saving_rows(savings), notes))
    for shape, by_tokens in token_savings(arms).items():
        out.append(Section("data_saving", f"Data saving against vanilla at {shape}, from "
                           "separately scheduled runs (loss against tokens)",
                           saving_rows(by_tokens)))
    curve = [d for d in curve_data_savings(arms) if d.saving is not None]
    if curve:
        out.append(Section("curve_data_saving", "Data saving read off validation curves "
                           "(secondary: the middle of a cosine schedule)", [
                               {"variant": d.variant, "mean": _pct(d.saving),
                                "per seed": ", ".join(f"seed {k}: {_pct(v)}"
                                                      for k, v in d.per_seed.items()),
                                "per size": ", ".join(f"{k}: {_pct(v)}"
                                                      for k, v in d.per_size.items()),
                                "pairs": d.pairs} for d in curve]))
    profiled = profiled_trials(arms)
    at = " (each size at its longest budget)" if several else ""
    out += learned_sections(profiled, at)
    if rows := profile_rows(profiled, "attention_entropy"):
        out.append(Section("entropy", f"Attention entropy per layer (nats){at}", rows))
    return out + confirmed


def summary_markdown(trials: list[TrialRecord], protocol: str = "all_seeds",
                     confirmations: Iterable[Confirmation] = ()) -> str:
    return sections_markdown(sections(trials, protocol, confirmations))


def sections_markdown(secs: Iterable[Section]) -> str:
    lines: list[str] = []
    for s in secs:
        lines += [f"### {s.title}", ""]
        if s.rows:
            lines += [*markdown_table(s.rows), ""]
        lines += [*(f"{note}" for note in s.notes), *([""] if s.notes else [])]
    return "\n".join(lines).rstrip()
