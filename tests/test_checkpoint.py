"""Checkpoints and resuming: a `nas train` killed with SIGKILL and resumed, and a study trial
whose worker dies, end with exactly the val_loss of an uninterrupted run (CPU training is
deterministic); checkpoints saved at and between validations; bad checkpoints refused."""

import json
import shutil
import signal
import subprocess

import pytest
import torch
import yaml
from optuna.trial import TrialState

from nas.cli import main
from nas.config import from_dict
from nas.training.checkpoint import LAST, checkpoint_dir
from nas.training.train import train
from tests.helpers import TINY_BASE, WORKER_STUDY, env_for_cli, nas_cmd, tiny, write_spec
from tests.processes import by_state, finish, load, start, start_worker, wait_for

pytestmark = pytest.mark.slow  # trains, serves or kills: make test-fast leaves it out

# Long enough (a few seconds) for a kill to land after the first checkpoint and before the end.
KILLED = {"steps": 300, "eval_every": 50, "checkpoint_every": 10}
STABLE = ("val_loss", "val_loss_se", "test_loss", "curve", "steps", "tokens", "coefficients",
          "val_batch_losses")


def kill_after_checkpoint(proc: subprocess.Popen, checkpoint, log) -> None:
    """SIGKILL `proc` as soon as its first checkpoint exists (a real kill, mid-run)."""
    wait_for(checkpoint.is_file, proc, log, f"a checkpoint at {checkpoint}")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def run_train(*args: str):
    env = {**env_for_cli(), "OMP_NUM_THREADS": "1"}
    return subprocess.run(nas_cmd("train", *args), capture_output=True, text=True, env=env,
                          timeout=300)


def test_a_killed_nas_train_resumes_to_the_uninterrupted_val_loss(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny("learnable", n_layer=2, **KILLED).to_dict()))
    out, log = tmp_path / "out", tmp_path / "killed.log"
    proc = start("train", str(config), "--out", str(out), log=log)
    kill_after_checkpoint(proc, checkpoint_dir(out) / LAST, log)
    assert proc.returncode == -signal.SIGKILL and not out.exists()

    # Without --resume the unfinished run is not overwritten by accident; a changed config is
    # refused, naming the key.
    assert main(["train", str(config), "--out", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(tiny("learnable", n_layer=2, lr=1e-3, **KILLED).to_dict()))
    assert main(["train", str(changed), "--out", str(out), "--resume"]) == 2
    assert "train.lr differ" in capsys.readouterr().err

    resumed = run_train(str(config), "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    whole = run_train(str(config), "--out", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr
    a = json.loads((out / "metrics.json").read_text())
    b = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    assert a["resumed_step"] % 10 == 0 and 0 < a["resumed_step"] < 300
    assert b["resumed_step"] is None
    assert {k: a[k] for k in STABLE} == {k: b[k] for k in STABLE}
    assert [s for s, _ in a["curve"]] == [50, 100, 150, 200, 250, 300]
    # finished: the checkpoints are gone, the weights are there
    assert not checkpoint_dir(out).exists() and (out / "model.pt").is_file()


@pytest.mark.parametrize("every,saved_at", [(5, 10), (3, 9)])
def test_a_checkpoint_at_or_between_validations_resumes_exactly(tmp_path, every, saved_at):
    """Saved after the validation of its step (every 5) or between two (every 3), a resumed
    run neither repeats nor skips a validation and ends where the whole run does."""
    cfg = tiny("resformer", steps=12, eval_every=5, checkpoint_every=every,
               keep_checkpoints=True)
    whole = train(cfg, tmp_path / "whole", progress=False)
    kept = tmp_path / "whole" / "checkpoints" / LAST
    assert torch.load(kept, weights_only=True)["global_step"] == saved_at  # never the last
    assert not checkpoint_dir(tmp_path / "whole").exists()

    folder = tmp_path / "resume.checkpoints"
    shutil.copytree(kept.parent, folder)
    seen = []
    again = train(cfg, progress=False, checkpoints=folder, resume=True,
                  on_validation=lambda step, loss: seen.append((step, loss)))
    assert again["resumed_step"] == saved_at
    assert {k: again[k] for k in STABLE} == {k: whole[k] for k in STABLE}
    # the hook saw the validations before the checkpoint (from it) and after, once each
    assert [s for s, _ in seen] == [5, 10, 12]
    assert folder.is_dir()  # keep_checkpoints: a run without `out` leaves them where they are


def test_bad_checkpoints_are_refused(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny(steps=4).to_dict()))
    out = tmp_path / "out"
    assert main(["train", str(config), "--out", str(out), "--resume"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    checkpoint_dir(out).mkdir()
    (checkpoint_dir(out) / LAST).write_bytes(b"not a checkpoint")
    assert main(["train", str(config), "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "not a readable checkpoint" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    # --overwrite starts again, and a finished run leaves no checkpoints behind
    assert main(["train", str(config), "--out", str(out), "--overwrite"]) == 0
    assert not checkpoint_dir(out).exists() and (out / "metrics.json").is_file()


def test_a_trial_whose_worker_dies_resumes_from_its_checkpoint(tmp_path):
    storage = f"sqlite:///{tmp_path}/par.db"
    base = {**TINY_BASE, "train": {**TINY_BASE["train"], **KILLED}}
    path = write_spec(tmp_path, preset=WORKER_STUDY, storage=storage, n_trials=1,
                      baselines=False, base=base,
                      space={"model": {"n_layer": 2}, "value_residual": {"mode": "learnable"}})
    checkpoint = tmp_path / "par-artifacts" / "checkpoints" / "par" / "trial-0000" / LAST
    log0, log1 = tmp_path / "w0.log", tmp_path / "w1.log"
    worker = start_worker(path, 0, log0)
    kill_after_checkpoint(worker, checkpoint, log0)
    assert by_state(load(storage, "par"))[TrialState.RUNNING]

    finish(start_worker(path, 1, log1), log1)
    study = load(storage, "par")
    dead, retry = study.trials
    assert dead.state == TrialState.FAIL and retry.state == TrialState.COMPLETE
    assert retry.system_attrs["failed_trial"] == dead.number
    resumed = retry.user_attrs["resumed_step"]
    assert resumed % 10 == 0 and 0 < resumed < 300 and retry.user_attrs["steps_trained"] == 300
    assert not checkpoint.parent.exists()  # the trial finished: its checkpoints are deleted

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the worker trained (--threads 1)
    try:
        whole = train(from_dict(retry.user_attrs["config"]), progress=False)
    finally:
        torch.set_num_threads(threads)
    assert retry.values[0] == whole["val_loss"]
    assert retry.user_attrs["curve"] == whole["curve"]
