"""Benchmark: which sampler maps the front fastest, on one fixed budget.

random, TPE, NSGA-II and GP, each built by `nas.search.samplers.make_sampler` as a study spec names
it, run the same small study (SPACE: every mode family, two to four layers, coefficients on a grid;
the objectives of the shipped studies, val_loss and n_params, or `--objectives`), or with
`--study SPEC` that spec's own space, base and objectives (its sampler, pruner, n_trials and
seed aside), for 30 trials, the vanilla baselines of each size queued first as in every study,
under 3 sampler seeds. After
each trial the hypervolume of the front so far is recorded, against one reference point for
every run (1% beyond the worst value of each objective among all trained configs), as a share
of the hypervolume of the front of every config trained (the best front this benchmark knows).

Training is deterministic (the same run config trains to the same numbers: the Pareto pruner's
duplicate rule relies on it), so each distinct run config trains once, at its first visit by
any sampler, and later visits read its result back: a table of trial results, filled as the
samplers ask and kept in a JSON file (`--table`), so that a second invocation trains only what
it has not seen. Every sampler thus meets one landscape, with no training noise between them,
and the whole benchmark trains each config once (a space of continuous coefficients, as the
quickstart's, repeats few configs but its baselines and the samplers' shared start-up draws).
The table's configs are also the best front, so each space keeps its own table: `--study`
defaults to runs/samplers-table-NAME.json. The built-in corpus is read from its cached file
(the same bytes; no re-listing of the standard library per trial).

    OMP_NUM_THREADS=1 python benchmarks/samplers.py            # docs/searching.md's table
    python benchmarks/samplers.py --objectives val_loss n_params kv_bytes_per_token
    OMP_NUM_THREADS=1 python benchmarks/samplers.py --study studies/quickstart.yaml

Prints a Markdown table per sampler: the hypervolume share after 10, 20 and 30 trials (mean
over seeds, and the worst seed at 30), its mean over the 30 trials (how early the front is
found), and the sampler's own seconds per trial (training excluded).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna._hypervolume import compute_hypervolume
from optuna.trial import TrialState

from nas.config import from_dict
from nas.errors import ConfigError
from nas.search import space as spaces
from nas.search.samplers import make_sampler
from nas.search.spec import StudySpec, load_spec
from nas.search.study import enqueue_baselines
from nas.search.trials import OBJECTIVES, PLANNED, TrialRecord

SPACE = {
    "model": {"n_layer": [2, 3, 4]},
    "value_residual": {
        "mode": ["vanilla", "resformer", "learnable", "learnable_plus", "svformer", "neutreno",
                 "gated", "dense"],
        "layers": {"pattern": ["all", "last_k"]},
        # on a grid: a finite space, so that samplers meet the same configs again
        "lambda1": {"low": 0.25, "high": 2.0, "step": 0.25},
        "lambda2": {"low": 0.25, "high": 1.0, "step": 0.25},
        "neutreno_lambda": {"low": 0.25, "high": 2.0, "step": 0.25},
    },
}
BASE = {
    "model": {"d_model": 32, "n_head": 2, "seq_len": 32},
    # eager: compiling would cost a 40-step training several times its steps
    "train": {"steps": 40, "batch_size": 8, "lr": 3e-3, "seed": 0, "eval_every": 20,
              "eval_batches": 2, "compile": False},
}
# Each as a study spec would name it. NSGA-II with the population of studies/nsga2.yaml: its
# default of 50 would never leave its random first generation in 30 trials.
SAMPLERS = {"random": {"type": "random"}, "tpe": {"type": "tpe"},
            "nsga2": {"type": "nsga2", "population_size": 10}, "gp": {"type": "gp"}}
STORED = ("val_loss", *PLANNED)  # what the table keeps of a training: its deterministic numbers
TABLE = "runs/samplers-table.json"


class ResultTable:
    """Run config -> its trained numbers (STORED), trained on first use, kept in a JSON file."""

    def __init__(self, path: Path):
        self.path = path
        self.rows: dict[str, dict[str, float]] = (
            json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {})
        self.trained, self.train_seconds = 0, 0.0

    def result(self, raw: dict[str, Any]) -> dict[str, float]:
        cfg = from_dict(raw, where="benchmark trial")
        key = json.dumps(cfg.to_dict(), sort_keys=True)
        if key not in self.rows:
            from nas.training.train import train

            start = time.perf_counter()
            metrics = train(cfg, progress=False)
            self.train_seconds += time.perf_counter() - start
            self.trained += 1
            self.rows[key] = {name: metrics[name] for name in STORED}
            self.save()
        return self.rows[key]

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.rows), encoding="utf-8")
        tmp.replace(self.path)


def run(kind: str, seed: int, trials: int, objectives: list[str], space: dict, base: dict,
        table: ResultTable) -> tuple[list[list[float] | None], float]:
    """One study of `trials` trials with sampler `kind` on `space` over `base`: each trial's
    objective values (None for a config the run config refuses, pruned as the objective
    would) and the seconds spent outside training (the sampler, mostly)."""
    spec = StudySpec(name=f"{kind}-{seed}", space=space, base=base, objectives=objectives,
                     n_trials=trials, sampler=SAMPLERS[kind], seed=seed)
    study = optuna.create_study(directions=[OBJECTIVES[o] for o in objectives],
                                sampler=make_sampler(spec, seed))
    enqueue_baselines(study, spec)
    merged = spec.merged_space
    points: list[list[float] | None] = []
    start, trained_before = time.perf_counter(), table.train_seconds
    for _ in range(trials):
        trial = study.ask()
        force = "vanilla" if TrialRecord.from_trial(trial).baseline else None
        try:
            row = table.result(spaces.sample(merged, trial, force_mode=force))
        except ConfigError:
            study.tell(trial, state=TrialState.PRUNED)
            points.append(None)
            continue
        values = [float(row[o]) for o in objectives]
        study.tell(trial, values)
        points.append(values)
    overhead = time.perf_counter() - start - (table.train_seconds - trained_before)
    return points, overhead / trials


def minimized(values: list[float], objectives: list[str]) -> list[float]:
    return [v if OBJECTIVES[o] == "minimize" else -v for v, o in zip(values, objectives,
                                                                       strict=True)]


def hypervolume(points: list[list[float]], ref: np.ndarray) -> float:
    inside = [p for p in points if all(a < b for a, b in zip(p, ref, strict=True))]
    return float(compute_hypervolume(np.array(inside), ref)) if inside else 0.0


def history(points: list[list[float] | None], ref: np.ndarray, best: float) -> list[float]:
    """The hypervolume share of the front after each trial."""
    seen: list[list[float]] = []
    shares = []
    for p in points:
        if p is not None:
            seen.append(p)
        shares.append(hypervolume(seen, ref) / best)
    return shares


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=SAMPLERS)
    parser.add_argument("--study", metavar="SPEC",
                        help="a study spec whose space, base and objectives to run instead")
    parser.add_argument("--objectives", nargs="+", choices=STORED,
                        help="val_loss first, then any known before training (default: the "
                        "study's, else val_loss n_params)")
    parser.add_argument("--table", help=f"JSON file of trained results (default: {TABLE}, "
                        "or runs/samplers-table-NAME.json for --study)")
    args = parser.parse_args()
    import torch

    from nas.training.data import builtin_corpus
    from nas.training.train import quiet_lightning

    if args.study:
        spec = load_spec(args.study)
        space, base = spec.space, spec.base
        objectives = args.objectives or spec.objectives
        table_path = args.table or f"runs/samplers-table-{spec.name}.json"
    else:
        space, base = SPACE, BASE
        objectives = args.objectives or ["val_loss", "n_params"]
        table_path = args.table or TABLE
    # a measured objective (a speed) varies between runs of one config: the table keeps none
    measured = [o for o in objectives if o not in STORED]
    if measured:
        parser.error(f"{args.study}: objectives: {', '.join(measured)} is measured, not kept "
                     f"in the table; pass --objectives from {', '.join(STORED)}")
    torch.set_num_threads(1)
    quiet_lightning()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    if base.get("data", {}).get("source", "builtin") == "builtin":
        base = spaces.merge(base, {"data": {"source": str(builtin_corpus())}})
    table = ResultTable(Path(table_path))
    began = time.perf_counter()
    runs: dict[tuple[str, int], tuple[list[list[float] | None], float]] = {}
    for kind in args.samplers:
        for seed in args.seeds:
            runs[kind, seed] = run(kind, seed, args.trials, objectives, space, base, table)
            print(f"{kind} seed {seed}: done ({table.trained} configs trained so far)",
                  flush=True)
    # One reference point and one best front for all runs: every config trained, as minimised.
    every = [minimized([row[o] for o in objectives], objectives)
             for row in table.rows.values()]
    ref = np.array(every).max(axis=0)
    ref = ref + 0.01 * np.abs(ref)
    best = hypervolume(every, ref)
    print(f"\n{args.trials} trials a run, seeds {' '.join(map(str, args.seeds))}; objectives "
          f"{', '.join(objectives)}; {len(table.rows)} distinct configs in the table, "
          f"{table.trained} trained now in {table.train_seconds:.0f} s; "
          f"{time.perf_counter() - began:.0f} s in all\n")
    marks = [m for m in (10, 20, args.trials) if m <= args.trials]
    print("| sampler | " + " | ".join(f"HV after {m}" for m in marks)
          + " | worst seed at " + str(args.trials) + " | mean over trials | sampler s/trial |")
    print("|---|" + "---:|" * (len(marks) + 3))
    for kind in args.samplers:
        curves = [history([None if p is None else minimized(p, objectives)
                           for p in runs[kind, s][0]], ref, best) for s in args.seeds]
        at = [statistics.fmean(c[m - 1] for c in curves) for m in marks]
        worst = min(c[-1] for c in curves)
        area = statistics.fmean(statistics.fmean(c) for c in curves)
        seconds = statistics.fmean(runs[kind, s][1] for s in args.seeds)
        print(f"| {kind} | " + " | ".join(f"{v:.1%}" for v in at)
              + f" | {worst:.1%} | {area:.1%} | {seconds:.2f} |")


if __name__ == "__main__":
    main()
