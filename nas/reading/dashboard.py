"""`nas dashboard`: optuna-dashboard on a study's storage, with its artifacts and our figures.

Before serving, the study gets a Markdown note (the search space, the Pareto front and the
equivalent parameter savings) and the report's figures as dashboard plots; both are refreshed
while the server runs whenever more trials have finished. Trial user attributes (parameter
counts, coefficients, curves) and the artifacts that `nas search` uploads (config.yaml,
curve.csv) show on each trial's page. Knows nothing of torch.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import logging
import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import optuna
import optuna_dashboard
from optuna.trial import TrialState

from nas.errors import ConfigError
from nas.paths import check_output
from nas.reading.figures import build_figures
from nas.reading.summary import markdown_table, sections
from nas.search.artifacts import artifact_dir, artifact_store
from nas.search.lr_sweep import stored_protocol
from nas.search.spec import StudySpec
from nas.search.storage import make_storage, redact
from nas.search.study import FINISHED, open_existing, resolve_storage
from nas.search.trials import OBJECTIVES, completed, front_rows

logger = logging.getLogger(__name__)


# -- what the study shows in the dashboard -----------------------------------------------------


def _space_rows(space: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Markdown table rows for the searched keys, and `key=value` strings for the fixed ones."""
    searched, fixed = [], []
    for section, body in space.items():
        for key, value in (body or {}).items():
            name = f"{section}.{key}"
            if isinstance(value, list) and name != "value_residual.layers":
                searched.append(f"| `{name}` | one of {', '.join(map(str, value))} |")
            elif isinstance(value, dict) and {"low", "high"} <= set(value):
                log = " (log)" if value.get("log") else ""
                step = f", step {value['step']}" if value.get("step") else ""
                searched.append(f"| `{name}` | {value['low']} to {value['high']}{log}{step} |")
            elif isinstance(value, dict):
                searched.append(f"| `{name}` | {json.dumps(value)} |")
            else:
                fixed.append(f"`{name}={value}`")
    return searched, fixed


def _md_table(rows: list[dict[str, Any]]) -> list[str]:
    return markdown_table(rows) if rows else ["(none yet)"]


NOTE_SECTIONS = ("differences", "parameter_saving", "data_saving")  # of nas.reading.summary


def study_note(study: optuna.Study, spec: StudySpec) -> str:
    """The Markdown note: objectives, trial counts, space, front and parameter savings."""
    trials = study.get_trials(deepcopy=False)
    counts = {s: sum(t.state == s for t in trials) for s in TrialState}
    objectives = study.user_attrs.get("objectives") or spec.objectives
    space = study.user_attrs.get("space") or spec.merged_space
    budget = study.user_attrs.get("max_params", spec.max_params)
    searched, fixed = _space_rows(space)
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    lines = [
        f"## {study.study_name}: value-residual architecture search",
        f"Written by `nas dashboard` from `{spec.path}` at {now}; rewritten whenever trials "
        "finish (edits here are replaced).",
        "",
        "**Objectives:** " + ", ".join(f"`{o}` ({OBJECTIVES.get(o, '?')})" for o in objectives)
        + (f". **Parameter budget:** {budget:,}" if budget else "") + ".",
        f"**Trials:** {counts[TrialState.COMPLETE]} complete, {counts[TrialState.PRUNED]} "
        f"pruned, {counts[TrialState.FAIL]} failed, {counts[TrialState.RUNNING]} running.",
        "",
        "### Search space",
        "| parameter | values |", "|---|---|", *searched,
        "",
        "Fixed: " + (", ".join(fixed) if fixed else "nothing"),
        "",
        "### " + ("Pareto front" if len(study.directions) > 1 else "Best trials"),
        *_md_table(front_rows(study)),
        "",
        *(line for sec in sections(completed(study), stored_protocol(study))
          if sec.key in NOTE_SECTIONS
          for line in (f"### {sec.title}", *_md_table(sec.rows), *sec.notes, "")),
        "Each trial carries `config.yaml` (train it again: `nas train config.yaml`) and "
        "`curve.csv` as artifacts, and its parameter counts, coefficients and curve as user "
        "attributes. The study's main page shows the `nas report` figures below the dashboard's "
        "own.",
    ]
    return "\n".join(lines)


def publish(study: optuna.Study, spec: StudySpec) -> None:
    """Write the note and the report's figures into the study (they show in the dashboard)."""
    optuna_dashboard.save_note(study, study_note(study, spec))
    figures, _ = build_figures(study)  # the note's tables stand where a figure is left out
    for key, fig in figures.items():
        optuna_dashboard.save_plotly_graph_object(study, fig, graph_object_id=f"nas-{key}")


# -- the server --------------------------------------------------------------------------------


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # the page fetches many files at once


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        logger.debug(format, *args)


class _Refresher(threading.Thread):
    """Republishes note and figures when the number of finished trials changes."""

    def __init__(self, study: optuna.Study, spec: StudySpec, every: float):
        super().__init__(daemon=True)
        self.study, self.spec, self.every = study, spec, every
        self.stop = threading.Event()
        self.seen = self._finished()

    def _finished(self) -> int:
        return len(self.study.get_trials(deepcopy=False, states=FINISHED))

    def run(self) -> None:
        while not self.stop.wait(self.every):
            try:
                n = self._finished()
                if n != self.seen:
                    publish(self.study, self.spec)
                    self.seen = n
            except Exception as exc:  # a refresh must never take the server down
                logger.warning("could not refresh the study note: %s", exc)


def is_loopback(host: str) -> bool:
    """True for an address only this machine reaches: 127.0.0.0/8, ::1 or `localhost`."""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to any address
        return False


def tunnel(port: int) -> str:
    """The SSH command that reaches a loopback-bound dashboard on this machine from another."""
    shown = port or "PORT"
    return f"ssh -L {shown}:127.0.0.1:{shown} {socket.gethostname()}"


def serve(spec: StudySpec, storage: str | None = None, host: str = "127.0.0.1",
          port: int = 8080, artifacts: str | Path | None = None, refresh: float = 60.0,
          echo: Callable[[str], None] | None = None, allow_remote: bool = False) -> None:
    """Publish the note and figures, then serve optuna-dashboard until Ctrl+C or SIGTERM (the
    KeyboardInterrupt, `nas.interrupt.Interrupted`, goes on to the caller).

    optuna-dashboard has no authentication and lets whoever reaches it delete studies, so a
    `host` other than a loopback address is refused unless `allow_remote`, which warns."""
    if not is_loopback(host) and not allow_remote:
        raise ConfigError(f"--host: {host} is not a loopback address, and optuna-dashboard has "
                          "no authentication (anyone who reaches it can delete studies); keep "
                          f"the default 127.0.0.1 and tunnel to it ({tunnel(port)}), or pass "
                          "--allow-remote")
    echo = echo or (lambda text: print(text, flush=True))
    study = open_existing(spec, storage)
    url = resolve_storage(spec, storage)
    folder = artifact_dir(url, spec.name, artifacts or spec.artifacts)
    check_output(folder, "--artifacts" if artifacts else f"{spec.path}: artifacts", folder=True)
    publish(study, spec)
    backend = make_storage(url)
    app = optuna_dashboard.wsgi(backend, artifact_store=artifact_store(folder))
    try:
        server = make_server(host, port, app, server_class=_Server, handler_class=_QuietHandler)
    except OSError as exc:
        raise ConfigError(f"--port: cannot listen on {host}:{port}: {exc.strerror or exc}"
                          ) from None
    if not is_loopback(host):
        print(f"warning: optuna-dashboard has no authentication: anyone who reaches "
              f"{host}:{server.server_port} can read and delete every study in this storage. "
              f"Safer: the default --host 127.0.0.1 and, from your machine, "
              f"{tunnel(server.server_port)}", file=sys.stderr, flush=True)
    shown = f"[{host}]" if ":" in host else host
    study_id = backend.get_study_id_from_name(spec.name)
    echo(f"optuna-dashboard for study {spec.name!r} ({redact(url)}, artifacts in {folder}):\n"
         f"  http://{shown}:{server.server_port}/dashboard/studies/{study_id}\n"
         "Ctrl+C stops it.")
    refresher = _Refresher(study, spec, refresh) if refresh > 0 else None
    if refresher:
        refresher.start()
    try:
        # Ctrl+C and SIGTERM end it through the CLI's handler: exit status 130 or 143, one line
        server.serve_forever()
    finally:
        if refresher:
            refresher.stop.set()
        server.server_close()
