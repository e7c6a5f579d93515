"""Loss against a size axis (non-embedding parameters, or training tokens): the curves that
savings are read off. `fit_scaling` fits a power law with an offset (log-linear from two
points); `interpolate` draws straight lines between adjacent measured points in log x, for axes
no law fits. Both answer the same two questions: the loss at x, and the x at a loss. Numpy only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np


@dataclass
class ScalingFit:
    """loss = a + b * (N / n_ref)^-alpha ("power"), or loss = a + b * log(N / n_ref) ("log")."""

    kind: str
    a: float
    b: float
    alpha: float
    n_ref: float
    n_min: float
    n_max: float
    residuals: list[float] = field(default_factory=list)  # measured minus fitted, by size

    @property
    def n_free(self) -> int:
        return 3 if self.kind == "power" else 2

    def loss(self, n: np.ndarray | float) -> np.ndarray | float:
        x = np.asarray(n, dtype=float) / self.n_ref
        if self.kind == "power":
            return self.a + self.b * x ** -self.alpha
        return self.a + self.b * np.log(x)

    def size(self, loss: float) -> float | None:
        """The parameter count at which the fit reaches `loss`, or None if it never does."""
        if self.kind == "power":
            if loss <= self.a:
                return None
            return float(self.n_ref * ((loss - self.a) / self.b) ** (-1.0 / self.alpha))
        return float(self.n_ref * math.exp((loss - self.a) / self.b))

    def describe(self) -> str:
        if self.kind == "power":
            return f"L = {self.a:.3f} + {self.b:.3f}·(N/{self.n_ref:,.0f})^-{self.alpha:.2f}"
        return f"L = {self.a:.3f} {self.b:+.3f}·ln(N/{self.n_ref:,.0f})"


def fit_scaling(n_params: list[float], losses: list[float]) -> ScalingFit | None:
    """Fit loss against parameters: a power law with an offset from three sizes on, a
    log-linear law from two; None when there are fewer sizes or the loss does not fall."""
    n, y = np.asarray(n_params, dtype=float), np.asarray(losses, dtype=float)
    if len(np.unique(n)) < 2:
        return None
    n_ref = float(np.exp(np.log(n).mean()))
    x = n / n_ref
    if len(np.unique(n)) >= 3:
        power = _fit_power(x, y)
        if power is not None:
            fit = ScalingFit("power", *power[:2], power[2], n_ref, float(n.min()),
                             float(n.max()))
            fit.residuals = [float(r) for r in y - fit.loss(n)]
            return fit
    slope, intercept = np.polyfit(np.log(x), y, 1)
    if slope >= 0:
        return None
    fit = ScalingFit("log", float(intercept), float(slope), 0.0, n_ref, float(n.min()),
                     float(n.max()))
    fit.residuals = [float(r) for r in y - fit.loss(n)]
    return fit


def _fit_power(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float] | None:
    """Least squares over alpha (a grid, then a finer one around the best); a and b are
    linear given alpha, solved in closed form for every alpha of a grid at once."""
    best: tuple[float, float, float, float] | None = None
    grid = np.linspace(0.02, 2.0, 199)
    for _ in range(2):
        basis = x[None, :] ** -grid[:, None]  # (alphas, points)
        centred = basis - basis.mean(axis=1, keepdims=True)
        b = (centred @ (y - y.mean())) / (centred ** 2).sum(axis=1)
        a = y.mean() - b * basis.mean(axis=1)
        sse = ((a[:, None] + b[:, None] * basis - y[None, :]) ** 2).sum(axis=1)
        sse = np.where(b > 0, sse, np.inf)
        i = int(np.argmin(sse))
        if not np.isfinite(sse[i]):
            return None
        best = (float(sse[i]), float(a[i]), float(b[i]), float(grid[i]))
        grid = np.linspace(max(0.005, best[3] - 0.01), best[3] + 0.01, 81)
    assert best is not None
    return best[1], best[2], best[3]


@dataclass
class Interpolation:
    """Loss against x through the measured means, piecewise linear in log x: no functional form
    and no reading outside the measured range. The tokens axis uses it: runs with their own
    schedules do not follow one power law (its residuals reached 0.09 nats on
    studies/resformer_tokens.yaml), so only adjacent budgets inform a reading."""

    xs: list[float]
    losses: list[float]

    @property
    def n_min(self) -> float:
        return self.xs[0]

    @property
    def n_max(self) -> float:
        return self.xs[-1]

    @property
    def n_free(self) -> int:
        return len(self.xs)  # one value per point: it passes through every mean

    @property
    def residuals(self) -> list[float]:
        return [0.0] * len(self.xs)

    def loss(self, n: np.ndarray | float) -> np.ndarray | float:
        return np.interp(np.log(n), np.log(self.xs), self.losses)

    def size(self, loss: float) -> float | None:
        """The smallest x, between two measured points, at which the line through them reaches
        `loss`; None if no segment does."""
        lx = np.log(self.xs)
        for i in range(len(self.xs) - 1):
            lo, hi = sorted((self.losses[i], self.losses[i + 1]))
            if lo <= loss <= hi and self.losses[i] != self.losses[i + 1]:
                share = (self.losses[i] - loss) / (self.losses[i] - self.losses[i + 1])
                return float(np.exp(lx[i] + share * (lx[i + 1] - lx[i])))
        return None

    def describe(self) -> str:
        return f"piecewise linear in ln x through {len(self.xs)} means"


def interpolate(xs: list[float], losses: list[float]) -> Interpolation | None:
    """The Interpolation through (x, loss) points sorted by x; None with fewer than 2 x."""
    if len(set(xs)) < 2:
        return None
    order = np.argsort(xs)
    return Interpolation([float(xs[i]) for i in order], [float(losses[i]) for i in order])


Curve = ScalingFit | Interpolation
FITTERS: dict[str, Callable[[list[float], list[float]], Curve | None]] = {
    "parameters": fit_scaling, "tokens": interpolate}
