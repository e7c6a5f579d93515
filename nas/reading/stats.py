"""How sure a number is: confidence intervals and an exact paired p-value, from scipy.stats.

- `mean_interval`: the mean of a few values with its 95% interval: a t-interval where the
  values are few (seeds), scipy's BCa bootstrap from `BOOTSTRAP_MIN` values on.
- `sign_flip_p`: the exact two-sided permutation p-value of paired differences (every sign
  flip of every difference; a seeded Monte Carlo sample of them beyond 2^16 pairings).
- `holm`: Holm's step-down adjustment of a family of p-values (every p-value a page shows is
  adjusted across that page's others).
- `FEW_PAIRS`: below this many pairs a statistic is printed with a warning.

No resampler is written by hand here: the intervals are scipy's. Knows nothing of torch or Optuna.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

LEVEL = 0.95
BOOTSTRAP_MIN = 10  # from this many values on, a bootstrap instead of a t-interval
EXACT_MAX = 16  # exact sign flips up to 2^16 pairings
FEW_PAIRS = 3  # a statistic over fewer pairs (or seeds) carries a warning


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    n: int
    method: str  # "t", "bootstrap" or "one value"

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def format(self, digits: int = 4, percent: bool = False) -> str:
        """`+0.0123 [+0.0050, +0.0196]`, or `+1.2% [...]` with percent."""
        def show(v: float) -> str:
            if math.isnan(v):
                return "n/a"
            return f"{v:+.1%}" if percent else f"{v:+.{digits}f}"

        if self.n < 2 or math.isnan(self.low):
            return show(self.mean) + (" (one value)" if self.n < 2 else " (no interval)")
        return f"{show(self.mean)} [{show(self.low)}, {show(self.high)}]"


def mean_interval(values: Sequence[float], level: float = LEVEL) -> Interval:
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return Interval(math.nan, math.nan, math.nan, 0, "none")
    mean = float(x.mean())
    if x.size < 2:
        return Interval(mean, math.nan, math.nan, 1, "one value")
    if x.size < BOOTSTRAP_MIN:
        sem = float(stats.sem(x))
        if sem == 0:
            return Interval(mean, mean, mean, int(x.size), "t")
        low, high = stats.t.interval(level, x.size - 1, loc=mean, scale=sem)
        return Interval(mean, float(low), float(high), int(x.size), "t")
    res = stats.bootstrap((x,), np.mean, confidence_level=level, method="BCa",
                          n_resamples=9999, rng=np.random.default_rng(0))
    ci = res.confidence_interval
    return Interval(mean, float(ci.low), float(ci.high), int(x.size), "bootstrap")


def sign_flip_p(differences: Sequence[float]) -> float:
    """Two-sided p-value of 'the paired differences are centred on zero' (NaN without any)."""
    d = np.asarray(differences, dtype=float)
    if d.size == 0:
        return math.nan
    if d.size < 2 or not np.any(d):
        return 1.0  # one difference: its two sign flips are equally extreme
    exact = d.size <= EXACT_MAX
    res = stats.permutation_test(
        (d,), np.mean, permutation_type="samples", alternative="two-sided",
        n_resamples=np.inf if exact else 99_999, rng=np.random.default_rng(0))
    return float(res.pvalue)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the order given (NaN stays NaN, outside the
    family): the i-th smallest of m is multiplied by m - i, kept monotone, capped at 1."""
    family = sorted((p, i) for i, p in enumerate(pvalues) if not math.isnan(p))
    adjusted = [math.nan] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(family):
        running = max(running, min(1.0, (len(family) - rank) * p))
        adjusted[i] = running
    return adjusted
