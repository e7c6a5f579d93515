"""Benchmark: what replicate seeds per trial (`replicates: R`, nas.search.replicates) cost and buy.

One small study (SPACE and BASE: seven modes at 2-3 layers of d_model 32, coefficients on a
grid, tens of steps a trial, val_loss alone, TPE, the vanilla baselines queued first as in every
study) is searched three times through `nas.search.worker.run_search`: with R = 1, with R = 2
(each trial the mean of two seeds), and with R = 1 and twice the trials (the same training
budget as R = 2). Each search's top 5 plans (distinct run configs, by search-time val_loss) are
then trained again on S fresh seeds, the same ones for every search (a plan in several top 5s
trains once), chosen above every seed any search used by `nas.confirm`'s own rule
(`study_seeds` with the study's replicates, `fresh_seeds`).

Prints one Markdown table, a row per search: the process CPU seconds of the search; the
Spearman and Kendall rank correlations between the top 5's search-time order and their order
by confirmed mean test loss (1: the search ranked them as fresh seeds do); and the confirmed
test loss of the search's winner (mean over the fresh seeds, 95% t-interval), with its rank
among every plan confirmed. One study and one sampler seed: a measurement of this study, not a
law.

    python benchmarks/replicates.py --threads 1          # docs/searching.md's table
    python benchmarks/replicates.py --trials 4 --seeds 2 --steps 20 --no-equal-budget  # a smoke run
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import TrialState
from scipy import stats

from nas.config import from_dict
from nas.confirm import fresh_seeds, study_seeds
from nas.reading.stats import mean_interval
from nas.search.spec import StudySpec, load_spec
from nas.search.trials import TrialRecord
from nas.search.worker import run_search

SPACE = {
    "model": {"n_layer": [2, 3]},
    "value_residual": {
        "mode": ["vanilla", "resformer", "learnable", "svformer", "neutreno", "gated", "dense"],
        "layers": {"pattern": ["all", "last_k"]},
        "lambda1": {"low": 0.25, "high": 2.0, "step": 0.25},
        "lambda2": {"low": 0.25, "high": 1.0, "step": 0.25},
        "neutreno_lambda": {"low": 0.25, "high": 2.0, "step": 0.25},
    },
}
BASE = {
    "model": {"d_model": 32, "n_head": 2, "seq_len": 32},
    # eager: compiling would cost a run of tens of steps several times its steps
    "train": {"batch_size": 8, "lr": 3e-3, "seed": 0, "eval_batches": 4, "compile": False},
}
TOP = 5


def spec_file(folder: Path, name: str, replicates: int, trials: int, steps: int,
              sampler_seed: int) -> Path:
    """The study's spec, one per search."""
    base = {**BASE, "train": {**BASE["train"], "steps": steps, "eval_every": steps // 3}}
    spec = {"name": name, "space": SPACE, "base": base, "objectives": ["val_loss"],
            "n_trials": trials, "replicates": replicates, "seed": sampler_seed,
            "sampler": {"type": "tpe", "n_startup_trials": 6},
            "storage": f"sqlite:///{folder / name}.db"}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def search(spec: StudySpec, threads: int) -> tuple[optuna.Study, float]:
    """Run the study; its process CPU seconds (training, sampler and storage alike)."""
    start = time.process_time()
    study = run_search(spec, progress=False, echo=lambda *_: None, threads=threads)
    return study, time.process_time() - start


def top_plans(study: optuna.Study) -> list[TrialRecord]:
    """The study's best TOP distinct run configs, best first (a repeated config's first
    trial stands for it: training is deterministic)."""
    done = sorted((TrialRecord.from_trial(t) for t in study.get_trials(
        deepcopy=False, states=(TrialState.COMPLETE,))), key=lambda r: (r.values[0], r.number))
    seen: dict[str, TrialRecord] = {}
    for r in done:
        seen.setdefault(json.dumps(r.config, sort_keys=True), r)
    return list(seen.values())[:TOP]


def confirmed_losses(config: dict[str, Any], seeds: list[int]) -> list[float]:
    """The config's test loss on each of `seeds`, trained plainly (nas.training.train)."""
    from nas.training.train import train

    out = []
    for seed in seeds:
        raw = json.loads(json.dumps(config))
        raw["train"]["seed"] = seed
        out.append(float(train(from_dict(raw, where="confirm"), progress=False)["test_loss"]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=20, help="trials of the R = 1 and R = 2 "
                        "searches (the equal-budget search runs twice as many)")
    parser.add_argument("--seeds", type=int, default=6, help="fresh seeds per confirmed plan")
    parser.add_argument("--steps", type=int, default=60, help="training steps of every run")
    parser.add_argument("--sampler-seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--no-equal-budget", action="store_true",
                        help="skip the R = 1 search with twice the trials")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    import torch

    torch.set_num_threads(args.threads)
    runs = [("R=1", 1, args.trials), ("R=2", 2, args.trials)]
    if not args.no_equal_budget:
        runs.append((f"R=1, {2 * args.trials} trials", 1, 2 * args.trials))
    wall = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="nas-replicates-") as tmp:
        searched = []
        for i, (label, replicates, trials) in enumerate(runs):
            path = spec_file(Path(tmp), f"replicates-{i}", replicates, trials, args.steps,
                             args.sampler_seed)
            spec = load_spec(path)
            if i == 0:
                # one throw-away run, so that the first search's CPU seconds hold no imports,
                # corpus cache or Lightning start-up that the others skip
                confirmed_losses(spec.draws[0].to_dict(), [0])
            study, cpu = search(spec, args.threads)
            searched.append((label, spec, study, cpu))
        used = set().union(*(study_seeds(study, spec.merged_space, spec.replicates)
                             for _, spec, study, _ in searched))
        seeds = fresh_seeds(used, args.seeds)
        confirmed: dict[str, list[float]] = {}
        confirm_cpu = time.process_time()
        for _, _, study, _ in searched:
            for r in top_plans(study):
                key = json.dumps(r.config, sort_keys=True)
                if key not in confirmed:
                    confirmed[key] = confirmed_losses(r.config, seeds)
        confirm_cpu = time.process_time() - confirm_cpu
    means = {key: mean_interval(losses).mean for key, losses in confirmed.items()}
    order = sorted(means, key=means.get)
    print(f"{len(confirmed)} distinct plans confirmed on fresh seeds {seeds[0]}..{seeds[-1]} "
          f"({confirm_cpu:.0f} CPU s); {time.monotonic() - wall:.0f} s wall in all\n")
    print("| search | CPU s | top-5 Spearman | top-5 Kendall | winner (search val_loss) | "
          "winner's confirmed test loss [95%] | its rank among the confirmed |")
    print("|---|---:|---:|---:|---|---|---:|")
    for label, _, study, cpu in searched:
        top = top_plans(study)
        keys = [json.dumps(r.config, sort_keys=True) for r in top]
        confirmed_order = [means[k] for k in keys]
        rho = stats.spearmanr(range(len(top)), confirmed_order).statistic
        tau = stats.kendalltau(range(len(top)), confirmed_order).statistic
        winner = mean_interval(confirmed[keys[0]])
        print(f"| {label} | {cpu:.0f} | {rho:+.2f} | {tau:+.2f} | "
              f"#{top[0].number} {top[0].label} ({top[0].values[0]:.4f}) | "
              f"{winner.mean:.4f} [{winner.low:.4f}, {winner.high:.4f}] | "
              f"{order.index(keys[0]) + 1} of {len(order)} |")


if __name__ == "__main__":
    main()
