"""The LightningModule that trains a Decoder: steps, metrics, optimizer and schedule.

Optimizer: AdamW (beta1, beta2, weight_decay from the config). Weight decay applies to every
weight matrix, the token and value embeddings included (as nanoGPT and the paper's plain
AdamW setup do); norms and every value-residual coefficient (lambdas, dense weights, gates) are
not decayed, since decay would pull the coefficients the search is about towards zero.
Schedule: linear warmup, then cosine decay to `min_lr_ratio * lr`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric

from nas.config import RunConfig
from nas.model.decoder import build_model
from nas.training.checkpoint import STATE_KEY, rng_state, set_rng_state
from nas.training.data import interleave


class DivergenceError(RuntimeError):
    """The training loss became NaN or infinite."""


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class LitDecoder(pl.LightningModule):
    def __init__(self, cfg: RunConfig):
        super().__init__()
        self.cfg = cfg
        self.model = build_model(cfg)
        # Fed in `_end_eval`, with every process's batches in order: its own cross-process
        # sync is off, since it would sum the processes' partial means in another order than
        # one process adds its batches, and round differently.
        self.eval_loss = MeanMetric(sync_on_compute=False)
        self.batch_losses: list[float] = []  # this evaluation's per-batch means, for its error
        # (step, val_loss) at each validation, kept small for the study's storage.
        self.curve: list[tuple[int, float]] = []
        self.last_val: dict[str, Any] = {}
        self.test: dict[str, Any] = {}
        # The training steps call this in place of the model where set (compile_model).
        self.compiled_forward: Callable[[torch.Tensor], torch.Tensor] | None = None

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def compile_model(self) -> None:
        """Train through torch.compile of the decoder's forward. Not of this module: Dynamo
        breaks on `self.log`. Nor `self.model.compile()`: the analysis and generation call the
        model with a trace or a cache, which would compile graphs of their own; here they, and
        validation, stay eager. Static shapes: a run's training batches never change shape."""
        self.compiled_forward = torch.compile(self.model.forward, dynamic=False)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """What a resumed run needs beyond Lightning's own state (see nas.training.checkpoint)."""
        checkpoint[STATE_KEY] = {"config": self.cfg.to_dict(), "rng": rng_state(),
                                 "curve": [list(point) for point in self.curve]}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint[STATE_KEY]
        self.curve = [(int(step), float(loss)) for step, loss in state["curve"]]
        set_rng_state(state["rng"])

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    def training_step(self, batch, batch_idx):
        idx, targets = batch
        loss = self._loss((self.compiled_forward or self.model)(idx), targets)
        if not torch.isfinite(loss):
            raise DivergenceError(
                f"training diverged at step {self.global_step}: loss is {loss.item()}; "
                "lower train.lr or raise train.warmup_steps")
        # Logging costs about a millisecond a step through Lightning's result collection,
        # a few percent of a small model's step: log on the logger's cadence only.
        if self.global_step % self.trainer.log_every_n_steps == 0:
            # sync_dist: under DDP the mean of the processes' slices, the global batch's loss
            self.log("train_loss", loss, prog_bar=True, sync_dist=True)
            coefficients = self.model.residual.coefficients()
            if coefficients:
                self.log_dict({f"coef/{k}": v for k, v in coefficients.items()})
        return loss

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch)

    def test_step(self, batch, batch_idx):
        self._eval_step(batch)

    def _eval_step(self, batch) -> None:
        idx, targets = batch
        loss = self._loss(self(idx), targets)
        self.batch_losses.append(float(loss))

    def _all_batch_losses(self) -> list[float]:
        """The per-batch losses of the evaluation on every process, in the order one process
        scores them (each DDP process scores a `nas.training.data.Shard` of the batches)."""
        if self.trainer.world_size == 1:
            return self.batch_losses
        shares: list[Any] = [None] * self.trainer.world_size
        torch.distributed.all_gather_object(shares, self.batch_losses)
        return interleave(shares)

    def _end_eval(self) -> dict[str, Any]:
        """The evaluation's mean loss, its standard error over batches (0 with one), and the
        per-batch means (two runs scored on the same windows pair up batch by batch): the
        same numbers, bit for bit, on one process or several."""
        losses = self._all_batch_losses()
        for value in losses:  # float32 losses: the float round trip is exact
            self.eval_loss.update(torch.tensor(value, device=self.eval_loss.device))
        loss = float(self.eval_loss.compute())
        n = len(losses)
        se = float(torch.tensor(losses).std() / math.sqrt(n)) if n > 1 else 0.0
        batches = [round(v, 5) for v in losses]
        self.eval_loss.reset()
        self.batch_losses = []
        return {"loss": loss, "se": se, "batches": batches}

    def on_validation_epoch_end(self):
        result = self._end_eval()
        self.log("val_loss", result["loss"], prog_bar=True)
        self.log("val_ppl", math.exp(min(result["loss"], 50.0)))
        if not self.trainer.sanity_checking:
            # the final, full validation replaces a curve point at the same step
            if self.curve and self.curve[-1][0] == self.global_step:
                self.curve.pop()
            self.curve.append((self.global_step, result["loss"]))
            self.last_val = result

    def on_test_epoch_end(self):
        self.test = self._end_eval()

    def configure_optimizers(self):
        t = self.cfg.train
        coefficients = set(self.model.residual.coefficient_parameters())
        decay, no_decay = [], []
        for p in self.model.parameters():
            (decay if p.dim() == 2 and p not in coefficients else no_decay).append(p)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": t.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=t.lr, betas=(t.beta1, t.beta2),
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, t.warmup, t.steps, t.min_lr_ratio))
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
