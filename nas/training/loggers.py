"""Where `nas train` logs a run (`train.logger`), through Lightning's own loggers:

- `csv` (the default): `metrics.csv` in the run folder, beside the `config.yaml` it was run with;
- `tensorboard`: event files in the run folder (`tensorboard --logdir runs/train`; the
  `tensorboard` extra);
- `mlflow`: one MLflow run per `nas train`, named after its folder, in `$MLFLOW_TRACKING_URI`,
  else in the local file `runs/mlflow.db` with its artifacts in `runs/mlartifacts` (the `mlflow`
  extra, whose `mlflow ui` reads them);
- `wandb`: one Weights & Biases run per `nas train`, named after its folder, in project
  `$WANDB_PROJECT` (else resformer-nas), written under `$WANDB_DIR/wandb` (else
  `runs/wandb`); offline unless `$WANDB_MODE` says otherwise (`wandb sync` uploads it later;
  the `wandb` extra).

Each logs the losses and every coefficient (`nas.training.lit`), the learning rate (Lightning's
LearningRateMonitor) and the training throughput in tokens per second (`Throughput`) as curves,
the resolved config as hyperparameters, and at the end the run's results (`RESULTS`, from
metrics.json) at its last step (`log_results`): in TensorBoard's HParams tab beside the config,
MLflow with config.yaml and metrics.json as artifacts, wandb in the run's summary. Trials of a
study log nothing here: their curves, coefficients and throughput are in the study's storage.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import (
    CSVLogger,
    Logger,
    MLFlowLogger,
    TensorBoardLogger,
    WandbLogger,
)

from nas.config import RunConfig
from nas.errors import ConfigError, first_line
from nas.run_folder import CONFIG_FILE, METRICS_FILE

MLFLOW_EXPERIMENT = "resformer-nas"
MLFLOW_DEFAULT_DB = Path("runs") / "mlflow.db"
MLFLOW_DEFAULT_ARTIFACTS = Path("runs") / "mlartifacts"
WANDB_PROJECT = "resformer-nas"
WANDB_DEFAULT_DIR = Path("runs")  # wandb writes its runs into <dir>/wandb
# What a run's logger gets at its end (metrics.json's names): what it cost and what it scored.
RESULTS = ("val_loss", "test_loss", "n_params", "kv_bytes_per_token", "decode_tokens_per_s")
# The files of a run folder an MLflow run carries as artifacts.
ARTIFACTS = (CONFIG_FILE, METRICS_FILE)

log = logging.getLogger(__name__)


def mlflow_uri() -> str | None:
    """$MLFLOW_TRACKING_URI (None: it is set), else a SQLite file under runs/: a local file,
    as MLflow's `file:` folder store was, which MLflow 3 refuses (it is in maintenance mode)
    unless MLFLOW_ALLOW_FILE_STORE=true."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return None  # MLflow reads it, with the artifact store its server chooses
    MLFLOW_DEFAULT_DB.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{MLFLOW_DEFAULT_DB.resolve()}"


def run_logger(cfg: RunConfig, folder: Path, name: str) -> Logger:
    """The logger `cfg.train.logger` names, writing into the run `folder` (named `name`)."""
    kind = cfg.train.logger
    try:
        if kind == "csv":
            return CSVLogger(folder, name="", version="")
        if kind == "tensorboard":
            logger: Logger = TensorBoardLogger(folder, name="", version="",
                                               default_hp_metric=False)
        elif kind == "mlflow":
            logging.getLogger("mlflow").setLevel(logging.WARNING)  # its database set-up lines
            uri = mlflow_uri()
            logger = MLFlowLogger(
                experiment_name=MLFLOW_EXPERIMENT, run_name=name,
                tracking_uri=uri or os.environ["MLFLOW_TRACKING_URI"],
                # beside the database, not wherever `nas train` runs (MLflow's ./mlruns)
                artifact_location=(MLFLOW_DEFAULT_ARTIFACTS.resolve().as_uri()
                                   if uri else None))
        else:
            # not in the run folder, which is renamed when it is done: the path wandb gives
            # for `wandb sync` must stay true
            save_dir = Path(os.environ.get("WANDB_DIR", WANDB_DEFAULT_DIR))
            save_dir.mkdir(parents=True, exist_ok=True)
            logger = WandbLogger(name=name, save_dir=save_dir,
                                 project=os.environ.get("WANDB_PROJECT", WANDB_PROJECT),
                                 offline=os.environ.get("WANDB_MODE", "offline") == "offline")
    except ModuleNotFoundError:  # what Lightning raises for a logger's missing package
        raise ConfigError(f"train.logger: {kind} needs the {kind} package: pip install "
                          f"'resformer-nas[{kind}]'") from None
    try:
        logger.log_hyperparams(cfg.to_dict())  # the first write: a store that cannot be opened
    except Exception as exc:  # MLflow's errors share no base class importable without it
        first = first_line(exc)
        raise ConfigError(f"train.logger: {kind}: cannot log there: {first}") from None
    return logger


def flat_config(cfg: RunConfig) -> dict[str, bool | int | float | str]:
    """The resolved config as `section/key` (Lightning's and so MLflow's names) -> a value of
    the types TensorBoard's HParams tab takes: numbers, text and booleans as they are, lists
    and None as text."""
    def flat(prefix: str, value: Any) -> Iterator[tuple[str, bool | int | float | str]]:
        if isinstance(value, dict):
            for key, inner in value.items():
                yield from flat(f"{prefix}/{key}" if prefix else str(key), inner)
        else:
            yield prefix, value if isinstance(value, (bool, int, float, str)) else str(value)

    return dict(flat("", cfg.to_dict()))


def log_results(logger: Logger, cfg: RunConfig, metrics: dict[str, Any], folder: Path,
                step: int) -> None:
    """Give the run's logger its results (`RESULTS` of `metrics`, at `step`) once the run
    folder holds config.yaml and metrics.json, and close it (see the module docstring). The
    run is whole by then: a store that fails now costs a warning, never the run."""
    results = {name: float(metrics[name]) for name in RESULTS if metrics.get(name) is not None}
    try:
        if isinstance(logger, TensorBoardLogger):
            # The HParams tab: the config beside these results, in the run's own folder
            # ("."), whose scalars add_hparams writes too.
            logger.experiment.add_hparams(flat_config(cfg), results, run_name=".",
                                          global_step=step)
            logger.experiment.close()
            return
        logger.log_metrics(results, step)
        if isinstance(logger, MLFlowLogger):
            for name in ARTIFACTS:
                logger.experiment.log_artifact(logger.run_id, str(folder / name))
        elif isinstance(logger, WandbLogger):
            logger.experiment.summary.update(results)
            logger.experiment.finish()  # Lightning leaves a wandb run open until the exit
        logger.save()
    except Exception as exc:  # each logger's own errors: they share no base class
        log.warning("train.logger: %s: the run's results did not reach it (%s); they are in "
                    "its metrics.json", cfg.train.logger, first_line(exc))


class Throughput(pl.Callback):
    """Logs `tokens_per_s` over the steps since it last logged, on the logger's cadence: the
    training steps' own time (`seconds`, the run's step timer), as metrics.json counts it."""

    def __init__(self, seconds: Callable[[], float], tokens_per_step: int):
        self.seconds, self.tokens_per_step = seconds, tokens_per_step
        self._since = (0, 0.0)  # (step, seconds) when it last logged

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._since = (trainer.global_step, self.seconds())  # a resumed run starts later

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *_) -> None:
        # After the optimizer step and before the logger connector flushes: global_step is
        # the step Lightning's `should_update_logs` tests, so the value is written at once.
        step = trainer.global_step
        if step % trainer.log_every_n_steps:
            return
        steps, seconds = step - self._since[0], self.seconds() - self._since[1]
        if steps > 0 and seconds > 0:
            pl_module.log("tokens_per_s", steps * self.tokens_per_step / seconds)
        self._since = (step, self.seconds())


def logging_callbacks(seconds: Callable[[], float], tokens_per_step: int) -> list[pl.Callback]:
    """The callbacks that log beside the module's own metrics (the trainer needs a logger)."""
    return [LearningRateMonitor(logging_interval="step"), Throughput(seconds, tokens_per_step)]
