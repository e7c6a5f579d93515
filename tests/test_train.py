"""Training through the Lightning module, on real data."""

import json
import subprocess

import numpy as np
import pytest
import yaml

from nas.config import from_dict
from nas.training.data import write_shard
from nas.training.lit import DivergenceError
from nas.training.train import train
from tests.helpers import env_for_cli, nas_cmd, tiny

pytestmark = pytest.mark.slow  # trains, serves or kills: make test-fast leaves it out


def test_a_few_dozen_steps_lower_the_loss():
    m = train(tiny("learnable", steps=40, lr=1e-2, eval_every=10), progress=False)
    curve = [v for _, v in m["curve"]]
    assert len(curve) == 4 and m["steps"] == 40
    assert curve[-1] < curve[0] - 0.1
    assert m["val_loss"] < 3.5  # uniform over 256 bytes is 5.55
    assert m["tokens"] == 40 * 8 * 16 and m["tokens_per_s"] > 0
    # learned coefficients moved from their init and are reported per layer
    assert set(m["coefficients"]) == {"L1.lambda1", "L1.lambda2", "L2.lambda1", "L2.lambda2"}
    assert m["coefficients"]["L1.lambda1"] != 0.5


def test_training_is_deterministic():
    a = train(tiny("gated", steps=6), progress=False)
    b = train(tiny("gated", steps=6), progress=False)
    assert a["val_loss"] == b["val_loss"]
    c = train(tiny("gated", steps=6, seed=1), progress=False)
    assert c["val_loss"] != a["val_loss"]


def test_validation_follows_eval_every_without_changing_the_training():
    """Validation runs every eval_every steps and at the last step; when it runs changes
    neither the batches nor the weights, so both runs end on the same losses."""
    a = train(tiny("resformer", steps=10, eval_every=4), progress=False)
    b = train(tiny("resformer", steps=10, eval_every=5), progress=False)
    assert [step for step, _ in a["curve"]] == [4, 8, 10]
    assert [step for step, _ in b["curve"]] == [5, 10]
    assert (a["val_loss"], a["test_loss"]) == (b["val_loss"], b["test_loss"])


def test_divergence_names_the_step():
    with pytest.raises(DivergenceError, match=r"diverged at step \d+"):
        train(tiny("resformer", steps=30, lr=1e4, grad_clip=1e9, warmup_steps=0),
              progress=False)


def test_text_file_and_bin_shards(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_bytes(("the quick brown fox jumps over the lazy dog. " * 200).encode())
    cfg = tiny("resformer", steps=30, lr=1e-2, eval_every=10)
    cfg.data.source = str(text)
    # An untrained byte model scores about ln 256 = 5.55, the sentence's 27 distinct bytes
    # used uniformly ln 27 = 3.30: below that, it learned which byte follows which.
    assert train(cfg, progress=False)["val_loss"] < 3.0
    rng = np.random.default_rng(0)
    for i in range(2):
        write_shard(tmp_path / f"shard_{i}.bin", rng.integers(0, 1000, size=5000))
    cfg = tiny("learnable_plus", steps=4)
    cfg.data.source = str(tmp_path / "shard_*.bin")
    cfg.model.vocab_size = 1000
    m = train(cfg, progress=False)
    assert np.log(1000) - 0.5 < m["val_loss"] < np.log(1000) + 1


def test_cli_train_writes_metrics(tmp_path):
    cfg = tiny("dense", steps=5).to_dict()
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run(nas_cmd("train", str(path), "--out", str(tmp_path / "out")),
                          capture_output=True, text=True, env=env_for_cli(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    for key in ("val_loss", "n_params", "n_params_non_embedding", "tokens", "tokens_per_s",
                "coefficients", "curve"):
        assert key in metrics
    assert "val_loss" in proc.stdout
    assert "Training:" not in proc.stdout  # no progress bar into a pipe
    assert (tmp_path / "out" / "metrics.csv").exists()
    assert yaml.safe_load((tmp_path / "out" / "config.yaml").read_text()) == cfg


def test_curve_batches_cheapen_the_curve_and_leave_every_reported_loss_as_it_was():
    base = {"model": {"n_layer": 2, "d_model": 16, "n_head": 2, "seq_len": 16},
            "train": {"steps": 30, "batch_size": 4, "eval_batches": 6, "eval_every": 10}}
    full = train(from_dict(base), progress=False)
    cheap = train(from_dict({**base, "train": {**base["train"], "curve_batches": 2}}),
                  progress=False)
    assert (cheap["val_loss"], cheap["test_loss"]) == (full["val_loss"], full["test_loss"])
    assert len(cheap["val_batch_losses"]) == 6  # the final validation scores every batch
    # the points before the last are read off 2 batches: other numbers, the same steps
    assert [s for s, _ in cheap["curve"]] == [s for s, _ in full["curve"]] == [10, 20, 30]
    assert cheap["curve"][0][1] != full["curve"][0][1]
    assert cheap["curve"][-1] == full["curve"][-1]
