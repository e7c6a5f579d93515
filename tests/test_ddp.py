"""Lightning DDP on the CPU (gloo, two processes), through `nas train` as a user runs it:
the run ends at the losses of one process training the same global batch, writes one run folder
from rank 0, and a DDP run killed with SIGKILL resumes from its checkpoint to the uninterrupted
DDP run's result. Real processes and real Lightning: Lightning's launcher starts rank 1 by
running the same command again."""

import json
import os
import signal
import subprocess

import pytest
import yaml

from nas.training.checkpoint import LAST, checkpoint_dir
from tests.helpers import env_for_cli, nas_cmd, tiny
from tests.processes import wait_for

pytestmark = pytest.mark.slow  # trains in several processes and kills them

DDP = {"accelerator": "cpu", "devices": 2, "strategy": "ddp"}
ONE = {"accelerator": "cpu", "devices": 1, "strategy": "auto"}
# What must agree between two runs that trained on the same tokens.
LOSSES = ("val_loss", "val_loss_se", "test_loss", "test_loss_se")
SAME = ("steps", "tokens", "tokens_per_model_param", "n_params", "resumed_step")
# One process and two sum a step's gradient in another order (one sum over the batch, or one
# per half and gloo's all-reduce of the two): float32 rounding (2**-24 relative an operation),
# which the steps carry into the loss and which grows with them. Measured on this machine's
# AVX512 kernels: 0 difference after these 24 steps, 7e-6 (val) and 2.6e-5 (test) after 200
# steps of batch 16. A wrong split is three orders above 1e-5: training on half the batch moves
# this run's val_loss by 4%, another seed's batches by 1%, and each of its two validation
# batches is 1.7% from their mean (a rank's half of the validation alone).
RELATIVE = 1e-5


def write_config(path, steps: int, **train) -> str:
    cfg = tiny("learnable", n_layer=2, d_model=32, batch_size=8, steps=steps, **train)
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return str(path)


def env() -> dict:
    # one thread a process, as in every comparison of losses (docs/configuration.md, Determinism)
    return {**env_for_cli(), "OMP_NUM_THREADS": "1"}


def nas_train(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(nas_cmd("train", *args, "--no-progress"), capture_output=True,
                          text=True, env=env(), timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def metrics(out) -> dict:
    return json.loads((out / "metrics.json").read_text())


def assert_one_run_folder(tmp_path, out, killed: int | None = None) -> None:
    """Rank 0 wrote the run folder, whole; no other process made a staging folder (but the
    rank 0 `killed`, whose SIGKILL leaves its own, as one process's does)."""
    assert sorted(p.name for p in out.iterdir()) == [
        "config.yaml", "metrics.csv", "metrics.json", "model.pt"]
    left = [p.name for p in tmp_path.iterdir() if ".incomplete-" in p.name]
    assert left == ([] if killed is None else [f"{out.name}.incomplete-{killed}"])


def test_ddp_on_two_processes_ends_at_the_losses_of_one(tmp_path):
    steps = 24
    one = nas_train(write_config(tmp_path / "one.yaml", steps, eval_every=6, **ONE),
                    "--out", str(tmp_path / "one"))
    two = nas_train(write_config(tmp_path / "two.yaml", steps, eval_every=6, **DDP),
                    "--out", str(tmp_path / "two"))
    a, b = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert "processes" not in a["numerics"] and b["numerics"]["processes"] == 2  # it was DDP
    for key in LOSSES:
        assert b[key] == pytest.approx(a[key], rel=RELATIVE), key
    assert {k: b[k] for k in SAME} == {k: a[k] for k in SAME}
    # every validation, each batch of the last one and of the test: all of them, in order
    assert [s for s, _ in b["curve"]] == [s for s, _ in a["curve"]] == [6, 12, 18, 24]
    assert [v for _, v in b["curve"]] == pytest.approx([v for _, v in a["curve"]], rel=RELATIVE)
    for key in ("val_batch_losses", "test_batch_losses"):
        assert len(b[key]) == len(a[key]) == 2
        assert b[key] == pytest.approx(a[key], rel=RELATIVE, abs=1e-5), key  # rounded to 5
    assert b["coefficients"] == pytest.approx(a["coefficients"], rel=RELATIVE)
    assert_one_run_folder(tmp_path, tmp_path / "two")
    # one process speaks: the start line and the result once, not once per rank
    assert [two.stdout.count(w) for w in ("training ", "val_loss ")] == [1, 1], two.stdout
    assert [one.stdout.count(w) for w in ("training ", "val_loss ")] == [1, 1]
    print(f"val_loss one {a['val_loss']!r} ddp {b['val_loss']!r}; "
          f"test_loss one {a['test_loss']!r} ddp {b['test_loss']!r}")


def test_a_killed_ddp_run_resumes_to_the_uninterrupted_result(tmp_path):
    # Long enough that the kill, at most a poll (0.2 s) after the first checkpoint (step 10),
    # lands well before the last of 160 steps (a few seconds more).
    config = write_config(tmp_path / "run.yaml", 160, eval_every=40, checkpoint_every=10,
                          **DDP)
    nas_train(config, "--out", str(tmp_path / "whole"))
    out, log = tmp_path / "out", tmp_path / "killed.log"
    checkpoint = checkpoint_dir(out) / LAST
    with open(log, "w") as sink:
        proc = subprocess.Popen(nas_cmd("train", config, "--out", str(out), "--no-progress"),
                                stdout=sink, stderr=subprocess.STDOUT, env=env(),
                                start_new_session=True)  # its group: rank 0 and rank 1

    wait_for(checkpoint.is_file, proc, log, f"a checkpoint at {checkpoint}", timeout=300)
    # Both ranks at once, as a lost machine or a job's end kills them.
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL and not out.exists()

    nas_train(config, "--out", str(out), "--resume")
    a, b = metrics(out), metrics(tmp_path / "whole")
    assert a["resumed_step"] % 10 == 0 and 0 < a["resumed_step"] < 160
    assert b["resumed_step"] is None and a["numerics"]["processes"] == 2
    # Exactly: the same processes, kernels and order of every float operation as the whole run.
    for key in (*LOSSES, "curve", "val_batch_losses", "test_batch_losses", "coefficients",
                "steps", "tokens"):
        assert a[key] == b[key], key
    assert [s for s, _ in a["curve"]] == [40, 80, 120, 160]
    assert_one_run_folder(tmp_path, out, killed=proc.pid)
    assert not checkpoint_dir(out).exists()  # finished: its checkpoints are gone
    print(f"val_loss resumed at step {a['resumed_step']} {a['val_loss']!r} "
          f"whole {b['val_loss']!r}")


@pytest.mark.parametrize("train,says", [
    ({"batch_size": 7}, "train.batch_size: 7 does not split into 2 processes"),
    ({"eval_batches": 1}, "train.eval_batches: 1 gives 1 validation or test batch(es)"),
], ids=["odd-batch", "one-validation-batch"])
def test_a_run_two_processes_cannot_split_is_refused_before_they_start(tmp_path, train, says):
    """The global batch in equal slices, a validation and test batch for each process: else
    one line, exit 2, before Lightning starts rank 1, and nothing left behind."""
    cfg = tiny("learnable", n_layer=2, d_model=32, steps=4, **{"batch_size": 8, **train, **DDP})
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict()))
    proc = subprocess.run(nas_cmd("train", str(config), "--out", str(tmp_path / "out")),
                          capture_output=True, text=True, env=env(), timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"nas train: error: {says}"), proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.yaml"]
