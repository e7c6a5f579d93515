"""A Pareto-aware pruner for (val_loss, n_params) studies.

Optuna cannot prune multi-objective trials, but here one objective (the parameter count) is
known before training. A running trial is hopeless for the Pareto front when some completed
trial with no more parameters already had a lower loss at the same training step: unless the
curves cross later, the running trial ends dominated. The rule stops a trial whose loss at a
validation step is worse, by a relative `margin`, than the best loss that completed trials with
no more parameters reached at that step (read off their stored curves, interpolated between
validation points). Knows nothing of torch.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

import optuna
from optuna.trial import TrialState


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
    margin: float = 0.01
    # No pruning before this fraction of the trial's steps: early losses of different
    # architectures are close and noisy.
    min_progress: float = 0.3
    # Completed trials needed before pruning starts (the baselines usually come first).
    min_completed: int = 1

    def reason_to_prune(self, study: optuna.Study, n_params: int, step: int, total_steps: int,
                        loss: float) -> str | None:
        """Why the running trial should stop now, or None to let it go on."""
        if step < self.min_progress * total_steps:
            return None
        completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if len(completed) < self.min_completed:
            return None
        best, best_number = None, None
        for t in completed:
            if t.user_attrs.get("n_params", float("inf")) > n_params:
                continue
            ref = loss_at(t.user_attrs.get("curve", []), step)
            if ref is not None and (best is None or ref < best):
                best, best_number = ref, t.number
        if best is None or loss <= best * (1 + self.margin):
            return None
        return (f"pareto: val_loss {loss:.4f} at step {step} is over {1 + self.margin:g}x "
                f"trial {best_number}'s {best:.4f} with no more parameters")
