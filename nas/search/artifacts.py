"""Trial artifacts: each trial's run config and validation curve as files in an Optuna
artifact store, so optuna-dashboard shows and serves them next to the trial.

The store is a folder next to the study's storage: `sqlite:///runs/X.db` and `journal:runs/X.log`
(or the plain path `runs/X.log`) use `runs/X-artifacts/`; other storages (PostgreSQL) use
`runs/<study name>-artifacts/` unless the study spec names a folder (`artifacts: PATH`, shared
by every worker). The checkpoints of running trials live in its `checkpoints/` folder
(`checkpoint_folder`). Knows nothing of torch.
"""

from __future__ import annotations

import csv
import logging
import tempfile
from pathlib import Path
from typing import Any

import optuna
from optuna.artifacts import FileSystemArtifactStore, upload_artifact

from nas.config import dump_config, from_dict
from nas.run_folder import CONFIG_FILE
from nas.search.storage import storage_file

logger = logging.getLogger(__name__)

CURVE_FILE = "curve.csv"
CHECKPOINTS = "checkpoints"  # under the artifacts folder: each running trial's, by study


def artifact_dir(storage_url: str, study_name: str, override: str | Path | None = None) -> Path:
    """The artifact folder for a study stored at `storage_url` (see the module docstring)."""
    if override:
        return Path(str(override))

    path = storage_file(storage_url)
    if path is not None:
        return path.with_name(f"{path.stem}-artifacts")
    return Path("runs") / f"{study_name}-artifacts"


def checkpoint_folder(artifacts: str | Path, study_name: str, first_attempt: int) -> Path:
    """Where the attempts at one trial keep their checkpoints (`train.checkpoint_every`):
    `<artifacts>/checkpoints/<study>/trial-NNNN/`, named after the first attempt's number (a
    retry of a trial whose worker died is a new trial that records it). Beside the uploaded
    artifacts, so a worker on another machine that shares the artifact folder resumes them."""
    return Path(artifacts) / CHECKPOINTS / study_name / f"trial-{first_attempt:04d}"


def artifact_store(folder: str | Path) -> FileSystemArtifactStore:
    """A file-system artifact store in `folder`, created if missing."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(str(folder))


def upload_trial_artifacts(trial: optuna.Trial, config: dict[str, Any] | None,
                           curve: list[list[float]], folder: str | Path | None) -> None:
    """Upload the trial's run config (config.yaml, what `nas train` reads) and its validation
    curve (curve.csv: step,val_loss). Call while the trial runs: a finished trial is read-only.

    A failing upload is logged and never fails the trial."""
    if folder is None or config is None:
        return
    try:
        store = artifact_store(folder)
        with tempfile.TemporaryDirectory(prefix="nas-artifacts-") as tmp:
            cfg_path = Path(tmp) / CONFIG_FILE
            dump_config(from_dict(config, where=f"trial {trial.number}"), cfg_path)
            upload_artifact(artifact_store=store, file_path=str(cfg_path), study_or_trial=trial,
                            mimetype="text/plain")
            if curve:
                curve_path = Path(tmp) / CURVE_FILE
                with curve_path.open("w", newline="", encoding="utf-8") as f:
                    writer = csv.writer(f)
                    writer.writerow(["step", "val_loss"])
                    writer.writerows(curve)
                upload_artifact(artifact_store=store, file_path=str(curve_path),
                                study_or_trial=trial, mimetype="text/csv")
    except Exception as exc:  # artifacts are a convenience; the measurement is what counts
        logger.warning("trial %d: could not upload artifacts to %s: %s", trial.number, folder, exc)
