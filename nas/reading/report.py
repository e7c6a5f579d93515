"""The interactive report: one self-contained HTML page with the front, every figure of
`nas.reading.figures.FIGURES` with its explanation, and the tables of `nas.reading.summary`. Uses
optuna and plotly; no torch.
"""

from __future__ import annotations

import datetime
import html
from collections.abc import Iterable
from pathlib import Path

import optuna
import plotly.graph_objects as go
from optuna.trial import TrialState
from plotly.offline import get_plotlyjs

from nas.errors import ConfigError
from nas.reading.confirmation import load_confirmations
from nas.reading.figures import FIGURES, build_figures
from nas.reading.summary import Section, confirmation_sections, html_table, sections
from nas.search.lr_sweep import stored_protocol
from nas.search.trials import OBJECTIVES, completed, front_rows

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { margin-bottom: 0.2em; } .meta { color: #666; }
section { margin: 2.5em 0; } table { border-collapse: collapse; margin: 0.8em 0; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.7em; text-align: left; font-size: 0.92em; }
th { background: #f4f4f4; }
"""


def _html_sections(secs: Iterable[Section]) -> str:
    return "".join(f"<h3>{html.escape(sec.title)}</h3>"
                   + (html_table(sec.rows) if sec.rows else "")
                   + "".join(f"<p>{html.escape(n)}</p>" for n in sec.notes) for sec in secs)


def render_html(study: optuna.Study, figures: dict[str, go.Figure],
                left_out: dict[str, str] | None = None, source: str = "") -> str:
    """One self-contained page: plotly.js inlined once in the head, then every figure with
    something to show, the tables (after the scaling figure, or after the last figure), and a
    line for each figure left out saying why."""
    trials = study.get_trials(deepcopy=False)
    counts = {s.name.lower(): sum(t.state == s for t in trials) for s in TrialState}
    objectives = study.metric_names or study.user_attrs.get("objectives") or []
    directions = [OBJECTIVES.get(o, d.name.lower()) for o, d in
                  zip(objectives, study.directions, strict=False)]
    summary = ", ".join(f"{o} ({d})" for o, d in zip(objectives, directions, strict=False))
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    title = "Pareto front" if len(study.directions) > 1 else "Best trials"
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>nas report: {html.escape(study.study_name)}</title>",
        f"<style>{STYLE}</style>",
        f"<script type='text/javascript'>{get_plotlyjs()}</script></head><body>",
        f"<h1>Study {html.escape(study.study_name)}</h1>",
        f"<p class='meta'>{html.escape(source)} · objectives: {html.escape(summary)} · trials: "
        f"{counts['complete']} complete, {counts['pruned']} pruned, {counts['fail']} failed, "
        f"{counts['running']} running · generated {now}</p>",
        f"<h3>{title}</h3>", html_table(front_rows(study)),
    ]
    tables = _html_sections(sections(completed(study), stored_protocol(study)))
    after = "scaling" if "scaling" in figures else next(reversed(figures), None)
    if after is None:
        parts.append(f"<section id='tables'>{tables}</section>")
    for key, fig in figures.items():
        heading = FIGURES[key].title if key in FIGURES else key
        parts.append(f"<section id='{key}'><h2>{html.escape(heading)}</h2>"
                     f"<p>{html.escape(FIGURES[key].explain if key in FIGURES else '')}</p>")
        parts.append(fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"fig-{key}",
                                 config={"responsive": True, "displaylogo": False}))
        if key == after:
            parts.append(tables)
        if key == "confirmation":
            parts.append(_html_sections(
                sec for c in load_confirmations(study) for sec in confirmation_sections(c)))
        parts.append("</section>")
    if left_out:
        parts.append("<section id='left-out'><h2>Figures left out</h2>" + "".join(
            f"<p>{html.escape(FIGURES[key].title)}: {html.escape(why)}</p>"
            for key, why in left_out.items()) + "</section>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(study: optuna.Study, out: str | Path, source: str = "",
                 image: str | Path | None = None) -> tuple[dict[str, go.Figure], dict[str, str]]:
    """Write the HTML report to `out` (and, with `image` = X.png or X.svg, one static image
    per figure as X-<figure>.png, which needs plotly's image backend, kaleido); returns the
    figures drawn and why each other one was left out."""
    if not completed(study):
        raise ConfigError(f"study {study.study_name!r} has no completed trials yet; "
                          "nothing to report")
    if image is not None:
        _check_image(Path(image))
    figures, left_out = build_figures(study)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_html(study, figures, left_out, source), encoding="utf-8")
    if image is not None:
        image = Path(image)
        for key, fig in figures.items():
            fig.write_image(image.with_name(f"{image.stem}-{key}{image.suffix}"), width=1100)
    return figures, left_out


def _check_image(image: Path) -> None:
    from nas.extras import require

    if image.suffix.lower() not in (".png", ".svg"):
        raise ConfigError(f"--image: {image}: must end in .png or .svg")
    # kaleido, plotly's image backend, drives a local Chrome or Chromium
    require("image", "--image: static images")
