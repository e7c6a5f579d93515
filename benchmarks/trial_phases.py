"""Where a study trial's wall time goes: training steps against everything else.

    python benchmarks/trial_phases.py studies/resformer_primary.yaml --trials 4 --threads 1

Runs the first `--trials` trials of the spec's queue (or sampler) in a fresh SQLite study under
a temporary folder, with the spec's own settings, and times each phase of every trial by
wrapping the functions that do it (instrumentation of this script only; the package is
unchanged): the training steps (`train_seconds`, what a trial stores), validation during
training, the final validation, the test, the decode-speed measurement, the per-layer analysis,
the data set-up, the model and trainer set-up, the study's storage writes, and the rest (the
trainer's loop between steps, the sampler, the lease). Prints one row per trial and the median
share of each phase. The trial's wall time is Optuna's (start to end), as the stored
`datetime_start` and `datetime_complete` give it.
"""

from __future__ import annotations

import argparse
import collections
import functools
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import optuna
import torch

import nas.search.objective
import nas.training.train
from nas.search.spec import load_spec

PHASES = ("steps", "val during fit", "final val", "test", "decode", "analysis", "data set-up",
          "storage writes", "other")
spent: dict[str, float] = collections.defaultdict(float)


def timed(phase: str, fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[phase] += time.perf_counter() - t0
    return wrapper


class ValidationTimer(pl.Callback):
    """The validations inside fit (the final one and the test run outside it)."""

    def on_validation_start(self, trainer, pl_module):
        self.t0 = time.perf_counter()

    def on_validation_end(self, trainer, pl_module):
        if trainer.state.fn == "fit":
            spent["val during fit"] += time.perf_counter() - self.t0


def instrument() -> None:
    nas.training.train.decode_tokens_per_s = timed("decode", nas.training.train.decode_tokens_per_s)
    nas.training.train.analyze_windows = timed("analysis", nas.training.train.analyze_windows)
    nas.search.objective.write_record = timed("storage writes", nas.search.objective.write_record)
    data = nas.training.train.TokenDataModule
    data.for_run = classmethod(timed("data set-up", data.for_run.__func__))
    pl.Trainer.validate = timed("final val", pl.Trainer.validate)
    pl.Trainer.test = timed("test", pl.Trainer.test)
    init = pl.Trainer.__init__

    def with_timer(self, *args: Any, callbacks: list | None = None, **kwargs: Any) -> None:
        init(self, *args, callbacks=[*(callbacks or []), ValidationTimer()], **kwargs)

    pl.Trainer.__init__ = with_timer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study")
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], dest="sets",
                        metavar="KEY=VALUE", help="an override of the spec's space (nas --set)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    instrument()
    from nas.search.worker import run_search

    spec = load_spec(args.study, sets=args.sets)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'phases.db'}"
        study = None
        for _ in range(args.trials):
            spent.clear()
            study = run_search(spec, url, n_trials=1, progress=False, echo=lambda _: None,
                               threads=args.threads)
            # the trial this call ran (a sweep's queue holds others, waiting)
            t = max(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)),
                    key=lambda t: t.datetime_complete)
            wall = (t.datetime_complete - t.datetime_start).total_seconds()
            steps = t.user_attrs.get("train_seconds", 0.0)
            row = {"trial": t.number, "wall": wall, "steps": steps, **spent}
            row["other"] = wall - sum(row.get(p, 0.0) for p in PHASES[:-1])
            n_layer = t.user_attrs.get("config", {}).get("model", {}).get("n_layer", "?")
            row["label"] = f"{t.params.get('variant', '?')} {n_layer}L"
            rows.append(row)
    print(f"{args.study} ({', '.join(args.sets) or 'as specified'}), {args.threads} thread(s)")
    print("| trial | plan | wall s | " + " | ".join(PHASES) + " |")
    print("|---:|---|---:|" + "---:|" * len(PHASES))
    for r in rows:
        print(f"| {r['trial']} | {r['label']} | {r['wall']:.1f} | " + " | ".join(
            f"{r.get(p, 0.0) / r['wall']:.1%}" for p in PHASES) + " |")
    print("| **median share** | | | " + " | ".join(
        f"{statistics.median(r.get(p, 0.0) / r['wall'] for r in rows):.1%}" for p in PHASES)
        + " |")


if __name__ == "__main__":
    main()
