"""train.logger: csv, tensorboard and mlflow each record the losses, the learning rate, the
throughput and every coefficient of a `nas train` run; a logger whose package is missing is
one line, before anything trains."""

import csv

import pytest

from nas import loggers
from nas.config import ConfigError
from nas.train import train
from tests.helpers import tiny

# learnable: coefficients of its own on layers 1 and 2
EXPECTED = {"train_loss", "val_loss", "tokens_per_s", "lr-AdamW/pg1", "coef/L1.lambda1",
            "coef/L2.lambda2"}


def run(tmp_path, logger):
    cfg = tiny("learnable", steps=6, eval_every=3, logger=logger, compile=False)
    train(cfg, tmp_path / "run", progress=False)
    return tmp_path / "run"


def test_csv_writes_every_metric_to_metrics_csv(tmp_path):
    folder = run(tmp_path, "csv")
    with (folder / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert EXPECTED <= set(rows[0])
    throughput = [float(r["tokens_per_s"]) for r in rows if r["tokens_per_s"]]
    assert throughput and all(v > 0 for v in throughput)
    lrs = [float(r["lr-AdamW/pg1"]) for r in rows if r["lr-AdamW/pg1"]]
    assert len(set(lrs)) > 1  # the warmup and the decay, step by step


def test_tensorboard_writes_event_files_with_every_metric(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder = run(tmp_path, "tensorboard")
    events = list(folder.glob("events.out.tfevents.*"))
    assert events
    tags = set()
    for path in events:
        acc = EventAccumulator(str(path))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert EXPECTED <= tags


def test_mlflow_logs_a_run_to_a_local_file_store_by_default(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # the default store is runs/mlflow.db under the working folder
    run(tmp_path, "mlflow")
    assert (tmp_path / "runs" / "mlflow.db").is_file()
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(loggers.MLFLOW_EXPERIMENT)
    [logged] = client.search_runs([experiment.experiment_id])
    assert logged.info.run_name == "run" and logged.info.status == "FINISHED"
    assert EXPECTED <= set(logged.data.metrics)
    assert logged.data.params["value_residual/mode"] == "learnable"  # the resolved config
    assert logged.data.params["train/steps"] == "6"
    assert len(client.get_metric_history(logged.info.run_id, "train_loss")) > 1


def test_a_logger_without_its_package_is_one_line_before_training(tmp_path, monkeypatch):
    def missing(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'tensorboard'")

    monkeypatch.setattr(loggers, "TensorBoardLogger", missing)
    with pytest.raises(ConfigError, match=r"train.logger: tensorboard needs the tensorboard "
                                          r"package: pip install 'resformer-nas\[tensorboard\]'"):
        run(tmp_path, "tensorboard")
    assert not (tmp_path / "run").exists()


def test_an_unknown_logger_is_refused_by_the_config():
    with pytest.raises(ConfigError, match="train.logger: unknown logger 'wandb'; allowed: csv, "
                                          "tensorboard, mlflow"):
        tiny(logger="wandb")
