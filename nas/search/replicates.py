"""Replicate seeds (the spec's `replicates: R`): each trial trains its run config on R seeds and
its objective is their mean validation loss, so that a sampler ranks plans, not one seed's luck.

The seeds are the trial's `train.seed` and the R - 1 integers after it (seed, seed + 1, ...):
fixed by the config alone, so a retried trial trains the same ones and `nas confirm` knows
which to keep clear of. Replicate 0 is the trial's own run: the pruner watches it alone, and
the later replicates train only once it has finished (`nas.search.objective`).

What a replicated trial stores (`combine`): the mean over its replicates of each loss and
measured speed, the per-window mean of the validation and test windows (every seed is scored on
the same fixed windows, so windows pair up across seeds and across trials), each replicate's
own losses, and the standard error of the mean over the replicates. The rest (curve, learned
coefficients, analysis, numerics) is replicate 0's. Knows nothing of torch.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

MAX_REPLICATES = 16
SEED_LIMIT = 2**32  # train.seed's bound (nas.config)
# Measured per replicate and stored as their mean (the rest of a run's metrics is the same for
# every replicate, or replicate 0's; `combine`).
AVERAGED = ("val_loss", "test_loss", "tokens_per_s", "decode_tokens_per_s")


def replicate_seeds(seed: int, replicates: int) -> list[int]:
    """The seeds a trial whose config has `train.seed` = `seed` trains on."""
    return list(range(seed, seed + replicates))


def mean_and_se(values: Sequence[float]) -> tuple[float, float]:
    """The mean of `values` and its standard error (sample standard deviation over sqrt(n));
    0.0 for one value, which measures no spread."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, statistics.stdev(values) / math.sqrt(len(values))


def _window_means(runs: Sequence[dict[str, Any]], key: str) -> list[float] | None:
    """Each evaluation window's loss averaged over the replicates (None where a run lacks
    them: no test split)."""
    columns = [run.get(key) for run in runs]
    if any(not c for c in columns) or len({len(c) for c in columns}) != 1:
        return None
    return [round(statistics.fmean(window), 5) for window in zip(*columns, strict=True)]


def combine(runs: Sequence[dict[str, Any]], seeds: Sequence[int]) -> dict[str, Any]:
    """A replicated trial's metrics from its runs' (`nas.training.train.train`'s, replicate 0
    first): replicate 0's, with the averaged measurements, the windows' means and their
    standard errors in place of its own, the steps' seconds summed (what the trial cost), and
    the replicate fields of `nas.search.trials.TrialRecord`."""
    if len(runs) != len(seeds) or len(runs) < 2:
        raise ValueError(f"{len(runs)} runs for {len(seeds)} seeds: combine needs one run per "
                         "seed, two or more")
    out = dict(runs[0])
    for key in AVERAGED:
        values = [run.get(key) for run in runs]
        out[key] = None if any(v is None for v in values) else statistics.fmean(values)
    out["val_ppl"] = math.exp(out["val_loss"])
    out["train_seconds"] = sum(run["train_seconds"] for run in runs)
    for split in ("val", "test"):
        windows = _window_means(runs, f"{split}_batch_losses")
        out[f"{split}_batch_losses"] = windows
        # the windows' spread around the trial's mean loss, as one run stores its own
        out[f"{split}_loss_se"] = None if windows is None else round(mean_and_se(windows)[1], 6)
    val = [float(run["val_loss"]) for run in runs]
    out.update(replicate_seeds=list(seeds), replicate_val_losses=val,
               replicate_val_se=mean_and_se(val)[1])
    if out["test_loss"] is not None:
        test = [float(run["test_loss"]) for run in runs]
        out.update(replicate_test_losses=test, replicate_test_se=mean_and_se(test)[1])
    return out


# The TrialRecord fields `combine` adds to a run's metrics.
FIELDS = ("replicate_seeds", "replicate_val_losses", "replicate_val_se",
          "replicate_test_losses", "replicate_test_se")
