"""Train one run config through Lightning and return its metrics."""

from __future__ import annotations

import gc
import json
import logging
import math
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from lightning.pytorch.loggers import CSVLogger

from .analysis import analyze
from .config import RunConfig, dump_config
from .data import TokenDataModule
from .interrupt import lightning_interrupts
from .lit import LitDecoder
from .model import count_params

ValidationHook = Callable[[int, float], None]


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


class OnValidation(pl.Callback):
    """Calls hook(step, val_loss) after each validation; the hook may raise TrialPruned."""

    def __init__(self, hook: ValidationHook):
        self.hook = hook

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.hook(trainer.global_step, float(trainer.callback_metrics["val_loss"]))


class TrainingProgressBar(TQDMProgressBar):
    """One bar over all training steps (epochs are only evaluation intervals here); validation
    shows as val_loss on it."""

    def init_validation_tqdm(self) -> Tqdm:
        return Tqdm(disable=True)

    def init_test_tqdm(self) -> Tqdm:
        return Tqdm(disable=True)

    def on_train_epoch_start(self, trainer, *_):
        if trainer.current_epoch == 0:
            self.train_progress_bar.reset(total=trainer.max_steps)
            self.train_progress_bar.set_description("Training")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if self._should_update(step, self.train_progress_bar.total):
            self.train_progress_bar.n = step
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))


def quiet_lightning() -> None:
    """Drop Lightning's start-up banners and the CPU-only data-loader advice."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*Checkpoint directory.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*logs directory.*exists and is not empty.*")


def analyze_windows(model: torch.nn.Module, data: TokenDataModule,
                    n_windows: int = 8) -> dict[str, Any]:
    """`nas.analysis.analyze` on the first validation windows, rounded for storage."""
    idx, _ = next(iter(data.val_dataloader()))
    result = analyze(model, idx[:n_windows])
    return {k: [round(x, 5) for x in v] if isinstance(v, list) else round(v, 5)
            for k, v in result.items()}


def train(cfg: RunConfig, out: str | Path | None = None, *, progress: bool = True,
          on_validation: ValidationHook | None = None,
          callbacks: Sequence[pl.Callback] = ()) -> dict[str, Any]:
    """Train `cfg`; write config.yaml, metrics.csv, metrics.json and the weights (model.pt, a
    state dict) under `out` if given. The metrics include `analysis` (nas.analysis) of the
    trained model on the first validation windows.

    Raises DivergenceError on a NaN/inf loss, KeyboardInterrupt on Ctrl+C, and whatever a
    hook raises (optuna.TrialPruned).
    """
    quiet_lightning()
    t = cfg.train
    pl.seed_everything(t.seed, verbose=False)
    data = TokenDataModule.for_run(cfg)
    lit = LitDecoder(cfg)
    timer = StepTimer()
    extra = [timer, *callbacks] + ([TrainingProgressBar()] if progress else [])
    extra += [OnValidation(on_validation)] if on_validation else []
    out = Path(out) if out is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, out / "config.yaml")
    trainer = pl.Trainer(
        max_steps=t.steps,
        max_epochs=-1,
        reload_dataloaders_every_n_epochs=1,
        num_sanity_val_steps=0,
        gradient_clip_val=t.grad_clip,
        accelerator=t.accelerator,
        devices=t.devices,
        strategy=t.strategy,
        precision=t.precision,
        deterministic="warn",
        logger=CSVLogger(out, name="", version="") if out is not None else False,
        log_every_n_steps=max(1, min(50, t.steps // 20)),
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress,
        callbacks=extra,
    )
    with lightning_interrupts():
        trainer.fit(lit, datamodule=data)
        if not lit.curve or lit.curve[-1][0] != trainer.global_step:
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
        "tokens": tokens,
        "tokens_per_param": tokens / counts["n_params_non_embedding"],
        "tokens_per_s": tokens / step_seconds if step_seconds > 0 else 0.0,
        "train_seconds": step_seconds,
        "steps": trainer.global_step,
        "mode": cfg.value_residual.mode,
        "source": cfg.value_residual.source,
        "receiving_layers": cfg.value_residual.receiving(cfg.model.n_layer),
        "coefficients": lit.model.residual.coefficients(),
        "curve": [[s, round(v, 6)] for s, v in lit.curve],
        "analysis": analyze_windows(lit.model, data),
    }
    if out is not None:
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
        torch.save(lit.model.state_dict(), out / "model.pt")
    del trainer, lit, data
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the next trial may be a different size
    return metrics
