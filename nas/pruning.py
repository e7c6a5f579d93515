"""A Pareto-aware pruner for (val_loss, n_params) studies.

Optuna cannot prune multi-objective trials, but here one objective (the parameter count) is
known before training. A running trial is hopeless for the Pareto front when some completed
trial with no more parameters already had a lower loss at the same training step: unless the
curves cross later, the running trial ends dominated. Two rules:

- before training, a trial whose run config equals that of a completed (or pruned) trial is
  pruned: training is deterministic, so it would retrace that trial's curve exactly (TPE
  proposes such repeats often in small categorical spaces);
- at each validation from `min_progress` of the steps on, a trial is pruned once its loss has
  been worse, by a relative `margin`, than the best loss that completed trials with no more
  parameters reached at the same step (read off their stored curves, interpolated between
  validation points) at `patience` validations in a row; one noisy validation of a near-tie
  does not stop it.

benchmarks/pruning.py measures the defaults. Knows nothing of torch.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState


def loss_at(curve: Sequence[Sequence[float]], step: int) -> float | None:
    """The loss of a (step, loss) curve at `step`, linearly interpolated; None outside it."""
    steps = [s for s, _ in curve]
    if not steps or step < steps[0] or step > steps[-1]:
        return None
    i = bisect.bisect_left(steps, step)
    if steps[i] == step:
        return curve[i][1]
    (s0, l0), (s1, l1) = curve[i - 1], curve[i]
    return l0 + (l1 - l0) * (step - s0) / (s1 - s0)


@dataclass
class ParetoPruner:
    margin: float = 0.005
    # No pruning before this fraction of the trial's steps: the first losses of different
    # architectures are close and noisy.
    min_progress: float = 0.1
    # Validations in a row over the margin before a trial is stopped.
    patience: int = 2
    # Completed trials needed before pruning starts (the baselines usually come first).
    min_completed: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.patience, int) or self.patience < 1:
            raise TypeError(f"patience must be an integer >= 1, got {self.patience!r}")

    def duplicate_of(self, study: optuna.Study, config: dict[str, Any]) -> str | None:
        """Why a trial with this run config need not train, or None."""
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,
                                                          TrialState.PRUNED)):
            if t.user_attrs.get("config") == config:
                outcome = (f"val_loss {t.user_attrs['val_loss']:.4f}"
                           if t.state == TrialState.COMPLETE else "pruned")
                return (f"duplicate of trial {t.number} ({outcome}): the same run config "
                        "trains to the same curve")
        return None

    def reason_to_prune(self, study: optuna.Study, n_params: int,
                        curve: Sequence[Sequence[float]], total_steps: int) -> str | None:
        """Why the running trial, with validation `curve` [(step, loss), ...] so far, should
        stop now, or None to let it go on."""
        recent = [(int(s), float(v)) for s, v in curve[-self.patience:]
                  if s >= self.min_progress * total_steps]
        if len(recent) < self.patience:
            return None
        completed = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                     if t.user_attrs.get("n_params", float("inf")) <= n_params]
        if len(completed) < self.min_completed:
            return None
        refs = [_best_reference(completed, step) for step, _ in recent]
        if any(ref is None or loss <= ref[0] * (1 + self.margin)
               for ref, (_, loss) in zip(refs, recent, strict=True)):
            return None
        (step, loss), (best, number) = recent[-1], refs[-1]
        return (f"pareto: val_loss {loss:.4f} at step {step} is over {1 + self.margin:g}x "
                f"trial {number}'s {best:.4f} with no more parameters"
                + (f" ({self.patience} validations in a row)" if self.patience > 1 else ""))


def _best_reference(trials: Sequence[FrozenTrial], step: int) -> tuple[float, int] | None:
    """The lowest loss any of `trials` had at `step` (from its curve), and that trial's number."""
    found = [(ref, t.number) for t in trials
             if (ref := loss_at(t.user_attrs.get("curve", []), step)) is not None]
    return min(found) if found else None
