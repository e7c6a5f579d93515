"""train.logger: csv, tensorboard, mlflow and wandb each record the losses, the learning rate,
the throughput and every coefficient of a `nas train` run, and the last three its results and
config, read back here with each one's own library (MLflow's through its UI server too); a
logger whose package is missing is one line, before anything trains."""

import csv
import json
import logging
import struct
import subprocess
import sys
import urllib.request

import pytest

from nas.errors import ConfigError
from nas.training import loggers
from nas.training.train import train
from tests.helpers import free_port, tiny
from tests.processes import wait_for

pytestmark = pytest.mark.slow  # trains, serves or kills: make test-fast leaves it out

# learnable: coefficients of its own on layers 1 and 2
EXPECTED = {"train_loss", "val_loss", "tokens_per_s", "lr-AdamW/pg1", "coef/L1.lambda1",
            "coef/L2.lambda2"}


def run(tmp_path, logger):
    cfg = tiny("learnable", steps=6, eval_every=3, logger=logger, compile=False)
    train(cfg, tmp_path / "run", progress=False)
    return tmp_path / "run"


def results(folder):
    """What metrics.json says of loggers.RESULTS (all set: the built-in corpus has a test
    split)."""
    metrics = json.loads((folder / "metrics.json").read_text())
    assert all(metrics[name] is not None for name in loggers.RESULTS)
    return {name: float(metrics[name]) for name in loggers.RESULTS}


def test_csv_writes_every_metric_to_metrics_csv(tmp_path):
    folder = run(tmp_path, "csv")
    with (folder / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert EXPECTED <= set(rows[0])
    throughput = [float(r["tokens_per_s"]) for r in rows if r["tokens_per_s"]]
    assert throughput and all(v > 0 for v in throughput)
    lrs = [float(r["lr-AdamW/pg1"]) for r in rows if r["lr-AdamW/pg1"]]
    assert len(set(lrs)) > 1  # the warmup and the decay, step by step


def test_tensorboard_writes_every_metric_and_its_results_beside_the_config(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata

    folder = run(tmp_path, "tensorboard")
    acc = EventAccumulator(str(folder))  # the folder, as `tensorboard --logdir` reads a run
    acc.Reload()
    assert EXPECTED | set(loggers.RESULTS) <= set(acc.Tags()["scalars"])
    steps = json.loads((folder / "metrics.json").read_text())["steps"]
    for name, value in results(folder).items():
        last = acc.Scalars(name)[-1]
        assert (last.step, last.value) == (steps, pytest.approx(value, rel=1e-6)), name
    # the HParams tab: the flattened config, with the results as its metrics
    content = acc.PluginTagToContent(metadata.PLUGIN_NAME)
    experiment = metadata.parse_experiment_plugin_data(content[metadata.EXPERIMENT_TAG])
    session = metadata.parse_session_start_info_plugin_data(
        content[metadata.SESSION_START_INFO_TAG])
    assert {m.name.tag for m in experiment.metric_infos} == set(loggers.RESULTS)
    hparams = {key: value.ListFields()[0][1] for key, value in session.hparams.items()}
    assert hparams["value_residual/mode"] == "learnable"
    assert hparams["train/steps"] == 6 and hparams["model/n_layer"] == 3
    assert hparams["data/test_fraction"] == "None"  # None and lists as text


def mlflow_run(tmp_path, monkeypatch):
    """A run logged to MLflow's default store (runs/mlflow.db under the working folder), and
    a client of that store."""
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    folder = run(tmp_path, "mlflow")
    assert (tmp_path / "runs" / "mlflow.db").is_file()
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(loggers.MLFLOW_EXPERIMENT)
    [logged] = client.search_runs([experiment.experiment_id])
    return folder, client, logged


def test_mlflow_logs_curves_results_config_and_artifacts_to_a_local_store(tmp_path,
                                                                         monkeypatch):
    folder, client, logged = mlflow_run(tmp_path, monkeypatch)
    assert logged.info.run_name == "run" and logged.info.status == "FINISHED"
    assert EXPECTED <= set(logged.data.metrics)
    assert {name: logged.data.metrics[name] for name in loggers.RESULTS} == pytest.approx(
        results(folder), rel=1e-6)
    assert logged.data.params["value_residual/mode"] == "learnable"  # the resolved config
    assert logged.data.params["train/steps"] == "6"
    assert len(client.get_metric_history(logged.info.run_id, "train_loss")) > 1
    # config.yaml and metrics.json as artifacts, beside the database rather than in ./mlruns
    assert logged.info.artifact_uri.startswith((tmp_path / "runs" / "mlartifacts").as_uri())
    assert {a.path for a in client.list_artifacts(logged.info.run_id)} == set(loggers.ARTIFACTS)
    for name in loggers.ARTIFACTS:
        copy = client.download_artifacts(logged.info.run_id, name, str(tmp_path))
        assert open(copy, "rb").read() == (folder / name).read_bytes()


def test_a_store_that_fails_at_the_end_costs_a_warning_not_the_run(tmp_path, monkeypatch,
                                                                   caplog):
    """runs/mlartifacts is a file: MLflow takes the parameters and curves, then cannot store
    the artifacts; the trained run is kept whole all the same."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "mlartifacts").write_text("not a folder")
    with caplog.at_level(logging.WARNING, logger="nas.training.loggers"):
        folder = run(tmp_path, "mlflow")
    assert {"config.yaml", "metrics.json", "model.pt"} <= {p.name for p in folder.iterdir()}
    [warning] = [r.getMessage() for r in caplog.records if r.name == "nas.training.loggers"]
    assert warning.startswith("train.logger: mlflow: the run's results did not reach it (")
    assert warning.endswith("); they are in its metrics.json")


def test_mlflows_own_ui_reads_the_store_it_wrote(tmp_path, monkeypatch):
    """`mlflow ui` of the `mlflow` extra (the full package, the client's version) serves the
    run, its results and its artifacts from runs/mlflow.db."""
    folder, _, logged = mlflow_run(tmp_path, monkeypatch)
    port, log = free_port(), tmp_path / "ui.log"
    ui = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri",
                           f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}", "--host",
                           "127.0.0.1", "--port", str(port)],
                          stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=tmp_path)
    url = f"http://127.0.0.1:{port}"

    def get(path, data=None):
        request = urllib.request.Request(
            url + path, data=None if data is None else json.dumps(data).encode(),
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.read()

    def up():
        try:
            return b"MLflow" in get("/")  # the UI's page
        except OSError:
            return False

    try:
        wait_for(up, ui, log, "the MLflow UI")
        found = json.loads(get("/ajax-api/2.0/mlflow/runs/search", {
            "experiment_ids": [logged.info.experiment_id]}))["runs"]
        assert [r["info"]["run_id"] for r in found] == [logged.info.run_id]
        metrics = {m["key"]: m["value"] for m in found[0]["data"]["metrics"]}
        assert {name: metrics[name] for name in loggers.RESULTS} == pytest.approx(
            results(folder), rel=1e-6)
        files = json.loads(get(f"/ajax-api/2.0/mlflow/artifacts/list?run_id="
                               f"{logged.info.run_id}"))["files"]
        assert {f["path"] for f in files} == set(loggers.ARTIFACTS)
        assert get(f"/get-artifact?path=config.yaml&run_uuid={logged.info.run_id}") == (
            folder / "config.yaml").read_bytes()
    finally:
        ui.terminate()
        ui.wait(timeout=60)


def wandb_records(path):
    """The records of a wandb run file (`run-<id>.wandb`), parsed with wandb's own protobuf
    schema. wandb has no offline reader in Python any more (its Go core writes and reads the
    file): the file is LevelDB's log format after a 7-byte header, records cut into 32 KiB
    blocks, each piece headed by a checksum, its length and whether it is whole, first,
    middle or last."""
    from wandb.proto import wandb_internal_pb2

    data, block, head = path.read_bytes(), 32768, 7
    assert data[:4] == b":W&B"
    records, pieces, pos = [], b"", head
    while pos + head <= len(data):
        left = block - pos % block
        if left < head:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + head])
        pieces += data[pos + head:pos + head + length]
        pos += head + length
        if kind in (1, 4):  # whole, or the last piece
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            records.append(record)
            pieces = b""
    return records


def items(update):
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json)
            for item in update}


def test_wandb_logs_offline_curves_results_and_config(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline unless it says otherwise
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))
    monkeypatch.chdir(tmp_path)  # the default: runs/wandb under the working folder
    folder = run(tmp_path, "wandb")
    [path] = (tmp_path / "runs" / "wandb").glob("offline-run-*/run-*.wandb")
    records = wandb_records(path)
    kinds = [r.WhichOneof("record_type") for r in records]
    [started] = [r.run for r in records if r.HasField("run")]
    assert (started.display_name, started.project) == ("run", loggers.WANDB_PROJECT)
    assert "exit" in kinds  # finished, not left open until the process ends
    config = {}
    for r in records:
        if r.HasField("config"):
            config.update(items(r.config.update))
    assert config["value_residual"]["mode"] == "learnable" and config["train"]["steps"] == 6
    history = [items(r.history.item) for r in records if r.HasField("history")]
    assert EXPECTED <= set().union(*history)
    steps = json.loads((folder / "metrics.json").read_text())["steps"]
    final = next(h for h in reversed(history) if "test_loss" in h)
    assert {name: final[name] for name in loggers.RESULTS} == pytest.approx(results(folder))
    assert final["trainer/global_step"] == steps
    summary = {}
    for r in records:
        if r.HasField("summary"):
            summary.update(items(r.summary.update))
    assert {name: summary[name] for name in loggers.RESULTS} == pytest.approx(results(folder))
    assert not list(folder.glob("wandb"))  # nothing of wandb's in the run folder


@pytest.mark.parametrize("kind,cls", [("tensorboard", "TensorBoardLogger"),
                                      ("mlflow", "MLFlowLogger"), ("wandb", "WandbLogger")])
def test_a_logger_without_its_package_is_one_line_before_training(tmp_path, monkeypatch, kind,
                                                                   cls):
    def missing(*args, **kwargs):
        raise ModuleNotFoundError(f"No module named '{kind}'")

    monkeypatch.setattr(loggers, cls, missing)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=rf"train.logger: {kind} needs the {kind} "
                                          rf"package: pip install 'resformer-nas\[{kind}\]'"):
        run(tmp_path, kind)
    assert not (tmp_path / "run").exists()


def test_an_unknown_logger_is_refused_by_the_config():
    with pytest.raises(ConfigError, match="train.logger: unknown logger 'neptune'; allowed: "
                                          "csv, tensorboard, mlflow, wandb"):
        tiny(logger="neptune")
