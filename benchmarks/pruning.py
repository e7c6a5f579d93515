"""Benchmark: the Pareto-aware pruner against no pruning, at equal trial counts.

Runs one fixed small multi-objective study twice on the built-in corpus, once without pruning
and once with the Pareto-aware pruner (same sampler seed, same number of trials), and prints the
training steps each spent and the hypervolume of each Pareto front of (val_loss, n_params).
It also replays the pruner on the unpruned study's stored curves: the exact counterfactual on an
identical trial sequence, free of the sampler drifting once trials are pruned.

    python benchmarks/pruning.py              # ~8 minutes on 2 CPU cores
    python benchmarks/pruning.py --seed 1     # another trial sequence (another TPE seed)
    python benchmarks/pruning.py --trials 12 --steps 60   # a quick look

`--grid` adds the replay at several margins, min_progress and patience values: the trade-off
between compute saved and front quality, measured on the same unpruned trials.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import optuna
from optuna.trial import TrialState, create_trial

from nas.pruning import ParetoPruner
from nas.study import StudySpec, run_search

SPACE = {
    "model": {"preset": ["pico", "nano", "micro"], "seq_len": 64},
    "value_residual": {
        "mode": ["vanilla", "resformer", "learnable", "learnable_plus", "svformer", "neutreno",
                 "gated", "dense"],
        "layers": {"pattern": ["all", "last_k"]},
        "lambda1": {"low": 0.25, "high": 5.0, "log": True},
        "lambda2": {"low": 0.25, "high": 1.0},
    },
}


def hv(points: list[tuple[float, float]], ref: tuple[float, float]) -> float:
    """2-D hypervolume by sweeping n_params upwards (both objectives minimised)."""
    pts = sorted((p for p in points if p[0] < ref[0] and p[1] < ref[1]), key=lambda p: p[1])
    area, best_loss = 0.0, ref[0]
    for i, (loss, params) in enumerate(pts):
        best_loss = min(best_loss, loss)
        upper = pts[i + 1][1] if i + 1 < len(pts) else ref[1]
        area += (ref[0] - best_loss) * (upper - params)
    return area


def spec(name: str, storage: str, trials: int, steps: int, pruner: dict,
         seed: int = 0) -> StudySpec:
    return StudySpec(
        name=name, space=SPACE, objectives=["val_loss", "n_params"], n_trials=trials,
        storage=storage, pruner=pruner, sampler={"type": "tpe", "n_startup_trials": 6},
        seed=seed,
        base={"train": {"steps": steps, "batch_size": 16, "lr": 3e-3, "seed": 0,
                        "eval_every": max(1, steps // 10)}},
    )


def front_points(trials: list[optuna.trial.FrozenTrial]) -> list[tuple[float, float]]:
    return [(t.user_attrs["val_loss"], t.user_attrs["n_params"]) for t in trials
            if t.state == TrialState.COMPLETE]


def replay(trials: list[optuna.trial.FrozenTrial], pruner: ParetoPruner,
           steps: int) -> tuple[int, list[optuna.trial.FrozenTrial]]:
    """Apply `pruner` to finished trials in order, from their stored configs and curves."""
    shadow = optuna.create_study(directions=["minimize", "minimize"])
    spent = 0
    for t in sorted(trials, key=lambda t: t.number):
        if t.state != TrialState.COMPLETE:
            continue
        a = t.user_attrs
        if pruner.duplicate_of(shadow, a["config"]):
            continue  # pruned before training: no steps
        curve = a["curve"]
        stopped = next((curve[i][0] for i in range(len(curve)) if pruner.reason_to_prune(
            shadow, a["n_params"], curve[:i + 1], steps)), None)
        spent += stopped if stopped is not None else a["steps_trained"]
        if stopped is None:
            shadow.add_trial(create_trial(values=t.values, user_attrs=a, params=t.params,
                                          distributions=t.distributions))
        else:
            shadow.add_trial(create_trial(state=TrialState.PRUNED, user_attrs=a,
                                          params=t.params, distributions=t.distributions))
    return spent, shadow.get_trials(states=(TrialState.COMPLETE,))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--steps", type=int, default=150)
    defaults = ParetoPruner()
    parser.add_argument("--margin", type=float, default=defaults.margin)
    parser.add_argument("--min-progress", type=float, default=defaults.min_progress)
    parser.add_argument("--patience", type=int, default=defaults.patience)
    parser.add_argument("--seed", type=int, default=0, help="the sampler seed of both runs")
    parser.add_argument("--storage", help="keep both studies here (default: a temporary "
                        "SQLite file); run again with it to replay without training")
    parser.add_argument("--grid", action="store_true", help="also replay a grid of settings")
    args = parser.parse_args()
    pareto = {"type": "pareto", "margin": args.margin, "min_progress": args.min_progress,
              "patience": args.patience}
    with tempfile.TemporaryDirectory() as tmp:
        storage = args.storage or f"sqlite:///{Path(tmp) / 'bench.db'}"
        runs = {}
        settings = f"m{args.margin}-p{args.min_progress}-k{args.patience}"
        for name, study_name, pruner in (
                ("no pruning", f"no-pruning-seed{args.seed}", {"type": "none"}),
                ("pareto pruner", f"pareto-pruner-seed{args.seed}-{settings}", pareto)):
            print(f"running {args.trials} trials: {name}", flush=True)
            study = run_search(spec(study_name, storage, args.trials, args.steps, pruner,
                                    args.seed), progress=False, echo=lambda *_: None)
            runs[name] = study.get_trials()
    trials = runs["no pruning"]
    chosen = ParetoPruner(args.margin, args.min_progress, args.patience)
    spent, kept = replay(trials, chosen, args.steps)
    duplicates = sum(t.user_attrs["steps_trained"] for t in trials
                     if t.state == TrialState.COMPLETE and any(
                         u.number < t.number and u.user_attrs.get("config") ==
                         t.user_attrs["config"] for u in trials))
    live = runs["pareto pruner"]
    rows = {
        "no pruning": (sum(t.user_attrs.get("steps_trained", 0) for t in trials),
                       front_points(trials), len(trials)),
        "pareto pruner (live)": (sum(t.user_attrs.get("steps_trained", 0) for t in live),
                                 front_points(live), len(live)),
        "pareto pruner (replay)": (spent, front_points(kept), len(trials)),
    }
    every = [p for _, pts, _ in rows.values() for p in pts]
    ref = (max(p[0] for p in every) * 1.01, max(p[1] for p in every) * 1.01)
    base_steps, base_pts, _ = rows["no pruning"]
    base_hv = hv(base_pts, ref)
    print(f"\nreference point: val_loss {ref[0]:.4f}, n_params {ref[1]:,.0f}; sampler seed "
          f"{args.seed}; margin {args.margin}, min_progress {args.min_progress}, patience "
          f"{args.patience}; {args.steps} steps a trial")
    print(f"repeated run configs in the unpruned study: {duplicates:,} steps "
          f"({duplicates / base_steps:.1%}); the live run pruned "
          f"{sum('duplicate' in t.user_attrs.get('pruned_reason', '') for t in live)} "
          "duplicate(s)\n")
    if args.grid:
        for margin in (0.0, 0.0025, 0.005, 0.01):
            for progress in (0.1, 0.3):
                for patience in (1, 2):
                    spent, kept = replay(trials, ParetoPruner(margin, progress, patience),
                                         args.steps)
                    rows[f"replay: margin {margin}, min_progress {progress}, patience "
                         f"{patience}"] = (spent, front_points(kept), len(trials))
    print("| run | trials | training steps | steps saved | hypervolume | HV vs no pruning |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, (steps, pts, n) in rows.items():
        saved = 1 - steps / base_steps
        print(f"| {name} | {n} | {steps:,} | {saved:.1%} | {hv(pts, ref):.4g} | "
              f"{hv(pts, ref) / base_hv - 1:+.2%} |")


if __name__ == "__main__":
    main()
