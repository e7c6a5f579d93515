"""Reading a confirmation (`nas confirm`, nas.confirm): each plan retrained on fresh seeds
against what the study measured of it, and against vanilla at its shape and budget.

Per plan (its arm on the fresh seeds at its chosen rate, nas.reading.arms):
- the winner's curse: its mean validation loss on the fresh seeds minus its validation loss in
  the study (the mean over the seeds it ran there), with a 95% t-interval over the fresh seeds.
  Both on the validation split, so that the difference is the selection's optimism and not the
  gap between two splits; the test loss, which no choice read, is what the plan is worth;
- the paired test-loss difference from vanilla on the same fresh seed, a 95% t-interval over
  the seeds, an exact sign-flip p-value Holm-adjusted across the confirmed plans;
- whether it was on the study's (validation loss, n_params) front and whether it is on the
  front of the confirmed plans and references by (test loss, n_params);
- with named variants (`nas confirm --variants`), each searched plan's paired test-loss
  difference from each of them at its shape and budget, the best of them marked (chosen by the
  fresh seeds' validation loss, so that the test split decides nothing but the difference).
Holm's adjustment runs over every p-value of the confirmation, both comparisons together.
Reads TrialRecords and the confirmation's stored plans; no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import optuna

from nas.reading.arms import Arm, Difference, choose_arms, plan_key, reports_test
from nas.reading.stats import Interval, holm, mean_interval, sign_flip_p
from nas.search.trials import TrialRecord, completed, front_indices

CONFIRM_ATTR = "confirm"  # the user attribute nas.confirm stores its plans in


@dataclass
class Plan:
    """One stored plan of a confirmation and its arm on the fresh seeds (None: none done)."""

    name: str  # its variant in the confirmation
    label: str  # `#12 learnable[3,4]`: the study's trial it stands for and its plan
    trial: int | None  # the study's trial it stands for
    search_val: float | None  # its validation loss in the study (None: not run there)
    search_seeds: int
    on_front: bool  # on the study's (validation loss, n_params) front
    arm: Arm | None
    reference: Plan | None = None  # vanilla at its shape and budget (None: it is a reference)
    difference: Difference | None = None
    p: float = math.nan
    p_holm: float = math.nan
    stays: bool = False  # on the confirmed (test loss, n_params) front

    @property
    def named(self) -> bool:
        """A named variant (`--variants`): compared with vanilla, chosen by no search."""
        return self.trial is None and self.reference is not None

    @property
    def searched(self) -> bool:
        return self.trial is not None and self.reference is not None

    @property
    def curse(self) -> Interval | None:
        """Fresh-seed validation loss minus the study's, per seed (the winner's curse)."""
        if self.arm is None or self.search_val is None:
            return None
        return mean_interval([r.val_loss - self.search_val for r in self.arm.trials])


@dataclass
class Rivalry:
    """A searched plan against a named variant at its shape and budget, on the fresh seeds."""

    plan: Plan
    named: Plan
    best: bool  # the named variant with the lowest fresh validation loss there
    difference: Difference | None = None
    p: float = math.nan
    p_holm: float = math.nan


@dataclass
class Confirmation:
    name: str
    study: str
    choice: str
    seeds: list[int]
    plans: list[Plan] = field(default_factory=list)  # the chosen plans, then the references
    split: str = "test"  # what the confirmed loss is: test, or val without a test split
    rivalries: list[Rivalry] = field(default_factory=list)  # searched plans x named variants

    @property
    def chosen(self) -> list[Plan]:
        return [p for p in self.plans if p.reference is not None]


def read(name: str, record: dict[str, Any], trials: list[TrialRecord]) -> Confirmation:
    """A confirmation from its stored record (`CONFIRM_ATTR`) and its completed trials."""
    arms = choose_arms(trials, "all_seeds")
    by_key = {(a.variant, plan_key(a.first.config)): a for a in arms}
    plans = [Plan(e["name"], e["label"], e["trial"], e["search_val"], e["search_seeds"],
                  e["on_front"], by_key.get((e["name"], plan_key(e["config"]))))
             for e in record["plans"]]
    for plan, e in zip(plans, record["plans"], strict=True):
        if e["reference"] is not None:
            plan.reference = plans[e["reference"]]
    c = Confirmation(name, record["study"], record["choice"], record["seeds"],
                     [p for p in plans if p.reference is not None]
                     + [p for p in plans if p.reference is None],
                     "test" if reports_test(trials) else "val")
    for p in c.chosen:
        p.difference = _paired(p, p.reference)
        p.p = _p(p.difference)
        rivals = [n for n in c.chosen if n.named and n.reference is p.reference and n.arm]
        if p.searched and rivals:
            best = min(rivals, key=lambda n: (mean_values(n.arm, "val"), n.name))
            for named in rivals:
                d = _paired(p, named)
                c.rivalries.append(Rivalry(p, named, named is best, d, _p(d)))
    n = len(c.chosen)
    adjusted = holm([p.p for p in c.chosen] + [r.p for r in c.rivalries])
    for p, q in zip(c.chosen, adjusted[:n], strict=True):
        p.p_holm = q
    for r, q in zip(c.rivalries, adjusted[n:], strict=True):
        r.p_holm = q
    done = [p for p in c.plans if p.arm is not None]
    for i in front_indices([(p.arm.loss, p.arm.first.n_params) for p in done]):
        done[i].stays = True
    return c


def _p(d: Difference | None) -> float:
    return sign_flip_p(list(d.by_seed.values())) if d else math.nan


def _paired(plan: Plan, other: Plan) -> Difference | None:
    """`plan`'s reported loss minus `other`'s on each fresh seed both ran (None: none yet)."""
    if plan.arm is None or other.arm is None:
        return None
    mine, theirs = plan.arm.by_seed, other.arm.by_seed
    pairs = {s: mine[s] - theirs[s] for s in sorted(set(mine) & set(theirs))}
    return Difference(plan.name, plan.arm, other.arm, pairs) if pairs else None


def load_confirmations(study: optuna.Study) -> list[Confirmation]:
    """Every confirmation of `study` in its storage (`nas confirm`), by name."""
    storage = study._storage  # the same storage holds them
    out = []
    for frozen in sorted(storage.get_all_studies(), key=lambda s: s.study_name):
        record = frozen.user_attrs.get(CONFIRM_ATTR)
        if record is None or record.get("study") != study.study_name:
            continue
        confirming = optuna.load_study(study_name=frozen.study_name, storage=storage)
        out.append(read(frozen.study_name, record, completed(confirming)))
    return out


def mean_values(arm: Arm, split: str) -> float:
    return float(np.mean([getattr(r, f"{split}_loss") for r in arm.trials]))
