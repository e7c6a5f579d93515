"""Does a study's rate choice favour the seeds that made it? Paired differences from vanilla,
split into the seeds that chose each arm's rate and the seeds that did not (no training).

    python benchmarks/first_seed_split.py studies/resformer_scaling.yaml

Under `lr_sweep: first_seed` one seed runs every rate and the others run at its choice, so the
choosing seed's loss at the chosen rate is the best of several draws while the other seeds' is
one draw: a difference from vanilla that holds on the choosing seed but not on the others rests
on the choice. Per variant, over every shape and budget: the mean test-loss difference from
vanilla on the choosing seeds and on the others, the same without the smallest shape, the
variant's most negative pair, and the exact sign-flip p-value of the other seeds' pairs alone
(Holm-adjusted across the variants). Per shape, vanilla's loss per seed and the steps trained.
"""

from __future__ import annotations

import argparse

import numpy as np

from nas.reading.arms import best_arms, paired_differences
from nas.reading.stats import FEW_PAIRS, holm, sign_flip_p
from nas.search.lr_sweep import stored_protocol
from nas.search.spec import load_spec
from nas.search.study import open_existing
from nas.search.trials import completed


def mean(pairs: list, skip: str | None = None) -> str:
    """The mean of (difference, seed, value) `pairs` and their count, leaving out shape `skip`."""
    xs = [x for d, _, x in pairs if d.label != skip]
    return f"{np.mean(xs):+.4f} ({len(xs)})" if xs else "-"


def split_rows(arms: list) -> list[tuple]:
    """Per variant: (variant, choosing-seed pairs, other-seed pairs, smallest shape, most negative
    pair, the exact sign-flip p of the other seeds' pairs alone)."""
    rows = []
    for variant, diffs in paired_differences(arms).items():
        chose = [(d, s, x) for d in diffs for s, x in d.by_seed.items()
                 if s in d.arm.choice_seeds and s in d.vanilla.choice_seeds]
        others = [(d, s, x) for d in diffs for s, x in d.by_seed.items()
                  if s not in d.arm.choice_seeds and s not in d.vanilla.choice_seeds]
        smallest = diffs[0].label
        worst = min(((d.label, s, x) for d in diffs for s, x in d.by_seed.items()),
                    key=lambda t: t[2])
        rows.append((variant, chose, others, smallest, worst,
                     sign_flip_p([x for *_, x in others])))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study")
    args = parser.parse_args()
    study = open_existing(load_spec(args.study), None)
    arms = best_arms(completed(study), stored_protocol(study))
    rows = split_rows(arms)
    adjusted = holm([row[-1] for row in rows])
    print("| variant | choosing seeds: mean (pairs) | other seeds: mean (pairs) | without the "
          "smallest shape: choosing / other | most negative pair | other seeds: exact p (Holm) "
          "| other seeds below vanilla |")
    print("|---|---|---|---|---|---|---|")
    for (variant, chose, others, smallest, worst, p), p_holm in zip(rows, adjusted, strict=True):
        below = sum(x < 0 for *_, x in others)
        few = f" warning: {len(others)} pair(s)" if len(others) < FEW_PAIRS else ""
        print(f"| {variant} | {mean(chose)} | {mean(others)} | {mean(chose, smallest)} / "
              f"{mean(others, smallest)} | {worst[0]} seed {worst[1]}: {worst[2]:+.4f} | "
              f"{p:.3g} ({p_holm:.3g}){few} | {below}/{len(others)} |")
    print("\n| vanilla | rate | test loss by seed | steps trained |")
    print("|---|---|---|---|")
    for arm in arms:
        if arm.variant == "vanilla":
            seeds = ", ".join(f"{s}: {x:.4f}" for s, x in sorted(arm.by_seed.items()))
            print(f"| {arm.shape} | {arm.lr:g} | {seeds} | {arm.first.steps_trained} |")


if __name__ == "__main__":
    main()
