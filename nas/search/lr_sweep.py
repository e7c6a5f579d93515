"""The learning-rate protocols of a named-variant study, and the queue that carries them out.

A *sweep* study names variants and lists `train.lr` and `train.seed`; its bruteforce sampler
is replaced by a queue (this module): every trial it trains is queued here, as soon as it is due.
An *arm* is one (variant, model shape, budget): the trials that differ only in rate and seed.

Protocols (`lr_sweep.protocol`), by what chooses an arm's rate and what reports it:
- `all_seeds` (the default): every rate on every seed; the rate with the lowest mean
  validation loss over all seeds is chosen, and the test loss at it is reported.
- `crossfit`: every rate on every seed, and the seeds split into two halves (sorted, the
  first half the larger when odd): each half's runs are reported at the rate the *other* half
  chose. No seed both chooses a rate and is reported at it, so no seed's luck can tilt the
  reported number; the two halves' choices and their agreement are reported too.
- `first_seed` (cheap, biased): the grid on the first seed only, then the other seeds at the
  rate it chose: L + S - 1 runs per arm instead of L x S. The first seed's run at the chosen rate
  is both what chose it and a reported run.

Grid extension (`lr_sweep.extend: N`): where an arm's choice (for crossfit, either half's) lies
at an edge of the rates it ran, the queue adds the next rate beyond that edge, at the grid's own
geometric spacing, for that arm alone, on every seed that chooses, until the optimum is
interior or N rates were added at that side. The extension rates are fixed by the grid and N
(`candidates`), so every trial draws its rate from one categorical list.

A derived study (`nas confirm`) is queue-driven too, by a fixed list (`StudySpec.queue`):
`enqueue_missing` queues what of it the study neither holds nor has queued, as `pending` does.

Knows nothing of torch.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from typing import Annotated, Any, Literal

import optuna
from optuna.trial import TrialState
from pydantic import Field
from pydantic.dataclasses import dataclass

from nas.parsing import STRICT, Refusal, refuse
from nas.search.trials import TrialRecord

PROTOCOLS = ("all_seeds", "crossfit", "first_seed")
MAX_EXTEND = 8  # rates added beyond one edge: 8 steps of sqrt(2) is a factor of 16
MAX_SPACING = math.sqrt(2)  # the widest step between neighbouring rates of a chosen grid
SPACING_SLACK = 1.02  # rates written with 3-4 significant digits are not exactly geometric
DIGITS = 4  # significant digits of an extension rate
PROTOCOL_ATTR = "lr_sweep"  # the study attribute the readers choose arms by


@dataclass(config=STRICT, kw_only=True)
class Sweep:
    """The spec's `lr_sweep` section (`lr_sweep: crossfit` is short for
    `lr_sweep: {protocol: crossfit}`)."""

    protocol: Annotated[Literal[PROTOCOLS], Refusal(
        f"must be one of {', '.join(PROTOCOLS)}, got {{value!r}}")] = "all_seeds"
    extend: Annotated[int, Refusal(f"must be an integer in 0..{MAX_EXTEND} (rates added beyond "
                                   "each edge of the grid), got {value!r}")] = Field(
        0, ge=0, le=MAX_EXTEND)

    @property
    def default(self) -> bool:
        """The settings of a spec without the section (its fingerprint leaves them out)."""
        return self.protocol == "all_seeds" and self.extend == 0


def sweep_section(raw: Any) -> Any:
    """The spec's `lr_sweep` value as a Sweep (the shorthand `lr_sweep: NAME` too). Built here
    rather than by pydantic: a strict section accepts only its own instances."""
    if isinstance(raw, Sweep):
        return raw
    if isinstance(raw, str):
        raw = {"protocol": raw}
    if not isinstance(raw, dict):
        raise refuse(f"must be one of {', '.join(PROTOCOLS)} or a mapping with keys protocol, "
                     f"extend; got {raw!r}")
    return Sweep(**{str(k): v for k, v in raw.items()})


def is_sweep(space: dict) -> bool:
    """A named-variant space with a learning-rate grid and several seeds."""
    train = space.get("train", {})
    return bool(space.get("variants")) and all(
        isinstance(train.get(k), list) and len(train[k]) >= 2 for k in ("lr", "seed"))


def spacing(rates: Sequence[float]) -> float:
    """The geometric step of a sorted grid (its mean ratio between neighbours)."""
    r = sorted(rates)
    return (r[-1] / r[0]) ** (1 / (len(r) - 1))


def check_grid(rates: Sequence[float], sweep: Sweep) -> str | None:
    """What is wrong with a grid for `sweep` (None: nothing). all_seeds and crossfit are the
    protocols whose choice this project reports as sound: their grids step by sqrt(2) at most,
    and an extended grid is geometric, so that its next rate is defined."""
    r = sorted(rates)
    if len(set(r)) != len(r):
        return f"the rates must differ, got {list(rates)}"
    steps = [b / a for a, b in zip(r, r[1:], strict=False)]
    if sweep.protocol != "first_seed" and max(steps) > MAX_SPACING * SPACING_SLACK:
        return (f"neighbouring rates must be at most sqrt(2) apart for lr_sweep "
                f"{sweep.protocol} (a coarser grid leaves the optimum between two rates), got a "
                f"step of {max(steps):.3g}x; add rates in between")
    if sweep.extend and max(steps) / min(steps) > SPACING_SLACK ** 2:
        return (f"lr_sweep.extend needs a geometric grid (equal ratios between neighbours) to "
                f"know the next rate, got steps from {min(steps):.3g}x to {max(steps):.3g}x")
    return None


def candidates(rates: Sequence[float], extend: int) -> list[float]:
    """The grid and the `extend` rates beyond each edge at its spacing, ascending: every rate a
    trial of the sweep can draw."""
    r, step = sorted(rates), spacing(rates)
    below = [_round(r[0] / step ** k) for k in range(extend, 0, -1)]
    above = [_round(r[-1] * step ** k) for k in range(1, extend + 1)]
    return below + r + above


def _round(x: float) -> float:
    return float(f"{x:.{DIGITS}g}")


def choosing_halves(seeds: Iterable[int]) -> list[list[int]]:
    """crossfit's two halves of the seeds, sorted; the first is the larger when odd."""
    s = sorted(seeds)
    cut = (len(s) + 1) // 2
    return [s[:cut], s[cut:]]


def choosers(protocol: str, seeds: Sequence[int]) -> list[list[int]]:
    """The groups of seeds that each choose a rate under `protocol`."""
    if protocol == "crossfit":
        return choosing_halves(seeds)
    if protocol == "first_seed":
        return [[seeds[0]]]
    return [sorted(seeds)]


def best_rate(val: dict[float, dict[int, float]], seeds: Iterable[int]) -> float | None:
    """The rate with the lowest mean validation loss over `seeds`, among the rates every one of
    those seeds completed (`val[rate][seed]`); None where no rate has them all."""
    seeds = list(seeds)
    means = {lr: sum(by_seed[s] for s in seeds) / len(seeds)
             for lr, by_seed in val.items() if all(s in by_seed for s in seeds)}
    return min(means, key=means.get) if means else None


def grid(space: dict) -> list[dict[str, Any]]:
    """Every combination of the space's categorical choices of `variant` and of the model and
    train sections, as trial params (the grid a brute-force sampler walks)."""
    import itertools

    axes: dict[str, list] = {}
    if space.get("variants"):
        axes["variant"] = list(space["variants"])
    for section in ("model", "train"):
        for key, value in space.get(section, {}).items():
            if isinstance(value, list):
                axes[f"{section}.{key}"] = value
    return [dict(zip(axes, combo, strict=True)) for combo in itertools.product(*axes.values())]


def first_runs(space: dict, sweep: Sweep, seed: int) -> list[dict[str, Any]]:
    """The runs every arm starts with, in a seeded random order (an interrupted study has
    sampled every variant and size alike): every rate on every seed, or on the first seed
    alone under first_seed."""
    seeds = space["train"]["seed"]
    params = [p for p in grid(space)
              if sweep.protocol != "first_seed" or p["train.seed"] == seeds[0]]
    random.Random(seed).shuffle(params)
    return params


def _arm(params: dict[str, Any]) -> tuple:
    return tuple(sorted((k, v) for k, v in params.items() if k not in ("train.lr", "train.seed")))


def _key(params: dict[str, Any]) -> tuple:
    return tuple(sorted(params.items()))


def pending(study: optuna.Study, space: dict, sweep: Sweep, seed: int) -> list[dict[str, Any]]:
    """The trials the protocol needs that the study neither holds nor has queued: the first
    runs (all of them for a new study, a failed one again), then per arm whose choosing seeds
    have completed every rate it ran, either the next rate beyond an edge (extension) or, under
    first_seed, the other seeds at the chosen rate."""
    seeds, grid_rates = space["train"]["seed"], space["train"]["lr"]
    allowed = candidates(grid_rates, sweep.extend)
    trials = study.get_trials(deepcopy=False)
    held = _held(trials)
    rates_run: dict[tuple, set[float]] = {}
    for p in held:
        if "train.lr" in p:
            rates_run.setdefault(_arm(p), set()).add(p["train.lr"])
    val: dict[tuple, dict[float, dict[int, float]]] = {}
    for t in trials:
        if t.state == TrialState.COMPLETE and "train.lr" in t.params:
            loss = TrialRecord.from_trial(t).val_loss
            val.setdefault(_arm(t.params), {}).setdefault(t.params["train.lr"], {})[
                t.params["train.seed"]] = loss
    runs_on = seeds[:1] if sweep.protocol == "first_seed" else seeds
    wanted = first_runs(space, sweep, seed)
    for arm, by_rate in val.items():
        ran = sorted(rates_run.get(arm, set()) | set(grid_rates))
        done = {lr: by_rate.get(lr, {}) for lr in ran}
        groups = choosers(sweep.protocol, seeds)
        if not all(s in done[lr] for group in groups for s in group for lr in ran):
            continue  # a choosing seed has not run every rate yet
        chosen = [best_rate(done, group) for group in groups]
        beyond = set()
        for c in chosen:
            if c == ran[0] and allowed.index(ran[0]) > 0:
                beyond.add(allowed[allowed.index(ran[0]) - 1])
            elif c == ran[-1] and allowed.index(ran[-1]) < len(allowed) - 1:
                beyond.add(allowed[allowed.index(ran[-1]) + 1])
        for lr in sorted(beyond):
            wanted += [{**dict(arm), "train.lr": lr, "train.seed": s} for s in runs_on]
        if not beyond and sweep.protocol == "first_seed":
            wanted += [{**dict(arm), "train.lr": chosen[0], "train.seed": s} for s in seeds[1:]]
    return missing(trials, wanted)


def queued_params(trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    """The params a trial was queued with (its own once it has them)."""
    return trial.system_attrs.get("fixed_params") or trial.params


def _held(trials: Iterable[optuna.trial.FrozenTrial]) -> list[dict[str, Any]]:
    """The params of every trial held or queued; a failed one is not (it runs again)."""
    return [queued_params(t) for t in trials if t.state != TrialState.FAIL]


def distinct_count(trials: Iterable[optuna.trial.FrozenTrial]) -> int:
    """How many different queued params `trials` hold (copies count once)."""
    return len({_key(queued_params(t)) for t in trials})


def earlier_copy(trials: Iterable[optuna.trial.FrozenTrial], number: int,
                 params: dict[str, Any]) -> int | None:
    """The number of a trial before `number`, not failed, queued with `params`; None if none.
    Two workers can both queue a trial (each finds it missing, then queues it, on any
    storage): the later copy is the surplus one."""
    return next((t.number for t in trials if t.number < number and t.state != TrialState.FAIL
                 and _key(queued_params(t)) == _key(params)), None)


def missing(trials: Iterable[optuna.trial.FrozenTrial], wanted: Iterable[dict[str, Any]]
            ) -> list[dict[str, Any]]:
    """The params of `wanted` that no trial of `trials` holds or has queued."""
    present = {_key(p) for p in _held(trials)}
    return [p for p in wanted if _key(p) not in present]


def enqueue_missing(study: optuna.Study, wanted: list[dict[str, Any]]) -> int:
    """Queue the trials of a fixed list (a derived study's, `StudySpec.queue`) that the study
    neither holds nor has queued; returns how many (a copy another worker queued at the same
    moment is dropped when it is claimed: `earlier_copy`)."""
    todo = missing(study.get_trials(deepcopy=False), wanted)
    for params in todo:
        study.enqueue_trial(params, skip_if_exists=False)
    return len(todo)


def stored_protocol(study: optuna.Study) -> str:
    """The protocol a study was created with (a study from before the attribute: all_seeds,
    which reads a first_seed study as it was read then)."""
    return study.user_attrs.get(PROTOCOL_ATTR, "all_seeds")


def enqueue_pending(study: optuna.Study, space: dict, sweep: Sweep, seed: int) -> int:
    """Queue what `pending` finds; returns how many."""
    todo = pending(study, space, sweep, seed)
    for params in todo:
        study.enqueue_trial(params, skip_if_exists=False)
    return len(todo)


def refusal(sweep: Sweep, space: dict) -> tuple[str, str] | None:
    """(key, problem) where `sweep` cannot run on `space`; None where it can."""
    train = space.get("train", {})
    lr, seeds = train.get("lr"), train.get("seed")
    if sweep.default:
        return None
    if not space.get("variants"):
        return "lr_sweep", f"lr_sweep {sweep.protocol} needs named variants"
    if not isinstance(lr, list) or len(lr) < 2:
        return "train.lr", f"lr_sweep {sweep.protocol} needs a list of at least 2 learning rates"
    if not isinstance(seeds, list) or len(seeds) < 2:
        return "train.seed", f"lr_sweep {sweep.protocol} needs a list of at least 2 seeds"
    return None



def halving_choice(curves: dict[float, list[list[list[float]]]], total_steps: int,
                   fractions: Sequence[float], keep: float) -> tuple[float, float]:
    """Successive halving of one arm's rates, replayed on their validation curves (one curve
    per choosing seed and rate, `[[step, loss], ...]`, the last point the final validation):
    at each fraction of `total_steps` the rates are ranked by their mean loss over the seeds
    at the first validation at or past that step, and the best `keep` share of them (at least
    one) trains on; the survivors' final losses choose. Returns the chosen rate and the share
    of the full sweep's training steps it spent."""
    alive = sorted(curves)
    full = sum(total_steps for runs in curves.values() for _ in runs)
    spent = 0.0
    for fraction in fractions:
        if len(alive) == 1:
            break
        at = fraction * total_steps
        score, stopped = {}, {}
        for lr in alive:
            points = [next((p for p in curve if p[0] >= at), curve[-1]) for curve in curves[lr]]
            score[lr] = sum(p[1] for p in points) / len(points)
            stopped[lr] = sum(p[0] for p in points)
        survivors = sorted(alive, key=score.get)[:max(1, math.ceil(keep * len(alive)))]
        spent += sum(stopped[lr] for lr in alive if lr not in survivors)
        alive = survivors
    spent += sum(total_steps for lr in alive for _ in curves[lr])
    final = {lr: sum(c[-1][1] for c in curves[lr]) / len(curves[lr]) for lr in alive}
    return min(final, key=final.get), spent / full
