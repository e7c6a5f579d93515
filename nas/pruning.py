"""A Pareto-aware pruner for (val_loss, n_params) studies.

Optuna cannot prune multi-objective trials, but here one objective (the parameter count) is
known before training, so a running trial can be judged against the completed trials with no
more parameters: those are the trials that would dominate it. Rules:

- before training, a trial whose run config equals that of a completed (or pruned) trial is
  pruned: training is deterministic, so it would retrace that trial's curve exactly (TPE
  proposes such repeats often in small categorical spaces);
- `rule: step`: at each validation from `min_progress` of the steps on, a trial is pruned once
  its loss has been worse, by a relative margin, than the best loss that completed trials with
  no more parameters reached at the same step (read off their stored curves, interpolated
  between validation points) at `patience` validations in a row. The margin goes linearly from
  `margin` at `min_progress` to `final_margin` at the last step;
- `rule: rungs`: multi-objective successive halving. At each rung (a fraction of the steps), a
  trial goes on only if, by non-dominated sorting of (loss at the rung, n_params) among all
  trials whose curves reached the rung, fewer than a share `keep` of them rank before it;
- with `protect`, under either rule, a trial is never pruned while its loss, were it to stop
  now, would already put it on the front at its parameter count (below the final loss of every
  completed trial with no more parameters);
- with `trend`, the step rule spares a trial whose ratio to the reference, extrapolated
  linearly from its last `patience` + 1 validations to its last step, ends within the margin:
  it is catching up.

benchmarks/pruning.py measures these on sequences of trials they were not tuned on. Knows
nothing of torch.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

RULES = ("step", "rungs")


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


def nondominated_ranks(points: Sequence[tuple[float, float]]) -> list[int]:
    """The non-dominated sorting rank (0 = on the front) of each point, both minimised."""
    ranks = [-1] * len(points)
    left, rank = set(range(len(points))), 0
    while left:
        front = {i for i in left if not any(
            points[j][0] <= points[i][0] and points[j][1] <= points[i][1]
            and points[j] != points[i] for j in left)}
        for i in front:
            ranks[i] = rank
        left -= front
        rank += 1
    return ranks


@dataclass
class ParetoPruner:
    rule: str = "step"
    margin: float = 0.005
    # The margin at the last step (None: `margin` throughout).
    final_margin: float | None = None
    # No pruning before this fraction of the trial's steps: the first losses of different
    # architectures are close and noisy.
    min_progress: float = 0.1
    # Validations in a row over the margin before a trial is stopped.
    patience: int = 2
    # Completed trials needed before pruning starts (the baselines usually come first).
    min_completed: int = 1
    protect: bool = False
    trend: bool = False
    # The step rule's margin at a step is at least this quantile of how much, between that step
    # and the last, the loss ratio of a completed trial to a completed trial with no more
    # parameters fell (None: not used).
    drift_quantile: float | None = None
    # The rungs rule: rungs as fractions of the steps, and the share of a rung's trials kept.
    rungs: Sequence[float] = (0.25, 0.5, 0.75)
    keep: float = 0.5

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise TypeError(f"rule must be one of {', '.join(RULES)}, got {self.rule!r}")
        if not isinstance(self.patience, int) or self.patience < 1:
            raise TypeError(f"patience must be an integer >= 1, got {self.patience!r}")
        if not 0 < self.keep <= 1 or not all(0 < r < 1 for r in self.rungs):
            raise TypeError(f"keep must be in (0, 1] and rungs in (0, 1), got {self.keep!r} "
                            f"and {self.rungs!r}")
        self.rungs = tuple(sorted(self.rungs))

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

    def margin_at(self, progress: float) -> float:
        """The relative margin at `progress` (a fraction of the trial's steps)."""
        if self.final_margin is None:
            return self.margin
        span = max(1e-9, 1 - self.min_progress)
        share = min(1.0, max(0.0, (progress - self.min_progress) / span))
        return self.margin + (self.final_margin - self.margin) * share

    def reason_to_prune(self, study: optuna.Study, n_params: int,
                        curve: Sequence[Sequence[float]], total_steps: int) -> str | None:
        """Why the running trial, with validation `curve` [(step, loss), ...] so far, should
        stop now, or None to let it go on."""
        if not curve or curve[-1][0] < self.min_progress * total_steps:
            return None
        finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,
                                                             TrialState.PRUNED))
        completed = [t for t in finished if t.state == TrialState.COMPLETE]
        cheaper = [t for t in completed if t.user_attrs.get("n_params", float("inf")) <= n_params]
        if len(cheaper) < self.min_completed:
            return None
        if self.protect and float(curve[-1][1]) < min(
                t.user_attrs["val_loss"] for t in cheaper):
            return None  # stopping now would still leave a point of the front
        if self.rule == "rungs":
            return self._rung_reason(finished, n_params, curve, total_steps)
        return self._step_reason(completed, cheaper, curve, total_steps)

    def _step_reason(self, completed: Sequence[FrozenTrial], cheaper: Sequence[FrozenTrial],
                     curve: Sequence[Sequence[float]], total_steps: int) -> str | None:
        recent = [(int(s), float(v)) for s, v in curve[-self.patience:]
                  if s >= self.min_progress * total_steps]
        if len(recent) < self.patience:
            return None
        refs = [_best_reference(cheaper, step) for step, _ in recent]
        margins = [self.margin_at(step / total_steps) for step, _ in recent]
        if self.drift_quantile is not None:
            margins = [max(m, _drift(completed, step, total_steps, self.drift_quantile))
                       for m, (step, _) in zip(margins, recent, strict=True)]
        if any(ref is None or loss <= ref[0] * (1 + m)
               for ref, (_, loss), m in zip(refs, recent, margins, strict=True)):
            return None
        if self.trend and _catching_up(cheaper, curve[-self.patience - 1:], total_steps,
                                       self.margin_at(1.0)):
            return None
        (step, loss), (best, number) = recent[-1], refs[-1]
        return (f"pareto: val_loss {loss:.4f} at step {step} is over {1 + margins[-1]:g}x "
                f"trial {number}'s {best:.4f} with no more parameters"
                + (f" ({self.patience} validations in a row)" if self.patience > 1 else ""))

    def _rung_reason(self, finished: Sequence[FrozenTrial], n_params: int,
                     curve: Sequence[Sequence[float]], total_steps: int) -> str | None:
        step, loss = int(curve[-1][0]), float(curve[-1][1])
        previous = int(curve[-2][0]) if len(curve) > 1 else 0
        # The rung this validation is the first to reach, if any.
        rung = next((r for r in self.rungs if previous < r * total_steps <= step), None)
        if rung is None:
            return None
        peers = [(v, t.user_attrs["n_params"]) for t in finished
                 if (v := loss_at(t.user_attrs.get("curve", []), step)) is not None]
        if len(peers) < self.min_completed:
            return None
        ranks = nondominated_ranks([(loss, n_params), *peers])
        ahead = sum(r < ranks[0] for r in ranks)
        if ahead < self.keep * len(ranks):
            return None
        return (f"pareto: at the {rung:g} rung (step {step}), {ahead} of {len(ranks)} trials "
                f"rank before val_loss {loss:.4f} at {n_params:,} params (keeps {self.keep:g})")


def _best_reference(trials: Sequence[FrozenTrial], step: int) -> tuple[float, int] | None:
    """The lowest loss any of `trials` had at `step` (from its curve), and that trial's number."""
    found = [(ref, t.number) for t in trials
             if (ref := loss_at(t.user_attrs.get("curve", []), step)) is not None]
    return min(found) if found else None


def _catching_up(cheaper: Sequence[FrozenTrial], window: Sequence[Sequence[float]],
                 total_steps: int, margin: float) -> bool:
    """Whether the ratio of the trial's loss to the best reference, extrapolated linearly
    (least squares over `window`) to the last step, ends within `margin`."""
    points = [(s, v / ref[0]) for s, v in window
              if (ref := _best_reference(cheaper, int(s))) is not None]
    if len(points) < 2:
        return False
    mean_s = sum(s for s, _ in points) / len(points)
    mean_r = sum(r for _, r in points) / len(points)
    slope = (sum((s - mean_s) * (r - mean_r) for s, r in points)
             / sum((s - mean_s) ** 2 for s, _ in points))
    last_s, last_r = points[-1]
    return last_r + slope * (total_steps - last_s) <= 1 + margin


def _drift(completed: Sequence[FrozenTrial], step: int, total_steps: int, q: float) -> float:
    """The `q` quantile, over ordered pairs (a, b) of completed trials trained `total_steps` with
    b no smaller than a, of how much b's loss ratio to a fell from `step` to the last step."""
    runs = [(t.user_attrs["n_params"], t.user_attrs["curve"]) for t in completed
            if t.user_attrs.get("curve") and t.user_attrs["curve"][-1][0] == total_steps]
    drifts = sorted(
        lb / la - cb[-1][1] / ca[-1][1]
        for i, (na, ca) in enumerate(runs) for j, (nb, cb) in enumerate(runs)
        if i != j and nb >= na
        and (la := loss_at(ca, step)) is not None and (lb := loss_at(cb, step)) is not None)
    if not drifts:
        return 0.0
    return drifts[min(len(drifts) - 1, int(q * len(drifts)))]
