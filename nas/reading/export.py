"""`nas export`: the chosen trials of a study as run configs that `nas train` reads unchanged.

Each trial stores its full run config (user attr `config`, data source and seed included), so
`nas train DIR/STUDY-trial-0007.yaml` trains the trial again and, on the same device, reproduces
its validation loss. A summary table (STUDY-summary.csv and STUDY-summary.json) lists what was
exported. Every file name holds the study's name, so two studies exported into one folder never
write the same file.
Knows nothing of torch.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import optuna

from nas.config import dump_config, from_dict
from nas.errors import ConfigError
from nas.search.trials import TrialRecord, completed, front, nondominated

SUMMARY_FIELDS = ("file", "trial", "plan", "mode", "source", "receiving_layers", "baseline",
                  "n_params", "n_params_non_embedding", "kv_bytes_per_token", "val_loss",
                  "val_ppl", "decode_tokens_per_s", "tokens", "tokens_per_s", "steps", "seed",
                  "data_source")


def trial_file(study_name: str, number: int) -> str:
    """The file name of a trial's exported run config; `nas train` names its default output
    folder after it, so that folder holds the study and the trial too."""
    return f"{study_name}-trial-{number:04d}.yaml"


def summary_files(study_name: str) -> tuple[str, str]:
    """The file names of the export's summary table: CSV and JSON."""
    return f"{study_name}-summary.csv", f"{study_name}-summary.json"


def check_choice(pareto: bool, best: int | None) -> None:
    """Exactly one of --pareto and --best K, with K >= 1."""
    if pareto == (best is not None):
        raise ConfigError("choose exactly one of --pareto and --best K")
    if best is not None and best < 1:
        raise ConfigError(f"--best: must be a positive number of trials, got {best}")


def choose_trials(study: optuna.Study, pareto: bool = False,
                  best: int | None = None) -> list[TrialRecord]:
    """The Pareto front (`pareto`) or the `best` K completed trials by validation loss."""
    check_choice(pareto, best)
    done = [t for t in completed(study) if t.config]
    if not done:
        raise ConfigError(f"study {study.study_name!r} has no completed trials yet; "
                          "nothing to export")
    if best is not None:
        return sorted(done, key=lambda t: (t.val_loss, t.n_params, t.number))[:best]
    if len(study.directions) > 1:
        return [t for t in front(study) if t.config]
    # One objective (val_loss with a budget): the loss-vs-parameters front of what completed.
    return nondominated(done, ["val_loss", "n_params"])


def summary_row(trial: TrialRecord, file: str) -> dict[str, Any]:
    t = trial
    return {
        "file": file, "trial": t.number, "plan": t.label, "mode": t.mode, "source": t.source,
        "receiving_layers": t.receiving_layers, "baseline": t.baseline, "n_params": t.n_params,
        "n_params_non_embedding": t.n_params_non_embedding,
        "kv_bytes_per_token": t.kv_bytes_per_token, "val_loss": t.val_loss,
        "val_ppl": t.val_ppl, "decode_tokens_per_s": t.decode_tokens_per_s, "tokens": t.tokens,
        "tokens_per_s": t.tokens_per_s,
        "steps": t.steps_trained, "seed": t.seed, "data_source": t.config["data"]["source"],
    }


def export_trials(study: optuna.Study, trials: list[TrialRecord],
                  out: str | Path) -> list[dict[str, Any]]:
    """Write one run config per trial (`trial_file`) and the summary (`summary_files`)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out: {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for t in trials:
        cfg = from_dict(t.config, where=f"study {study.study_name!r} trial "
                        f"{t.number}")
        name = trial_file(study.study_name, t.number)
        dump_config(cfg, out / name)
        rows.append(summary_row(t, name))
    csv_name, json_name = summary_files(study.study_name)
    with (out / csv_name).open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=SUMMARY_FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "receiving_layers": " ".join(
                map(str, row["receiving_layers"]))})
    summary = {"study": study.study_name, "trials": rows}
    (out / json_name).write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return rows
