"""torch.compile (`train.compile`): a compiled run trains close to eager, a trial with another
fixed lambda reuses the compiled graph, `auto` keeps short runs (quickstart's) eager, and
`true` where no compiler runs is refused with one line."""

import logging
import subprocess

import pytest
import torch
import yaml
from torch._dynamo.utils import counters

from nas.config import from_dict
from nas.errors import ConfigError
from nas.training import compiling
from nas.training.compiling import should_compile
from nas.training.train import train
from tests.helpers import ROOT, env_for_cli, nas_cmd, tiny

pytestmark = pytest.mark.slow  # trains, serves or kills: make test-fast leaves it out

CPU = torch.device("cpu")


def test_a_compiled_run_trains_close_to_eager_and_a_new_lambda_does_not_recompile():
    def run(compile_: bool, lambda1: float = 0.5) -> dict:
        return train(tiny("resformer", n_layer=2, steps=6, eval_every=3, lambda1=lambda1,
                          compile=compile_), progress=False)

    eager, compiled = run(False), run(True)
    assert compiled["compiled"] and not eager["compiled"]
    assert compiled["curve"][0][1] < 5.5  # it trained: an untrained byte model scores ln 256
    for (step_a, a), (step_b, b) in zip(eager["curve"], compiled["curve"], strict=True):
        assert step_a == step_b and a == pytest.approx(b, rel=1e-4)
    graphs = counters["stats"]["unique_graphs"]
    other = run(True, lambda1=2.0)
    assert counters["stats"]["unique_graphs"] == graphs  # the compiled graph served it
    assert other["val_loss"] != compiled["val_loss"]  # with its own lambda, not a baked-in one


def quickstart_configs() -> list:
    spec = yaml.safe_load((ROOT / "studies" / "quickstart.yaml").read_text())
    space = yaml.safe_load((ROOT / "search_spaces" / "quickstart.yaml").read_text())
    base = spec["base"]
    return [from_dict({**base, "model": {**base["model"], "preset": preset}})
            for preset in space["model"]["preset"]]


def test_auto_compiles_only_runs_past_the_break_even(monkeypatch, caplog):
    def unprobed(device_type):
        raise AssertionError("a run below the break-even needs no compiler")

    monkeypatch.setattr(compiling, "compiler_problem", unprobed)
    for cfg in quickstart_configs():
        assert not should_compile(cfg, CPU)
    long = tiny(n_layer=6, d_model=128, seq_len=128, batch_size=16, steps=100_000)
    assert compiling.training_flops(long) > compiling.AUTO_COMPILE_FLOPS["cpu"]
    monkeypatch.setattr(compiling, "compiler_problem", lambda device_type: None)
    assert should_compile(long, CPU)

    monkeypatch.setattr(compiling, "compiler_problem", lambda device_type: "no C++ compiler")
    with caplog.at_level(logging.WARNING, logger="nas.training.compiling"):
        assert not should_compile(long, CPU)
    assert "training eagerly" in caplog.text and "no C++ compiler" in caplog.text
    with pytest.raises(ConfigError, match="train.compile: true, but torch.compile cannot run"):
        should_compile(tiny(compile=True), CPU)


def test_compile_true_without_a_compiler_is_refused(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny(steps=2, compile=True).to_dict()))
    # No C++ compiler for Inductor, and no cached kernel that would spare it one.
    env = {**env_for_cli(), "CXX": str(tmp_path / "no-such-g++"),
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    proc = subprocess.run(nas_cmd("train", str(config), "--out", str(tmp_path / "out")),
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("nas train: error: train.compile: true, but torch.compile cannot "
                           "run on cpu here")
    assert not (tmp_path / "out").exists()
