"""Where `nas train` logs a run (`train.logger`), through Lightning's own loggers:

- `csv` (the default): `metrics.csv` in the run folder, beside the `config.yaml` it was run with;
- `tensorboard`: event files in the run folder, with the resolved config as hyperparameters
  (`tensorboard --logdir runs/train`; the `tensorboard` extra);
- `mlflow`: one MLflow run per `nas train`, named after its folder, with the resolved config as
  its parameters, in `$MLFLOW_TRACKING_URI`, else in the local file `runs/mlflow.db` (the
  `mlflow` extra).

Each logs the losses and every coefficient (`nas.lit`), the learning rate (Lightning's
LearningRateMonitor) and the training throughput in tokens per second (`Throughput`). Trials of a
study log nothing here: their curves, coefficients and throughput are in the study's storage.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger, TensorBoardLogger

from .config import ConfigError, RunConfig
from .errors import first_line

MLFLOW_EXPERIMENT = "resformer-nas"
MLFLOW_DEFAULT_DB = Path("runs") / "mlflow.db"


def mlflow_uri() -> str:
    """$MLFLOW_TRACKING_URI, else a SQLite file under runs/: a local file, as MLflow's `file:`
    folder store was, which MLflow 3 refuses (it is in maintenance mode) unless
    MLFLOW_ALLOW_FILE_STORE=true."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
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
        else:
            logging.getLogger("mlflow").setLevel(logging.WARNING)  # its database set-up lines
            logger = MLFlowLogger(experiment_name=MLFLOW_EXPERIMENT, run_name=name,
                                  tracking_uri=mlflow_uri())
    except ModuleNotFoundError:  # what Lightning raises for a logger's missing package
        raise ConfigError(f"train.logger: {kind} needs the {kind} package: pip install "
                          f"'resformer-nas[{kind}]'") from None
    try:
        logger.log_hyperparams(cfg.to_dict())  # the first write: a store that cannot be opened
    except Exception as exc:  # MLflow's errors share no base class importable without it
        first = first_line(exc)
        raise ConfigError(f"train.logger: {kind}: cannot log there: {first}") from None
    return logger


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
