"""Would successive halving of the learning-rate sweep pick the same rates for less? A replay on
the committed studies' validation curves (no training).

    python benchmarks/lr_halving.py studies/resformer_scaling.yaml studies/resformer_prose.yaml \
        studies/resformer_primary.yaml

For every arm that ran at least three rates, the full sweep's choice (the lowest mean final
validation loss over the arm's choosing seeds) is compared with `nas.search.lr_sweep.halving_choice`
under each setting of a small grid: at the given fractions of the budget, the rates are ranked
by their mean validation loss over the same seeds and the best share is kept. Prints, per
setting: the share of arms where halving picks the full sweep's rate, the mean share of
training steps it saves, and the regret (the full sweep's mean validation loss at halving's
choice minus at its own; 0 where they agree). The bar for a default: the same rate in >= 90%
of arms at >= 35% fewer steps.
"""

from __future__ import annotations

import argparse
import statistics

from nas.reading.arms import choose_arms
from nas.search.lr_sweep import halving_choice, stored_protocol
from nas.search.spec import load_spec
from nas.search.study import open_existing
from nas.search.trials import completed

SETTINGS = [((0.25,), 0.5), ((0.5,), 0.5), ((0.25, 0.5), 0.5), ((0.3, 0.6), 0.5),
            ((0.5,), 0.34), ((0.25, 0.5), 0.67), ((0.75,), 0.5)]


def arm_curves(paths: list[str]) -> list[tuple[str, dict, int, float, dict[float, float]]]:
    """(label, curves by rate, total steps, the full sweep's choice, mean final loss by rate)
    of every arm with at least three rates and complete curves."""
    out = []
    for path in paths:
        spec = load_spec(path)
        study = open_existing(spec, None)
        for arm in choose_arms(completed(study), stored_protocol(study)):
            if len(arm.val_by_lr) < 3:
                continue
            curves = {lr: [arm.runs[lr][s].curve for s in arm.choice_seeds]
                      for lr in arm.val_by_lr}
            if any(len(c) < 2 for runs in curves.values() for c in runs):
                continue
            total = int(max(c[-1][0] for runs in curves.values() for c in runs))
            out.append((f"{spec.name}: {arm.variant} {arm.shape}", curves, total,
                        min(arm.val_by_lr, key=arm.val_by_lr.get), arm.val_by_lr))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("studies", nargs="+")
    args = parser.parse_args()
    arms = arm_curves(args.studies)
    print(f"{len(arms)} arms with at least three rates, from {', '.join(args.studies)}\n")
    print("| fractions | keep | same rate | steps saved (mean) | regret: mean | regret: worst |")
    print("|---|---:|---:|---:|---:|---:|")
    for fractions, keep in SETTINGS:
        same, saved, regret = 0, [], []
        for _, curves, total, full, val in arms:
            chosen, spent = halving_choice(curves, total, fractions, keep)
            same += chosen == full
            saved.append(1 - spent)
            regret.append(val[chosen] - val[full])
        print(f"| {', '.join(f'{f:g}' for f in fractions)} | {keep:g} | {same / len(arms):.0%} "
              f"| {statistics.mean(saved):.0%} | {statistics.mean(regret):.4f} | "
              f"{max(regret):.4f} |")


if __name__ == "__main__":
    main()
