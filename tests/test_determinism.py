"""The determinism docs/configuration.md promises: one config trained twice on the CPU with the
same torch build, CPU instruction set and thread count gives the same losses bit for bit, in one
process and in another; a run records those three (`numerics` in metrics.json)."""

import json
import subprocess

import pytest
import torch

from nas.config import dump_config
from nas.training.train import train
from tests.helpers import env_for_cli, nas_cmd, tiny

pytestmark = pytest.mark.slow  # trains, serves or kills: make test-fast leaves it out

LOSSES = ("val_loss", "test_loss", "curve", "val_batch_losses", "test_batch_losses")


def losses(metrics: dict) -> dict:
    return {key: metrics[key] for key in LOSSES}


def test_a_config_trains_to_the_same_losses_in_this_process_and_in_another(tmp_path):
    cfg = tiny("svformer", layers=[1, 2], steps=12, eval_every=4)
    first = train(cfg, progress=False)
    assert losses(train(cfg, progress=False)) == losses(first)

    config = tmp_path / "run.yaml"
    dump_config(cfg, config)
    threads = torch.get_num_threads()
    proc = subprocess.run(nas_cmd("train", str(config), "--out", str(tmp_path / "out")),
                          env={**env_for_cli(), "OMP_NUM_THREADS": str(threads)},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert losses(metrics) == losses(first)  # read back from JSON: floats exactly as trained
    assert metrics["numerics"] == first["numerics"] == {
        "torch": torch.__version__, "device": "cpu",
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": threads}
