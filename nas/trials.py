"""Reading trials back: what the objectives are, a trial's label, and the non-dominated set of
any objectives, the same everywhere (terminal, export, report, dashboard). Never writes to a
study. Knows nothing of torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

# Objective name (a metric every trial stores) -> direction.
OBJECTIVES = {
    "val_loss": "minimize",
    "n_params": "minimize",
    "n_params_non_embedding": "minimize",
    "tokens_per_s": "maximize",
}


def completed(study: optuna.Study) -> list[FrozenTrial]:
    """Completed trials that carry the measurements the figures read."""
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if "val_loss" in t.user_attrs and "n_params" in t.user_attrs]


def describe(attrs: dict[str, Any]) -> str:
    """A short label of a trial's residual plan, e.g. `learnable[3,4]` or `vanilla` (the
    variant's name in place of the mode where the space names variants)."""
    mode = attrs.get("mode", "?")
    name = attrs.get("variant") or mode
    if mode == "vanilla":
        return name
    layers = ",".join(map(str, attrs.get("receiving_layers", [])))
    src = "+ve" if attrs.get("source") == "value_embedding" else ""
    return f"{name}{src}[{layers}]"


def nondominated(trials: Sequence[FrozenTrial], objectives: Sequence[str]
                 ) -> list[FrozenTrial]:
    """The trials that no other trial beats on every objective (read from their stored
    attributes), sorted by the second objective, then the first."""
    def key(t: FrozenTrial) -> tuple[float, ...]:
        return tuple(float(t.user_attrs[o]) * (1 if OBJECTIVES[o] == "minimize" else -1)
                     for o in objectives)

    points = [(key(t), t) for t in trials if all(o in t.user_attrs for o in objectives)]
    front = [t for k, t in points if not any(
        all(a <= b for a, b in zip(other, k, strict=True)) and other != k
        for other, _ in points)]
    return sorted(front, key=lambda t: key(t)[1:] + key(t)[:1])


def front(study: optuna.Study) -> list[FrozenTrial]:
    """The Pareto front of the study's objectives, or its five best trials (one objective)."""
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    objectives = study.user_attrs.get("objectives") or study.metric_names or ["val_loss"]
    if len(objectives) > 1:
        return nondominated(done, objectives)
    return sorted(done, key=lambda t: t.value)[:5]
