"""Train one run config through Lightning and return its metrics. One piece (about 410 lines):
the run folder's staging, the trainer's set-up, the fit and the metrics are one sequence whose
steps share the run's state."""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

from nas.config import RunConfig, dump_config
from nas.corpus_files import TOKENIZER_FILE, shard_tokenizer
from nas.errors import ConfigError
from nas.interrupt import lightning_interrupts
from nas.model.analysis import analyze
from nas.model.decoder import count_params, decode_tokens_per_s, kv_bytes_per_token, training_bytes
from nas.paths import PID_ROOM, check_output, first_process, removed_if_refused
from nas.run_folder import CONFIG_FILE, KEPT_CHECKPOINTS, METRICS_FILE, MODEL_FILE
from nas.training.checkpoint import (
    LAST,
    AtomicCheckpointIO,
    PeriodicCheckpoint,
    checkpoint_dir,
    resume_step,
)
from nas.training.compiling import forget_other_graphs, should_compile
from nas.training.data import TokenDataModule
from nas.training.lit import LitDecoder
from nas.training.loggers import log_results, logging_callbacks, run_logger

ValidationHook = Callable[[int, float], None]


class TimeLimitError(RuntimeError):
    """A run reached `train.max_time` before its last step. Not measured as a shorter run: its
    loss would be compared with runs of the full budget."""


class StepTimer(pl.Callback):
    """Wall time spent in training steps only (no validation, no start-up)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._t0 = 0.0

    def _sync(self, pl_module: pl.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._sync(pl_module)
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._sync(pl_module)
        self.seconds += time.perf_counter() - self._t0

    # Kept in checkpoints: a resumed run's throughput counts the steps before the resume too.
    def state_dict(self) -> dict[str, float]:
        return {"seconds": self.seconds}

    def load_state_dict(self, state_dict: dict[str, float]) -> None:
        self.seconds = state_dict["seconds"]


class OnValidation(pl.Callback):
    """Calls hook(step, val_loss) after each validation; the hook may raise TrialPruned."""

    def __init__(self, hook: ValidationHook):
        self.hook = hook

    def on_train_start(self, trainer, pl_module):
        # A resumed run has the validations before its checkpoint already (LitDecoder.curve):
        # the hook sees them first, as it saw them in the run that saved it.
        for step, loss in pl_module.curve:
            self.hook(step, loss)

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.hook(trainer.global_step, float(trainer.callback_metrics["val_loss"]))


class TrainingProgressBar(TQDMProgressBar):
    """The training bar (one epoch: all steps) titled "Training" rather than "Epoch 0", with
    no bars of its own for validation and test; validation shows as val_loss on it."""

    def init_validation_tqdm(self) -> Tqdm:
        return Tqdm(disable=True)

    def init_test_tqdm(self) -> Tqdm:
        return Tqdm(disable=True)

    def on_train_epoch_start(self, trainer, *_):
        self.train_progress_bar.reset(total=self.total_train_batches)
        self.train_progress_bar.set_description("Training")


def quiet_lightning() -> None:
    """Drop Lightning's start-up banners and the CPU-only data-loader advice."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*Checkpoint directory.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*logs directory.*exists and is not empty.*")
    # Under DDP: val_loss and val_ppl are logged once every process holds all batches' losses
    # (LitDecoder._end_eval), so a sync_dist reduction would only repeat them.
    warnings.filterwarnings("ignore", message=".*when logging on epoch level in distributed.*")


def analyze_windows(model: torch.nn.Module, data: TokenDataModule,
                    n_windows: int = 8) -> dict[str, Any]:
    """`nas.model.analysis.analyze` on the first validation windows, rounded for storage."""
    idx, _ = next(iter(data.val_dataloader()))
    result = analyze(model, idx[:n_windows])
    return {k: [round(x, 5) for x in v] if isinstance(v, list) else round(v, 5)
            for k, v in result.items()}


def numerics(device: torch.device, processes: int = 1) -> dict[str, Any]:
    """What a run's losses depend on beyond its config (docs/configuration.md): the torch
    build and, on the CPU, the instruction set ATen's kernels use (AVX512 and AVX2 round
    differently) and the thread count; on a GPU, the GPU; under DDP, its processes (each
    sums the gradient of its slice of the batch: another order of float additions)."""
    found: dict[str, Any] = {"torch": torch.__version__, "device": device.type}
    if processes > 1:  # only then: the records of one-process runs stay what they were
        found["processes"] = processes
    if device.type == "cuda":
        return {**found, "gpu": torch.cuda.get_device_name(device)}
    return {**found, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads()}


def check_memory(cfg: RunConfig, where: str) -> None:
    """Refuse, before anything is built, a run whose estimated training memory
    (`nas.model.decoder.training_bytes`) exceeds the free memory it would train in: built, it would
    die of an out-of-memory error, or push the machine into swap, only later (`--force` skips
    this check)."""
    free = free_memory(cfg.train.accelerator)
    if free is None:
        return  # memory we cannot read: Lightning's to try
    available, what = free
    try:
        need = training_bytes(cfg, attention_weights=what == "RAM")
    except ValueError as exc:  # an unknown precision, which Lightning would refuse later
        raise ConfigError(f"{where}: {exc}") from None
    if need > available:
        raise ConfigError(f"{where}: model: training it needs about {need / 2**30:,.1f} GiB "
                          f"(weights, AdamW state, activations), more than the "
                          f"{available / 2**30:,.1f} GiB of free {what}; shrink model.d_model, "
                          "model.n_layer or train.batch_size, or pass --force to try anyway")


def free_memory(accelerator: str) -> tuple[int, str] | None:
    """The free bytes of the memory a run on `accelerator` trains in, and its name: the GPU's
    where it trains on one, else the machine's RAM (Linux's MemAvailable); None where unknown."""
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        # no GPU: Lightning refuses the accelerator with its own message
        return (torch.cuda.mem_get_info()[0], "GPU memory") if torch.cuda.is_available() else None
    if accelerator not in ("auto", "cpu", "mps"):  # mps: Apple's memory is the RAM
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "RAM"
    except OSError:
        pass  # not Linux
    return None


INCOMPLETE = ".incomplete-"  # a run folder being written: <out>.incomplete-<pid>, beside it


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse an output folder that cannot be written (`paths.check_output`: a file, under a
    file, a name too long for the staging folder beside it), or that holds anything unless
    `overwrite`; and even then one that is no run folder (`--out ~ --overwrite` must not
    delete a home)."""
    check_output(out, "--out", folder=True, suffixes=(
        f"{INCOMPLETE}{PID_ROOM}", f".replaced-{PID_ROOM}", ".checkpoints"))
    if not (out.is_dir() and any(out.iterdir())):
        return
    if not overwrite:
        raise ConfigError(f"--out: {out} is not empty; pass --overwrite to replace it, or "
                          "choose another folder")
    if not (out / CONFIG_FILE).is_file():
        raise ConfigError(f"--out: {out} holds no {CONFIG_FILE}, so it is not a run folder; "
                          "--overwrite replaces only those")


@contextlib.contextmanager
def run_folder(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Where a run writes its outputs: `<out>.incomplete-<pid>` beside `out`, renamed to `out`
    once the block has written everything (an old `out` is replaced whole, and only with
    `overwrite`), and removed if the block raises (divergence, Ctrl+C, SIGTERM). A run killed
    outright (SIGKILL, a lost machine) leaves only that folder, named as incomplete: never a
    half-written `out`, nor new files next to an old run's."""
    check_out(out, overwrite)
    out = out.resolve()  # `.` and `..` name no folder to put another beside
    staging = out.with_name(f"{out.name}{INCOMPLETE}{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)  # left by a killed run that had this pid
    with removed_if_refused(staging):  # and the folders made for it, on bad input
        staging.mkdir(parents=True)
        try:
            yield staging
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    old = out.with_name(f"{out.name}.replaced-{os.getpid()}")
    if overwrite and out.exists():
        out.rename(old)
    try:
        # Atomic: `out` holds either nothing or the whole run. Without `overwrite` it replaces
        # an empty folder only, and fails if another run filled `out` meanwhile; this run then
        # stays in `staging`.
        staging.rename(out)
    except OSError as exc:
        raise ConfigError(f"--out: cannot move the finished run from {staging} to {out}: "
                          f"{exc.strerror or exc}") from None
    shutil.rmtree(old, ignore_errors=True)


def train(cfg: RunConfig, out: str | Path | None = None, *, progress: bool = True,
          on_validation: ValidationHook | None = None,
          overwrite: bool = False, checkpoints: Path | None = None,
          resume: bool = False) -> dict[str, Any]:
    """Train `cfg`; write config.yaml, metrics.csv, the weights (model.pt, a state dict) and,
    last, metrics.json into the folder `out` if given, all at once (see `run_folder`; an `out`
    that holds anything is refused unless `overwrite`). The metrics include `analysis`
    (nas.model.analysis) of the trained model on the first validation windows.

    Every `train.checkpoint_every` steps a checkpoint goes to the folder `checkpoints` (with
    `out`, by default `<out>.checkpoints` beside it; see nas.training.checkpoint), and `resume`
    continues from the last one there. A new run at an `out` whose run did not finish is
    refused unless `overwrite`. A run that finishes deletes its checkpoints, unless
    `train.keep_checkpoints` (they then move into `out/checkpoints`).

    Raises DivergenceError on a NaN/inf loss, TimeLimitError past `train.max_time`,
    KeyboardInterrupt on Ctrl+C (Interrupted on
    SIGTERM too, under `nas.interrupt.CTRL_C`), and whatever a hook raises (optuna.TrialPruned).
    """
    if checkpoints is None and out is not None:
        checkpoints = checkpoint_dir(Path(out))
    if not first_process():
        # Another DDP process of this run: rank 0 writes the run folder, clears or keeps the
        # checkpoints (it saves them too, see PeriodicCheckpoint); this one only trains, and
        # reads the checkpoint it resumes from.
        resumed = resume_step(checkpoints / LAST, cfg) if resume and checkpoints else None
        return _train(cfg, None, progress, on_validation, checkpoints, resumed)
    if out is None:
        resumed = _resumed_step(cfg, checkpoints, resume, refuse_unfinished=False)
        metrics = _train(cfg, None, progress, on_validation, checkpoints, resumed)
    else:
        with run_folder(Path(out), overwrite) as folder:
            resumed = _resumed_step(cfg, checkpoints, resume, refuse_unfinished=not overwrite)
            metrics = _train(cfg, folder, progress, on_validation, checkpoints, resumed)
    if checkpoints is not None and not cfg.train.keep_checkpoints:
        shutil.rmtree(checkpoints, ignore_errors=True)
    return metrics


def _resumed_step(cfg: RunConfig, checkpoints: Path | None, resume: bool,
                  refuse_unfinished: bool) -> int | None:
    """The step the run resumes at (None: step 0); a run from step 0 clears, or refuses,
    the checkpoints of an earlier one in its folder."""
    if resume:
        if checkpoints is None:
            raise ValueError("resume needs `out` or `checkpoints`")
        return resume_step(checkpoints / LAST, cfg)
    if checkpoints is not None and (checkpoints / LAST).is_file():
        if refuse_unfinished:
            raise ConfigError(f"--out: {checkpoints} holds the checkpoint of a run that did not "
                              "finish; pass --resume to continue it, or --overwrite to start "
                              "again")
        shutil.rmtree(checkpoints)
    return None


def _train(cfg: RunConfig, folder: Path | None, progress: bool,
           on_validation: ValidationHook | None, checkpoints: Path | None = None,
           resumed: int | None = None) -> dict[str, Any]:
    quiet_lightning()
    t = cfg.train
    pl.seed_everything(t.seed, verbose=False)
    data = TokenDataModule.for_run(cfg)
    lit = LitDecoder(cfg)
    timer = StepTimer()
    extra: list[pl.Callback] = [timer] + ([TrainingProgressBar()] if progress else [])
    extra += [OnValidation(on_validation)] if on_validation else []
    if checkpoints is not None and t.checkpoint_every:
        extra.append(PeriodicCheckpoint(checkpoints, t.checkpoint_every, t.eval_interval))
    if folder is not None:
        dump_config(cfg, folder / CONFIG_FILE)
        # with the shards' tokenizer, which `nas generate` reads beside the config
        if tokenizer := shard_tokenizer(cfg.data.source):
            shutil.copyfile(tokenizer, folder / TOKENIZER_FILE)
        extra += logging_callbacks(lambda: timer.seconds, cfg.tokens_per_step)
    logger = (run_logger(cfg, folder, folder.name.partition(INCOMPLETE)[0])
              if folder is not None else None)
    trainer = pl.Trainer(
        max_steps=t.steps,
        max_epochs=1,  # the one training loader holds all `steps` batches
        # Validation every eval_interval steps counted across the run, not per epoch.
        val_check_interval=t.eval_interval,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        # Our loaders split themselves between DDP's processes (TokenDataModule): an item is a
        # whole batch, so Lightning's DistributedSampler would give each process every other
        # step, not its rows of every step (and cannot be put into StepLoader at all).
        use_distributed_sampler=False,
        gradient_clip_val=t.grad_clip,
        accelerator=t.accelerator,
        devices=t.devices,
        strategy=t.strategy,
        precision=t.precision,
        deterministic="warn",
        logger=logger if logger is not None else False,
        log_every_n_steps=max(1, min(50, t.steps // 20)),
        enable_checkpointing=False,  # no default ModelCheckpoint: PeriodicCheckpoint saves
        plugins=[AtomicCheckpointIO()],
        enable_model_summary=False,
        enable_progress_bar=progress,
        callbacks=extra,
        max_time=timedelta(seconds=t.max_time) if t.max_time is not None else None,
    )
    data.check_world(trainer.world_size)  # before DDP starts its other processes
    compiled = should_compile(cfg, trainer.strategy.root_device)
    if compiled:
        forget_other_graphs(cfg)
        lit.compile_model()
    with lightning_interrupts():
        trainer.fit(lit, datamodule=data, weights_only=True,
                    ckpt_path=None if resumed is None else checkpoints / LAST)
        if t.max_time is not None and trainer.global_step < t.steps:  # Lightning's Timer ended it
            raise TimeLimitError(f"train.max_time {t.max_time:g} s reached at step "
                                 f"{trainer.global_step} of {t.steps}")
        if (t.curve_batches is not None or not lit.curve
                or lit.curve[-1][0] != trainer.global_step):  # the last point, on every batch
            trainer.validate(lit, datamodule=data, verbose=False)
        if data.test_dataloader() is not None:
            trainer.test(lit, datamodule=data, verbose=False)
    step_seconds = timer.seconds
    tokens = trainer.global_step * cfg.tokens_per_step
    counts = count_params(cfg)
    metrics: dict[str, Any] = {
        "val_loss": lit.curve[-1][1],
        "val_loss_se": round(lit.last_val["se"], 6),
        "val_ppl": math.exp(lit.curve[-1][1]),
        # Reported, never selected on: no training, pruning or choice reads it.
        "test_loss": round(lit.test["loss"], 6) if lit.test else None,
        "test_loss_se": round(lit.test["se"], 6) if lit.test else None,
        "val_batch_losses": lit.last_val["batches"],
        "test_batch_losses": lit.test["batches"] if lit.test else None,
        **counts,
        "kv_bytes_per_token": kv_bytes_per_token(cfg),
        # with the cache, on the device it trained on (nas.model.decoder.decode_tokens_per_s)
        "decode_tokens_per_s": decode_tokens_per_s(lit.model, t.precision),
        "tokens": tokens,
        # measured against this model's own parameters (train.tokens_per_param, a budget, is
        # against the vanilla model's of this shape)
        "tokens_per_model_param": tokens / counts["n_params_non_embedding"],
        "tokens_per_s": tokens / step_seconds if step_seconds > 0 else 0.0,
        "train_seconds": step_seconds,
        "steps": trainer.global_step,
        "resumed_step": resumed,  # None: trained from step 0
        "compiled": compiled,
        "numerics": numerics(trainer.strategy.root_device, trainer.world_size),
        "mode": cfg.value_residual.mode,
        "source": cfg.value_residual.source,
        "receiving_layers": cfg.value_residual.receiving(cfg.model.n_layer),
        "coefficients": lit.model.residual.coefficients(),
        "curve": [[s, round(v, 6)] for s, v in lit.curve],
        "analysis": analyze_windows(lit.model, data),
    }
    if folder is not None:
        torch.save(lit.model.state_dict(), folder / MODEL_FILE)
        if checkpoints is not None and t.keep_checkpoints and checkpoints.is_dir():
            checkpoints.rename(folder / KEPT_CHECKPOINTS)  # kept with the run it belongs to
        # Last: a folder with metrics.json holds a whole run.
        (folder / METRICS_FILE).write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    if logger is not None:
        log_results(logger, cfg, metrics, folder, trainer.global_step)
    _wait_for_ranks(trainer)
    del trainer, lit, data
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the next trial may be a different size
    return metrics


def _wait_for_ranks(trainer: pl.Trainer) -> None:
    """Wait for the DDP processes Lightning started (none elsewhere), so that `nas train`
    exits once its run has, and fails if one of them failed."""
    for proc in getattr(trainer.strategy.launcher, "procs", []):
        if proc.wait() != 0:
            raise RuntimeError(f"DDP process {proc.pid} of this run exited with {proc.returncode}")
