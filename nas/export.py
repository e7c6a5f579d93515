"""`nas export`: the chosen trials of a study as run configs that `nas train` reads unchanged.

Each trial stores its full run config (user attr `config`, data source and seed included), so
`nas train DIR/trial-0007.yaml` trains the trial again and, on the same device, reproduces its
validation loss. A summary table (summary.csv and summary.json) lists what was exported.
Knows nothing of torch.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial

from .config import ConfigError, dump_config, from_dict
from .trials import completed, describe, front, nondominated

SUMMARY_FIELDS = ("file", "trial", "plan", "mode", "source", "receiving_layers", "baseline",
                  "n_params", "n_params_non_embedding", "val_loss", "val_ppl", "tokens",
                  "tokens_per_s", "steps", "seed", "data_source")


def check_choice(pareto: bool, best: int | None) -> None:
    """Exactly one of --pareto and --best K, with K >= 1."""
    if pareto == (best is not None):
        raise ConfigError("choose exactly one of --pareto and --best K")
    if best is not None and best < 1:
        raise ConfigError(f"--best: must be a positive number of trials, got {best}")


def choose_trials(study: optuna.Study, pareto: bool = False,
                  best: int | None = None) -> list[FrozenTrial]:
    """The Pareto front (`pareto`) or the `best` K completed trials by validation loss."""
    check_choice(pareto, best)
    done = [t for t in completed(study) if "config" in t.user_attrs]
    if not done:
        raise ConfigError(f"study {study.study_name!r} has no completed trials yet; "
                          "nothing to export")
    if best is not None:
        return sorted(done, key=lambda t: (t.user_attrs["val_loss"],
                                           t.user_attrs["n_params"], t.number))[:best]
    if len(study.directions) > 1:
        return [t for t in front(study) if "config" in t.user_attrs]
    # One objective (val_loss with a budget): the loss-vs-parameters front of what completed.
    return nondominated(done, ["val_loss", "n_params"])


def summary_row(trial: FrozenTrial, file: str) -> dict[str, Any]:
    a = trial.user_attrs
    cfg = a["config"]
    return {
        "file": file, "trial": trial.number, "plan": describe(a), "mode": a.get("mode"),
        "source": a.get("source"), "receiving_layers": a.get("receiving_layers", []),
        "baseline": bool(a.get("baseline", False)), "n_params": a["n_params"],
        "n_params_non_embedding": a.get("n_params_non_embedding"), "val_loss": a["val_loss"],
        "val_ppl": a.get("val_ppl"), "tokens": a.get("tokens"),
        "tokens_per_s": a.get("tokens_per_s"), "steps": a.get("steps_trained"),
        "seed": cfg["train"]["seed"], "data_source": cfg["data"]["source"],
    }


def export_trials(study: optuna.Study, trials: list[FrozenTrial],
                  out: str | Path) -> list[dict[str, Any]]:
    """Write one run config per trial (trial-NNNN.yaml) and summary.csv / summary.json."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out: {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for t in trials:
        cfg = from_dict(t.user_attrs["config"], where=f"study {study.study_name!r} trial "
                        f"{t.number}")
        name = f"trial-{t.number:04d}.yaml"
        dump_config(cfg, out / name)
        rows.append(summary_row(t, name))
    with (out / "summary.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=SUMMARY_FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "receiving_layers": " ".join(
                map(str, row["receiving_layers"]))})
    summary = {"study": study.study_name, "trials": rows}
    (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return rows
