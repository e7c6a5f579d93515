"""Checkpoints of a training run and resuming from them, through Lightning's checkpointing.

Every `train.checkpoint_every` steps `PeriodicCheckpoint` saves `last.ckpt` with
`trainer.save_checkpoint`: the model, optimizer and schedule, the loops' progress (the step),
the callbacks' state (the step timer), the training loader's position
(`nas.training.data.StepLoader`) and, through `LitDecoder.on_save_checkpoint`, the validation curve
so far, the RNG states and the run config. Each save replaces the previous one atomically
(`AtomicCheckpointIO`), so a kill at any moment leaves one whole checkpoint.
`trainer.fit(ckpt_path=...)` continues from it and, on the CPU, ends exactly where the
uninterrupted run would have.

Where they live: `nas train --out DIR` keeps them in `DIR.checkpoints/` beside the run folder
(`checkpoint_dir`), outside the `DIR.incomplete-<pid>` folder that a stopped run removes, so
they survive SIGKILL, Ctrl+C and SIGTERM alike; a study keeps them with the trial's artifacts
(`nas.search.artifacts.checkpoint_folder`). A finished run deletes them unless
`train.keep_checkpoints`.

Loading is safe: this module and Lightning (`trainer.fit(..., weights_only=True)`) load with
`torch.load(weights_only=True)`; a checkpoint holds tensors and plain Python values only.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.plugins import TorchCheckpointIO

from nas.config import RunConfig
from nas.errors import ConfigError, first_line

LAST = "last.ckpt"
STATE_KEY = "nas"  # our part of a Lightning checkpoint (LitDecoder.on_save_checkpoint)
# Keys that change how a run is carried out, not what it trains: a run may resume under others.
RESUMABLE_KEYS = frozenset({"train.checkpoint_every", "train.keep_checkpoints", "train.compile",
                            "train.accelerator", "train.devices", "train.strategy",
                            "train.logger", "train.max_time"})


def checkpoint_dir(out: Path) -> Path:
    """Where `nas train --out out` keeps its checkpoints: `out.checkpoints`, beside it."""
    out = out.resolve()
    return out.with_name(f"{out.name}.checkpoints")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a temporary file in the same folder, then renames it over the
    old one: a rename within a folder is atomic, where Lightning's own save goes through a
    temporary file in /tmp that is copied, not renamed, when /tmp is another file system."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any,
                        storage_options: Any | None = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        with tmp.open("wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())  # a lost machine, not only a killed process, keeps it whole
        os.replace(tmp, path)


class PeriodicCheckpoint(pl.Callback):
    """Saves `folder/last.ckpt` every `every` training steps (not at the last: the run is
    done). At a step that also validates it saves after the validation, so that the resumed
    run neither repeats nor skips it (Lightning resumes a checkpoint saved at the end of a
    training batch as if that step's validation had run)."""

    def __init__(self, folder: Path, every: int, eval_interval: int):
        self.path = folder / LAST
        self.every, self.eval_interval = every, eval_interval

    def _due(self, trainer: pl.Trainer) -> bool:
        step = trainer.global_step
        return step % self.every == 0 and step < trainer.max_steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._due(trainer) and trainer.global_step % self.eval_interval:
            trainer.save_checkpoint(self.path)

    def on_validation_end(self, trainer, pl_module):
        fitting = trainer.state.fn == "fit" and not trainer.sanity_checking
        if fitting and self._due(trainer):
            trainer.save_checkpoint(self.path)


def rng_state() -> dict[str, Any]:
    """Every RNG a run may draw from, as tensors and plain values (loadable weights-only)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate(),
                             "numpy": (kind, keys.tolist(), pos, has_gauss, gauss)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        out.update(_flat(value, f"{name}.") if isinstance(value, dict) else {name: value})
    return out


def differing_keys(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The dotted run-config keys whose values differ, but for RESUMABLE_KEYS."""
    a, b = _flat(saved), _flat(current)
    return sorted(k for k in set(a) | set(b)
                  if k not in RESUMABLE_KEYS and a.get(k) != b.get(k))


def resume_step(path: Path, cfg: RunConfig) -> int:
    """The step a run of `cfg` resumes at from the checkpoint `path`. A missing, unreadable or
    foreign checkpoint, or one of another run config (naming the keys that differ), is a
    ConfigError."""
    if not path.is_file():
        raise ConfigError(f"--resume: no checkpoint {path} (a run saves one every "
                          "train.checkpoint_every steps)")
    try:
        # mmap: reading the small metadata does not read every tensor of a large model
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # torch raises RuntimeError, pickle errors, OSError, EOFError...
        first = first_line(exc)
        raise ConfigError(f"{path}: not a readable checkpoint ({first}); delete it, or start "
                          "again with --overwrite") from None
    state = ckpt.get(STATE_KEY) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or "global_step" not in ckpt:
        raise ConfigError(f"{path}: not a checkpoint of `nas train`")
    differ = differing_keys(state["config"], cfg.to_dict())
    if differ:
        raise ConfigError(f"{path}: saved by a run of another config ({', '.join(differ)} "
                          "differ); resume with the config it was saved with, or start again "
                          "with --overwrite")
    return int(ckpt["global_step"])
