"""A Pareto-aware pruner for studies of val_loss against objectives known before training.

Optuna cannot prune multi-objective trials, but here every objective besides val_loss (the
parameter count, the KV cache per token: `nas.search.trials.PLANNED`) is known before training, so a
running trial can be judged against the completed trials no worse than it on every one of
them: only those could dominate it. (With a single objective, val_loss, it is judged on the
parameter count, the front `nas export` takes.) Judging on the parameter count alone in a study
that also minimises the KV cache would stop, say, an svformer trial slightly behind a vanilla
one of as many parameters, though its smaller cache puts it on the front; a trial better than
every completed trial on some objective has no references and is never pruned. Rules:

- before training, a trial whose run config equals that of a completed (or pruned) trial is
  pruned (`nas.search.objective`; without this pruner it completes as a copy): training is
  deterministic, so it would retrace that trial's curve exactly (TPE proposes such repeats
  often in small categorical spaces);
- `rule: step` (the default): from `min_progress` of its steps on, a trial is pruned once its
  loss has been worse, by a relative `margin`, than the best loss that completed trials no
  worse on the other objectives reached at the same step (read off their stored curves,
  interpolated between validation points) at `patience` validations in a row. Comparing at
  the same step transfers the reference's curve shape: the trial's final loss is forecast as
  the reference's final loss times their ratio now. With `trend`, a trial whose ratio to the
  reference is falling fast enough to end within the margin goes on;
- `rule: rungs`: multi-objective successive halving. At each rung (a fraction of the steps), a
  trial goes on only if, by non-dominated sorting of (loss at the rung, the other objectives)
  among all trials whose curves reached the rung (pruned ones included), fewer than a share
  `keep` of them rank before it.

benchmarks/pruning.py chose the defaults on nine trial sequences (TPE seeds) and measures them
on six others, chosen before any of them was trained.
Knows nothing of torch.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import optuna
from optuna.trial import TrialState

from nas.search.trials import OBJECTIVES, TrialRecord, records

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


def judged_on(objectives: Sequence[str]) -> list[str]:
    """The objectives a study's pruner compares trials on: all but val_loss (each in
    trials.PLANNED: `nas.search.spec` refuses the pruner otherwise), or n_params for val_loss
    alone."""
    return list(objectives[1:]) or ["n_params"]


def nondominated_ranks(points: Sequence[Sequence[float]]) -> list[int]:
    """The non-dominated sorting rank (0 = on the front) of each point, every value
    minimised."""
    ranks = [-1] * len(points)
    left, rank = set(range(len(points))), 0
    while left:
        front = {i for i in left if not any(
            all(a <= b for a, b in zip(points[j], points[i], strict=True))
            and points[j] != points[i] for j in left)}
        for i in front:
            ranks[i] = rank
        left -= front
        rank += 1
    return ranks


@dataclass
class ParetoPruner:
    rule: str = "step"
    # The defaults (margin 0.005, patience 2, trend 2) lost at most 0.72% of hypervolume in
    # replays of fifteen trial sequences, six of them held out before they were trained
    # (docs/benchmarks.md); margin 0.0025, patience 1, trend 1 saves more steps and can lose a
    # front trial.
    margin: float = 0.005
    # No pruning before this fraction of the trial's steps: until then, curves of one size
    # still cross (benchmarks/pruning.py, seed 0: a trial 1.8% behind at 20% of its steps ended
    # on the front).
    min_progress: float = 0.3
    # Validations in a row over the margin before a trial is stopped.
    patience: int = 2
    # Completed trials needed before pruning starts (the baselines usually come first).
    min_completed: int = 1
    # Earlier validations the step rule fits a line through, with the last, to the trial's
    # loss ratio to the reference: a trial whose ratio, so extrapolated to its last step, ends
    # within the margin is catching up and goes on (0: no trend). Some modes (dense) trail
    # until half-way and then overtake.
    trend: int = 2
    # The rungs rule: rungs as fractions of the steps, and the share of a rung's trials kept.
    rungs: Sequence[float] = (0.4, 0.6, 0.8)
    keep: float = 0.25

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise TypeError(f"rule must be one of {', '.join(RULES)}, got {self.rule!r}")
        if not isinstance(self.trend, int) or self.trend < 0:
            raise TypeError(f"trend must be an integer >= 0, got {self.trend!r}")
        if not isinstance(self.patience, int) or self.patience < 1:
            raise TypeError(f"patience must be an integer >= 1, got {self.patience!r}")
        if not 0 < self.keep <= 1 or not all(0 < r < 1 for r in self.rungs):
            raise TypeError(f"keep must be in (0, 1] and rungs in (0, 1), got {self.keep!r} "
                            f"and {self.rungs!r}")
        self.rungs = tuple(sorted(self.rungs))

    def reason_to_prune(self, study: optuna.Study, known: Mapping[str, float],
                        curve: Sequence[Sequence[float]], total_steps: int) -> str | None:
        """Why the running trial, with validation `curve` [(step, loss), ...] so far, should
        stop now, or None to let it go on. `known`: its values of the objectives it is judged
        on (`judged_on`), e.g. {"n_params": 270912, "kv_bytes_per_token": 2048}."""
        if not curve or curve[-1][0] < self.min_progress * total_steps:
            return None
        finished = records(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,
                                                                     TrialState.PRUNED)))
        rivals = [t for t in finished if t.state == TrialState.COMPLETE
                  and (point := _costs(t, known)) is not None
                  and all(a <= b for a, b in zip(point, _costs_of(known), strict=True))]
        if len(rivals) < self.min_completed:
            return None
        if self.rule == "rungs":
            return self._rung_reason(finished, known, curve, total_steps)
        return self._step_reason(rivals, known, curve, total_steps)

    def _step_reason(self, rivals: Sequence[TrialRecord], known: Mapping[str, float],
                     curve: Sequence[Sequence[float]], total_steps: int) -> str | None:
        recent = [(int(s), float(v)) for s, v in curve[-self.patience:]
                  if s >= self.min_progress * total_steps]
        if len(recent) < self.patience:
            return None
        refs = [_best_reference(rivals, step) for step, _ in recent]
        if any(ref is None or loss <= ref[0] * (1 + self.margin)
               for ref, (_, loss) in zip(refs, recent, strict=True)):
            return None
        if self.trend and _catching_up(rivals, curve[-self.trend - 1:], total_steps,
                                       self.margin):
            return None
        (step, loss), (best, number) = recent[-1], refs[-1]
        factor = f"{1 + self.margin:g}x " if self.margin else ""
        return (f"pareto: val_loss {loss:.4f} at step {step} is over {factor}trial {number}'s "
                f"{best:.4f} with {_no_worse(known)}"
                + (f" ({self.patience} validations in a row)" if self.patience > 1 else "")
                + (", and not catching up" if self.trend else ""))

    def _rung_reason(self, finished: Sequence[TrialRecord], known: Mapping[str, float],
                     curve: Sequence[Sequence[float]], total_steps: int) -> str | None:
        step, loss = int(curve[-1][0]), float(curve[-1][1])
        previous = int(curve[-2][0]) if len(curve) > 1 else 0
        # The rung this validation is the first to reach, if any.
        rung = next((r for r in self.rungs if previous < r * total_steps <= step), None)
        if rung is None:
            return None
        peers = [(v, *costs) for t in finished if (v := loss_at(t.curve, step)) is not None
                 and (costs := _costs(t, known)) is not None]
        if len(peers) < self.min_completed:
            return None
        ranks = nondominated_ranks([(loss, *_costs_of(known)), *peers])
        ahead = sum(r < ranks[0] for r in ranks)
        if ahead < self.keep * len(ranks):
            return None
        return (f"pareto: at the {rung:g} rung (step {step}), {ahead} of {len(ranks)} trials "
                f"rank before val_loss {loss:.4f} at {_describe(known)} (keeps {self.keep:g})")


def _minimised(name: str, value: float) -> float:
    return value if OBJECTIVES[name] == "minimize" else -value


def _costs_of(known: Mapping[str, float]) -> tuple[float, ...]:
    return tuple(_minimised(name, value) for name, value in known.items())


def _costs(trial: TrialRecord, known: Mapping[str, float]) -> tuple[float, ...] | None:
    """The trial's values of the objectives in `known`, minimised; None if it lacks one."""
    values = [trial.objective(name) for name in known]
    if any(v is None for v in values):
        return None
    return tuple(_minimised(name, v) for name, v in zip(known, values, strict=True))


def _no_worse(known: Mapping[str, float]) -> str:
    """How the reason names the trials a trial is judged against."""
    if list(known) == ["n_params"]:
        return "no more parameters"
    return f"no worse {', '.join(known)}"


def _describe(known: Mapping[str, float]) -> str:
    if list(known) == ["n_params"]:
        return f"{known['n_params']:,} params"
    return ", ".join(f"{name} {value:,}" for name, value in known.items())


def _best_reference(trials: Sequence[TrialRecord], step: int) -> tuple[float, int] | None:
    """The lowest loss any of `trials` had at `step` (from its curve), and that trial's number."""
    found = [(ref, t.number) for t in trials
             if (ref := loss_at(t.curve, step)) is not None]
    return min(found) if found else None


def _catching_up(rivals: Sequence[TrialRecord], window: Sequence[Sequence[float]],
                 total_steps: int, margin: float) -> bool:
    """Whether the ratio of the trial's loss to the best reference at each step of `window`,
    extrapolated by a least-squares line to the last step, ends within `margin`."""
    points = [(s, v / ref[0]) for s, v in window
              if (ref := _best_reference(rivals, int(s))) is not None]
    if len(points) < 2:
        return False
    mean_s = sum(s for s, _ in points) / len(points)
    mean_r = sum(r for _, r in points) / len(points)
    slope = (sum((s - mean_s) * (r - mean_r) for s, r in points)
             / sum((s - mean_s) ** 2 for s, _ in points))
    last_s, last_r = points[-1]
    return last_r + slope * (total_steps - last_s) <= 1 + margin
