"""The report's figures: one plotly builder per figure, and one registry (`FIGURES`: title,
builder, explanation) that the HTML report and the dashboard both read. Adding a figure is one
builder and one entry. Reads trials (through nas.reading.arms and nas.reading.scaling for the
scaling figures); knows nothing of torch. One piece (about 580 lines) because the twelve builders
share the palette and axis helpers and the registry must see them all.
"""


from __future__ import annotations

import math
import warnings
import zlib
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import optuna
import plotly.graph_objects as go
from optuna.trial import TrialState
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from nas.modes import BASELINE_MODE, MODES
from nas.reading.arms import best_arms, choose_arms, profiled_trials, reports_test
from nas.reading.confirmation import load_confirmations
from nas.reading.scaling import layer_profile, parameter_levels, parameter_savings, token_levels
from nas.reading.stats import Interval, mean_interval
from nas.reading.summary import budget_notes
from nas.search.lr_sweep import stored_protocol
from nas.search.trials import TrialRecord, completed, front, nondominated, records

# vanilla, the reference of every comparison, is dark grey; the other modes take plotly's colours.
MODE_COLORS = {**dict(zip(MODES, qualitative.Plotly, strict=False)), BASELINE_MODE: "#404040"}
SOURCE_SYMBOLS = {"first_layer": "circle", "value_embedding": "diamond"}
HEIGHT = 480


# -- trials ------------------------------------------------------------------------------------


def _label(t: TrialRecord) -> str:
    return f"#{t.number} {t.label}" + (" (baseline)" if t.baseline else "")


# The paper's named variants that share the mode resformer (studies/resformer_scaling.yaml).
VARIANT_COLORS = {"identity": qualitative.Dark24[0], "sparse": qualitative.Dark24[5]}


def _color(name: str) -> str:
    """A mode's or named variant's colour, fixed by its name (the same in every figure and
    report, whatever order they are drawn in)."""
    base = name.removesuffix("+ve")
    if base in MODE_COLORS or name in VARIANT_COLORS:
        return MODE_COLORS.get(base) or VARIANT_COLORS[name]
    return qualitative.Dark24[zlib.crc32(name.encode()) % len(qualitative.Dark24)]


class NothingToShow(Exception):
    """What a builder raises when the study holds nothing for its figure: the figure is left
    out, and the report says why in one line."""


def _params_axis(values: list[float]) -> dict[str, Any]:
    spread = max(values) / max(min(values), 1) if values else 1
    return {"title": "parameters (n_params)", "type": "log" if spread > 4 else "linear"}


# -- Pareto front ------------------------------------------------------------------------------


def study_front(study: optuna.Study) -> set[int]:
    """The numbers of the trials on the study's Pareto front, all its objectives (none for a
    single objective): ringed in black in the scatter figures, since with three objectives a
    trial on it may look dominated in any one plane."""
    return {t.number for t in front(study)} if len(study.directions) > 1 else set()


def _mode_scatters(trials: list[TrialRecord], x: str, ringed: set[int],
                   legend: bool = True) -> list[go.Scatter]:
    """val_loss against the stored measurement `x`: one marker trace per mode and source
    (colour: mode, marker: source), the trials in `ringed` ringed in black."""
    groups: dict[tuple[str, str], list[TrialRecord]] = {}
    for t in trials:
        if t.objective(x) is not None:
            groups.setdefault((t.mode, t.source), []).append(t)
    return [go.Scatter(
        x=[t.objective(x) for t in ts], y=[t.val_loss for t in ts], mode="markers",
        name=mode if source == "first_layer" else f"{mode} ({source})", legendgroup=mode,
        showlegend=legend, text=[_label(t) + (" (on the front)" if t.number in ringed else "")
                                 for t in ts],
        marker={"color": _color(mode), "size": 11,
                "symbol": SOURCE_SYMBOLS.get(source, "square"),
                "line": {"width": [2.5 if t.number in ringed else 1 for t in ts],
                         "color": ["black" if t.number in ringed else "white" for t in ts]}},
        hovertemplate=f"%{{text}}<br>{x} %{{x:,}}<br>val_loss %{{y:.4f}}<extra></extra>")
        for (mode, source), ts in sorted(groups.items())]


def pareto_figure(study: optuna.Study) -> go.Figure:
    title = "Pareto front: val_loss against parameters"
    trials = completed(study)
    if not trials:
        raise NothingToShow("no completed trials yet")
    fig = go.Figure(_mode_scatters(trials, "n_params", study_front(study)))
    best = nondominated(trials, ["val_loss", "n_params"])  # the front this plot shows
    fig.add_trace(go.Scatter(
        x=[t.n_params for t in best], y=[t.val_loss for t in best],
        mode="lines", line={"shape": "hv", "color": "black", "dash": "dot", "width": 1.5},
        name="Pareto front", hoverinfo="skip"))
    fig.update_layout(title=title, height=HEIGHT, yaxis_title="validation loss",
                      xaxis=_params_axis([t.n_params for t in trials]),
                      legend_title="mode (marker: source)")
    return fig


# The inference costs a trial stores, and their axes.
INFERENCE_COSTS = {"kv_bytes_per_token": "KV cache (bytes per token, from the plan)",
                   "decode_tokens_per_s": "cached decoding (tokens/s, measured)"}


def inference_figure(study: optuna.Study) -> go.Figure:
    """val_loss against each inference cost, side by side with a shared loss axis: with the
    parameter figure, the paired planes of a three-objective front."""
    title = "Validation loss against inference cost"
    trials = completed(study)
    costs = [c for c in INFERENCE_COSTS if any(t.objective(c) is not None for t in trials)]
    if not costs:
        raise NothingToShow("no completed trial stores an inference cost (trials "
                              "from before they were measured)")
    ringed = study_front(study)
    fig = make_subplots(rows=1, cols=len(costs), shared_yaxes=True,
                        subplot_titles=[INFERENCE_COSTS[c] for c in costs])
    for col, cost in enumerate(costs, start=1):
        for trace in _mode_scatters(trials, cost, ringed, legend=col == 1):
            fig.add_trace(trace, row=1, col=col)
        fig.update_xaxes(title_text=cost, row=1, col=col)
    fig.update_yaxes(title_text="validation loss", row=1, col=1)
    ring = " (ringed: on the study's Pareto front)" if ringed else ""
    fig.update_layout(title=title + ring, height=HEIGHT, legend_title="mode (marker: source)")
    return fig


# -- coefficients ------------------------------------------------------------------------------


def _coefficient_key(key: str) -> tuple[str, int]:
    """`L3.lambda1` -> ("lambda1", 3)."""
    layer, _, name = key.partition(".")
    try:
        return name, int(layer.removeprefix("L"))
    except ValueError:
        return key, -1


def coefficients_figure(study: optuna.Study) -> go.Figure:
    title = "Mixing coefficients per layer"
    trials = [t for t in completed(study) if t.coefficients]
    if not trials:
        raise NothingToShow("no completed trial has residual coefficients "
                              "(vanilla and svformer have none)")
    keys = sorted({k for t in trials for k in t.coefficients},
                  key=_coefficient_key)
    columns = [f"{name} L{layer}" for name, layer in map(_coefficient_key, keys)]
    trials.sort(key=lambda t: (t.mode, t.number))
    z = [[t.coefficients.get(k, math.nan) for k in keys] for t in trials]
    fig = go.Figure(go.Heatmap(
        z=z, x=columns, y=[_label(t) for t in trials], colorscale="Viridis",
        texttemplate="%{z:.2f}", colorbar={"title": "value"}, hoverongaps=False,
        hovertemplate="%{y}<br>%{x}: %{z:.4f}<extra></extra>"))
    fig.update_layout(title=title + " (final values)",
                      height=max(HEIGHT, 120 + 28 * len(trials)),
                      xaxis_title="coefficient and receiving layer",
                      yaxis={"autorange": "reversed"})
    return fig


# -- scaling fits and the equivalent parameter saving ------------------------------------------


def _loss_axis(trials: list[TrialRecord]) -> str:
    return "test loss" if reports_test(trials) else "validation loss (no test split)"


def scaling_figure(study: optuna.Study) -> go.Figure:
    title = "Scaling fits per variant and parameter saving vs vanilla"
    trials = completed(study)
    if not trials:
        raise NothingToShow("no completed trials yet")
    arms = best_arms(trials, stored_protocol(study))
    levels = parameter_levels(arms)
    base, savings = parameter_savings(arms)
    fits = {BASELINE_MODE: base, **{s.variant: s.fit for s in savings}}
    notes = {s.variant: (f"saving {s.headline:+.1%}" if s.headline is not None else s.note)
             for s in savings}
    all_n = [lv.x for lvs in levels.values() for lv in lvs]
    fig = go.Figure()
    for name, lvs in levels.items():
        color = _color(name)
        label = f"{name}: {notes[name]}" if name in notes else f"{name} (reference)"
        fig.add_trace(go.Scatter(
            x=[lv.x for lv in lvs], y=[lv.loss for lv in lvs], mode="markers", name=label,
            legendgroup=name, marker={"color": color, "size": 10},
            error_y={"type": "data", "symmetric": False,
                     "array": [max(lv.by_seed.values()) - lv.loss for lv in lvs],
                     "arrayminus": [lv.loss - min(lv.by_seed.values()) for lv in lvs]},
            text=[f"{name} at {lv.label}: {len(lv.by_seed)} seed(s), "
                  f"{lv.tokens_per_model_param:.3g} tokens/param" for lv in lvs],
            hovertemplate="%{text}<br>non-embedding params %{x:,}<br>loss %{y:.4f}"
                          "<extra></extra>"))
        fit = fits.get(name)
        if fit is not None:
            grid = np.geomspace(min(all_n) / 1.2, max(all_n) * 1.2, 60)
            fig.add_trace(go.Scatter(
                x=grid, y=fit.loss(grid), mode="lines", legendgroup=name, showlegend=False,
                line={"color": color, "dash": "dash" if name != BASELINE_MODE else "solid"},
                name=f"{name} fit", hovertemplate=f"{name}: {fit.describe()}<extra></extra>"))
    warning = " ".join(budget_notes(arms)[1:])
    if warning:
        fig.add_annotation(text=warning, showarrow=False, x=0, y=1.08, xref="paper",
                           yref="paper", xanchor="left", font={"color": "#b00", "size": 12})
    axis = _params_axis(all_n)
    axis["title"] = "non-embedding parameters"
    fig.update_layout(
        title=title, height=HEIGHT, legend={"orientation": "h", "y": -0.22}, xaxis=axis,
        yaxis_title=f"{_loss_axis(trials)} (mean over seeds at the chosen lr; bars: min-max)")
    return fig


def savings_figure(study: optuna.Study) -> go.Figure:
    title = "Equivalent parameter saving against vanilla, per size and per seed"
    arms = best_arms(completed(study), stored_protocol(study))
    _, savings = parameter_savings(arms)
    savings = [s for s in savings if s.levels]
    if not savings:
        raise NothingToShow("no saving to show: needs vanilla and another variant "
                              "at two or more model sizes")
    fig = go.Figure()
    for s in savings:
        color = _color(s.variant)
        error = {}
        if s.headline is not None and s.interval is not None and not math.isnan(s.interval[0]):
            error = {"type": "data", "symmetric": False, "array": [s.interval[1] - s.headline],
                     "arrayminus": [s.headline - s.interval[0]]}
        fig.add_trace(go.Bar(
            x=[s.variant], y=[s.headline or 0.0], marker_color=color, error_y=error,
            name=f"{s.variant} (headline, 95% interval)", legendgroup=s.variant,
            hovertemplate=f"{s.variant}: %{{y:+.1%}} (interpolated readings)<extra></extra>"))
        fig.add_trace(go.Scatter(
            x=[s.variant] * len(s.levels), y=[lv.saving for lv in s.levels], mode="markers",
            legendgroup=s.variant, showlegend=False,
            marker={"color": "black", "symbol": ["circle" if lv.interpolated else "x-open"
                                                 for lv in s.levels], "size": 8},
            text=[f"at {lv.label}" + ("" if lv.interpolated else " (extrapolated)")
                  for lv in s.levels],
            hovertemplate="%{text}: %{y:+.1%}<extra></extra>"))
    fig.update_layout(title=title + " (dots: per size; crosses: extrapolated, not in the bar)",
                      height=HEIGHT, showlegend=False,
                      yaxis={"title": "saving (share of vanilla's parameters)",
                             "tickformat": "+.0%"})
    return fig


def lr_figure(study: optuna.Study) -> go.Figure:
    title = "Validation loss against learning rate, per variant and size"
    arms = [a for a in choose_arms(completed(study), stored_protocol(study))
            if len(a.grid) > 1 and a.val_by_lr]
    if not arms:
        raise NothingToShow("no arm ran a learning-rate grid")
    shapes = sorted({a.shape for a in arms}, key=lambda s: min(a.n_params for a in arms
                                                                if a.shape == s))
    fig = make_subplots(rows=1, cols=len(shapes), subplot_titles=shapes, shared_yaxes=False)
    shown: set[str] = set()
    for col, shape in enumerate(shapes, start=1):
        for a in sorted((a for a in arms if a.shape == shape), key=lambda a: a.variant):
            rates = [lr for lr in a.grid if lr in a.val_by_lr]
            ivs = [mean_interval([a.runs[lr][s].val_loss for s in a.choice_seeds])
                   for lr in rates]
            fig.add_trace(go.Scatter(
                x=rates, y=[iv.mean for iv in ivs], mode="lines+markers",
                error_y={"type": "data", "symmetric": False,
                         "array": [0 if iv.n < 2 else iv.high - iv.mean for iv in ivs],
                         "arrayminus": [0 if iv.n < 2 else iv.mean - iv.low for iv in ivs]},
                name=a.variant, legendgroup=a.variant, showlegend=a.variant not in shown,
                marker={"color": _color(a.variant),
                        "size": [12 if lr in a.chosen_rates else 6 for lr in rates]},
                line={"color": _color(a.variant)},
                hovertemplate=f"{a.variant}, lr %{{x:g}}: %{{y:.4f}}<extra></extra>"),
                row=1, col=col)
            shown.add(a.variant)
        fig.update_xaxes(type="log", title_text="lr", row=1, col=col)
    fig.update_layout(title=title + " (mean and 95% interval over the choosing seeds; large "
                      "marker: a chosen rate)", height=HEIGHT,
                      legend={"orientation": "h", "y": -0.25})
    return fig


def tokens_figure(study: optuna.Study) -> go.Figure:
    title = "Loss against training tokens per variant (each budget its own schedule)"
    trials = completed(study)
    by_shape = token_levels(best_arms(trials, stored_protocol(study)))
    if not by_shape:
        raise NothingToShow("no model shape was trained at two or more budgets")
    shape, by_name = next(iter(by_shape.items()))
    base = {lv.label: lv for lv in by_name.get(BASELINE_MODE, [])}
    fig = make_subplots(rows=1, cols=2, subplot_titles=(
        f"{_loss_axis(trials)} at {shape}", "minus vanilla's (mean over seeds)"))
    for name, lvs in by_name.items():
        color = _color(name)
        fig.add_trace(go.Scatter(
            x=[lv.tokens_per_model_param for lv in lvs], y=[lv.loss for lv in lvs], name=name,
            legendgroup=name, mode="lines+markers", line={"color": color}), row=1, col=1)
        pairs = [(lv.tokens_per_model_param, lv.loss - base[lv.label].loss) for lv in lvs
                 if lv.label in base and name != BASELINE_MODE]
        if pairs:
            fig.add_trace(go.Scatter(
                x=[p[0] for p in pairs], y=[p[1] for p in pairs], name=name, legendgroup=name,
                showlegend=False, mode="lines+markers", line={"color": color}), row=1, col=2)
    fig.add_hline(y=0, line={"color": "#404040", "dash": "dot"}, row=1, col=2)
    fig.update_xaxes(type="log", title_text="tokens per non-embedding parameter")
    fig.update_layout(title=title, height=HEIGHT, legend={"orientation": "h", "y": -0.25})
    return fig


def analysis_figure(study: optuna.Study) -> go.Figure:
    title = "Per-layer attention entropy and value similarity to layer 0"
    trials = profiled_trials(best_arms(completed(study), stored_protocol(study)))
    entropy = layer_profile(trials, "attention_entropy")
    cosine = layer_profile(trials, "mixed_value_cosine")
    if not entropy:
        raise NothingToShow("no completed trial carries an analysis")
    shape = list(entropy)[-1]  # the largest model: the shapes sort by layers, then width
    fig = make_subplots(rows=1, cols=2, subplot_titles=(
        "attention entropy (nats)", "cosine(V'_n, V_1) of the values attention uses"))
    for col, profile in ((1, entropy), (2, cosine)):
        for name, values in profile.get(shape, {}).items():
            fig.add_trace(go.Scatter(
                x=list(range(len(values))), y=values, mode="lines+markers", name=name,
                legendgroup=name, showlegend=col == 1, line={"color": _color(name)},
                hovertemplate=f"{name}<br>layer %{{x}}: %{{y:.3f}}<extra></extra>"),
                row=1, col=col)
    fig.update_xaxes(title_text="layer", dtick=1)
    fig.update_layout(title=f"{title}: {shape}, mean over seeds", height=HEIGHT)
    return fig


# -- curves, importances, hypervolume ----------------------------------------------------------


def curves_figure(study: optuna.Study) -> go.Figure:
    title = "Validation curves"
    trials = [t for t in records(study.get_trials(
        deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))) if t.curve]
    if not trials:
        raise NothingToShow("no trial has reported a validation loss yet")
    fig = go.Figure()
    for t in trials:
        pruned = t.state == TrialState.PRUNED
        curve = t.curve
        name = f"#{t.number} {_label(t)}" + (" (pruned)" if pruned else "")
        fig.add_trace(go.Scatter(
            x=[s for s, _ in curve], y=[v for _, v in curve], mode="lines+markers", name=name,
            opacity=0.5 if pruned else 0.9,
            line={"color": _color(t.arm_name), "dash": "dot" if pruned else "solid"},
            marker={"size": 5}, text=[name] * len(curve),
            hovertemplate="%{text}<br>step %{x}<br>val_loss %{y:.4f}<extra></extra>"))
    fig.update_layout(title=title + " (one line per trial, coloured by mode; dotted: pruned)",
                      height=HEIGHT, xaxis_title="step", yaxis_title="validation loss",
                      legend_title="trial")
    return fig


def importances_figure(study: optuna.Study) -> go.Figure:
    title = "Parameter importances for val_loss"
    n_done = len(completed(study))
    try:
        if n_done < 3:
            raise ValueError(f"needs at least 3 completed trials, the study has {n_done}")
        with warnings.catch_warnings():  # PED-ANOVA's reminder that low values are the goal
            warnings.simplefilter("ignore", UserWarning)
            importances = optuna.importance.get_param_importances(
                study, target=lambda t: t.values[0])
        if not importances:
            raise ValueError("no parameter varies across the completed trials")
    except (ValueError, RuntimeError) as exc:
        raise NothingToShow(f"no importances: {exc}") from None
    names = list(importances)[::-1]
    fig = go.Figure(go.Bar(x=[importances[k] for k in names], y=names, orientation="h",
                           marker_color="#636efa",
                           hovertemplate="%{y}: %{x:.3f}<extra></extra>"))
    fig.update_layout(title=title + f" ({n_done} completed trials)",
                      height=max(300, 120 + 30 * len(names)), xaxis_title="importance",
                      margin={"l": 220})
    return fig


def reference_point(study: optuna.Study) -> list[float]:
    """10% beyond the worst observed value of each objective."""
    values = np.array([t.values for t in study.get_trials(deepcopy=False,
                                                          states=(TrialState.COMPLETE,))])
    ref = []
    for i, direction in enumerate(study.directions):
        if direction == optuna.study.StudyDirection.MINIMIZE:
            worst = float(values[:, i].max())
            ref.append(worst + 0.1 * abs(worst))
        else:
            worst = float(values[:, i].min())
            ref.append(worst - 0.1 * abs(worst))
    return ref


def hypervolume_figure(study: optuna.Study) -> go.Figure:
    if not completed(study):
        raise NothingToShow("no completed trials yet")
    if len(study.directions) == 1:
        fig = optuna.visualization.plot_optimization_history(study, target_name="val_loss")
        fig.update_layout(title="Best validation loss history (single objective: "
                                "no hypervolume)", height=HEIGHT)
        return fig
    ref = reference_point(study)
    fig = optuna.visualization.plot_hypervolume_history(study, reference_point=ref)
    # the front changes only when a trial completes: a step, as a share of the box between
    # the reference point and the best value seen of each objective
    values = np.array([t.values for t in study.get_trials(deepcopy=False,
                                                          states=(TrialState.COMPLETE,))])
    best = [values[:, i].min() if d == optuna.study.StudyDirection.MINIMIZE
            else values[:, i].max() for i, d in enumerate(study.directions)]
    box = float(np.prod([abs(r - b) for r, b in zip(ref, best, strict=True)])) or 1.0
    for trace in fig.data:
        trace.y = [y / box for y in trace.y]
        trace.line.shape = "hv"
    names = study.metric_names or [f"objective {i}" for i in range(len(ref))]
    where = ", ".join(f"{n} {v:,.4g}" for n, v in zip(names, ref, strict=True))
    fig.update_layout(title=f"Hypervolume history (reference point: {where})", height=HEIGHT,
                      yaxis={"title": "hypervolume, share of the box from the reference point "
                                      "to the best values", "range": [0, 1.02],
                             "tickformat": ".0%"})
    return fig


# -- confirmation ------------------------------------------------------------------------------


def _error(iv: Interval) -> dict[str, Any]:
    """Error bars of an interval (none for one value)."""
    if iv.n < 2 or math.isnan(iv.low):
        return {}
    return {"type": "data", "symmetric": False, "array": [iv.high - iv.mean],
            "arrayminus": [iv.mean - iv.low]}


def confirmation_figure(study: optuna.Study) -> go.Figure:
    """Per confirmed plan: the study's validation loss against the fresh seeds' validation and
    test losses, and its paired difference from vanilla, each with its 95% interval."""
    title = "Confirmation on fresh seeds"
    confirmations = load_confirmations(study)
    plans = [(c, p) for c in confirmations for p in c.plans if p.arm is not None]
    if not plans:
        raise NothingToShow("no confirmation yet: `nas confirm` retrains the chosen plans on "
                            "fresh seeds")
    several = len(confirmations) > 1
    fig = make_subplots(rows=1, cols=2, subplot_titles=(
        "validation loss: study (open) and fresh seeds; fresh test loss (diamond)",
        "fresh loss minus vanilla's on the same seed"))
    for c, p in plans:
        x = [f"{p.label} ({c.name})" if several else p.label]
        color = _color(p.arm.first.mode)
        if p.search_val is not None:
            fig.add_trace(go.Scatter(x=x, y=[p.search_val], mode="markers", showlegend=False,
                                     marker={"color": color, "size": 11, "symbol": "circle-open"},
                                     hovertemplate="study val %{y:.4f}<extra></extra>"),
                          row=1, col=1)
        for split, symbol in (("val", "circle"), (c.split, "diamond")):
            iv = mean_interval([getattr(r, f"{split}_loss") for r in p.arm.trials])
            fig.add_trace(go.Scatter(
                x=x, y=[iv.mean], mode="markers", showlegend=False, error_y=_error(iv),
                marker={"color": color, "size": 10, "symbol": symbol},
                hovertemplate=f"fresh {split} %{{y:.4f}} ({iv.n} seeds)<extra></extra>"),
                row=1, col=1)
        if p.difference is not None:
            iv = p.difference.interval
            fig.add_trace(go.Scatter(
                x=x, y=[iv.mean], mode="markers", showlegend=False, error_y=_error(iv),
                marker={"color": color, "size": 11},
                hovertemplate=f"%{{y:+.4f}} (n={iv.n}, Holm p {p.p_holm:.2g})<extra></extra>"),
                row=1, col=2)
    fig.add_hline(y=0, line={"color": "#404040", "dash": "dot"}, row=1, col=2)
    fig.update_layout(title=title + " (bars: 95% t-intervals over the fresh seeds)",
                      height=HEIGHT)
    return fig


# -- the registry ------------------------------------------------------------------------------

class Figure(NamedTuple):
    title: str
    build: Callable[[optuna.Study], go.Figure]
    explain: str


# Every figure of the report and the dashboard, in page order: one entry per figure.
FIGURES: dict[str, Figure] = {
    "pareto": Figure("Pareto front", pareto_figure, (
        "Every completed trial: validation loss against parameter count, coloured by the "
        "residual mode, marker by source (circle: first layer's values, diamond: value "
        "embedding). The dotted staircase joins the trials that no other trial beats on both "
        "axes; trials ringed in black are on the study's front of all its objectives, which "
        "with a third (the KV cache, say) includes trials this plane shows as dominated.")),
    "inference": Figure("Loss against inference cost", inference_figure, (
        "Every completed trial's validation loss against what it costs to generate with: the "
        "KV cache per token (exact, at the training dtype; svformer's receiving layers cache "
        "no values) and cached decoding speed (tokens/s for one sequence on the machine that "
        "trained it, best of a few repeats: it varies with the machine and its load). With the "
        "Pareto figure these are the paired views of a three-objective front; trials ringed in "
        "black are on it.")),
    "coefficients": Figure("Coefficients per layer", coefficients_figure, (
        "The mixing coefficients at the end of training: lambda1 weighs the source values V1, "
        "lambda2 the layer's own values; dense adds fromI weights, gated reports its gate "
        "weight norm. One row per trial, one column per coefficient and receiving layer; "
        "blank where a layer does not receive.")),
    "scaling": Figure("Scaling and equivalent parameter saving", scaling_figure, (
        "Each variant's loss at each model size (its best plan at its chosen learning rate, "
        "mean over seeds; the test loss where the study has a test split), with a fitted "
        "scaling curve over non-embedding parameters (a power law with an offset from three "
        "sizes, log-linear from two). The equivalent parameter saving is the paper's metric: "
        "1 - N_variant(L) / N_vanilla(L) at vanilla's fitted losses L.")),
    "savings": Figure("Equivalent parameter saving", savings_figure, (
        "The equivalent parameter saving per variant: the bar averages the readings made "
        "inside the variant's measured sizes, with the 95% t-interval over the savings read "
        "seed by seed; dots are the per-size readings, crosses the extrapolated "
        "ones (outside the bar). The tables below the scaling figure give every number, seed "
        "by seed.")),
    "lr": Figure("Learning-rate sensitivity", lr_figure, (
        "Each variant's mean validation loss at every learning rate of the grid, per size, "
        "over the seeds run at every rate; the large marker is the chosen rate. A flat curve "
        "means the arm is insensitive to the rate; a choice at an end of the grid is flagged "
        "in the tables.")),
    "tokens": Figure("Loss against training tokens", tokens_figure, (
        "Where the study trains one size at several budgets (each with its own warmup and "
        "cosine schedule): the final loss against tokens per parameter per variant, and its "
        "difference from vanilla's, which shows whether a gain grows, shrinks or changes sign "
        "as training gets longer.")),
    "analysis": Figure("Attention entropy and value similarity", analysis_figure, (
        "The paper's analyses at the largest model size, per layer and averaged over seeds "
        "(each variant at its chosen learning rate and longest budget): "
        "the entropy of each query's attention (low: concentrated; uniform causal attention "
        "has the most), and the cosine similarity of the values attention uses, V'_n, to the "
        "first layer's V_1, on the first validation windows. `nas analyze` prints the same "
        "for one run.")),
    "curves": Figure("Validation curves", curves_figure, (
        "Validation loss against training step for every trial that reported one, one line per "
        "trial (named in the legend, coloured by mode); pruned trials are dotted and stop where "
        "they were pruned.")),
    "importances": Figure("Parameter importances", importances_figure, (
        "How much each searched parameter explains the validation loss (optuna.importance, "
        "PED-ANOVA).")),
    "hypervolume": Figure("Hypervolume history", hypervolume_figure, (
        "The hypervolume dominated by the Pareto front after each trial, against a reference "
        "point 10% beyond the worst observed value of each objective, as a share of the box "
        "between that point and the best value seen of each objective; it steps up whenever a "
        "trial improves the front.")),
    "confirmation": Figure("Confirmation on fresh seeds", confirmation_figure, (
        "Where `nas confirm` retrained chosen plans on seeds the study never used: each plan's "
        "validation loss in the study (open circle) against its mean on the fresh seeds "
        "(circle; the gap is the winner's curse) and its fresh test loss (diamond), and its "
        "paired difference from vanilla at the same shape and budget on the same seeds, with "
        "95% t-intervals over the seeds. The tables below give every number, Holm-adjusted "
        "p-values and whether each front plan stays on the front.")),
}


def build_figures(study: optuna.Study) -> tuple[dict[str, go.Figure], dict[str, str]]:
    """The report's figures that have something to show, keyed as in FIGURES, and why each
    of the others was left out."""
    figures, left_out = {}, {}
    for key, figure in FIGURES.items():
        try:
            figures[key] = figure.build(study)
        except NothingToShow as why:
            left_out[key] = str(why)
    return figures, left_out
