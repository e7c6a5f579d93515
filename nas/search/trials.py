"""Reading trials back and writing their record: what the objectives are, one typed record of
what a trial stores, its label, and the non-dominated set of any objectives, the same everywhere
(terminal, export, report, dashboard). Knows nothing of torch.

`TrialRecord` is the only reader of a trial's `user_attrs` and `record_attrs` the only place
their names are checked on the way in: a new stored measurement is one field here.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from nas.modes import BASELINE_MODE

# Objective name (a metric every trial stores) -> direction.
OBJECTIVES = {
    "val_loss": "minimize",
    "n_params": "minimize",
    "n_params_non_embedding": "minimize",
    "tokens_per_s": "maximize",
    "kv_bytes_per_token": "minimize",  # the KV cache per generated token (nas.model.decoder)
    "decode_tokens_per_s": "maximize",  # cached generation, measured (nas.model.decoder)
}
# The objectives a trial's run config fixes before it trains (the rest are measured): the
# Pareto-aware pruner and the budgets compare trials on them before any training.
PLANNED = ("n_params", "n_params_non_embedding", "kv_bytes_per_token")


@dataclass(frozen=True)
class TrialRecord:
    """What one trial stores, typed. `number`, `state`, `params`, `values` and `wall_seconds`
    come from Optuna; every other field is a user attribute (None where the trial never got
    that far)."""

    number: int
    state: TrialState
    params: dict[str, Any] = field(default_factory=dict)
    values: tuple[float, ...] | None = None
    # The plan, written before training.
    config: dict[str, Any] = field(default_factory=dict)
    mode: str = "?"
    source: str = "first_layer"
    receiving_layers: list[int] = field(default_factory=list)
    variant: str | None = None  # the space's name for the plan, where the space names variants
    baseline: bool = False
    n_params: int | None = None
    n_params_non_embedding: int | None = None
    worker: str | None = None  # host:pid of the worker that ran it
    # Measured by training.
    val_loss: float | None = None
    val_loss_se: float | None = None
    val_ppl: float | None = None
    test_loss: float | None = None  # reported, never selected on
    test_loss_se: float | None = None
    val_batch_losses: list[float] | None = None
    test_batch_losses: list[float] | None = None
    tokens: int | None = None
    tokens_per_model_param: float | None = None  # tokens / this model's non-embedding params
    tokens_per_s: float | None = None
    # KV cache per generated token at the training dtype (nas.model.decoder.kv_bytes_per_token)
    kv_bytes_per_token: int | None = None
    # Tokens a second of cached generation after training (nas.model.decoder.decode_tokens_per_s)
    decode_tokens_per_s: float | None = None
    train_seconds: float | None = None
    # What its losses depend on beyond the config: torch, CPU instruction set, threads
    # (nas.training.train.numerics)
    numerics: dict[str, Any] | None = None
    steps_trained: int | None = None  # by one run (each replicate trains as many)
    # The step this attempt resumed at, from the checkpoint an earlier attempt left when its
    # worker died (None: trained from step 0); with replicates, that of the replicate the
    # attempt resumed (the others train from step 0).
    resumed_step: int | None = None
    # A trial of a study with `replicates: R` > 1 (nas.search.replicates; never written with
    # R = 1): the seeds it trained on, each one's losses, and the standard error of their mean.
    # val_loss and test_loss are then those means, and curve, coefficients and analysis are
    # replicate 0's.
    replicate_seeds: list[int] | None = None
    replicate_val_losses: list[float] | None = None
    replicate_val_se: float | None = None
    replicate_test_losses: list[float] | None = None
    replicate_test_se: float | None = None
    # The replicates this attempt took as an earlier attempt finished them (its worker died in
    # a later one), instead of training them again
    replicates_reused: list[int] | None = None
    coefficients: dict[str, float] = field(default_factory=dict)
    # [step, val_loss] per validation, written when the trial ends; while it runs, only its
    # latest validation (rewriting the whole curve at each would grow a journal file with the
    # square of the validations)
    curve: list[list[float]] = field(default_factory=list)
    last_validation: list[float] | None = None
    analysis: dict[str, Any] = field(default_factory=dict)
    # Its start to its end, as the storage records them (this attempt's, for a retried trial)
    wall_seconds: float | None = None
    # A trial a warm start copied from an earlier study ("STUDY@STORAGE trial N";
    # nas.search.warm_start): it holds that trial's params and values only, and counts toward no
    # target.
    warm_start: str | None = None
    # A trial whose run config an earlier completed trial had trained, in a study without the
    # Pareto pruner: it holds that trial's measurements without training (training is
    # deterministic), so the sampler sees what a retrain would give (`Objective`).
    copy_of: int | None = None
    # Why it did not complete.
    pruned_reason: str | None = None
    failure: str | None = None

    @classmethod
    def from_trial(cls, trial: FrozenTrial | optuna.Trial) -> TrialRecord:
        """The record of a finished trial, or of a running one (RUNNING, no values yet)."""
        stored = {RENAMED.get(k, k): v for k, v in trial.user_attrs.items()
                  if RENAMED.get(k, k) in _ATTRS and v is not None}
        if "tokens_per_model_param" not in stored and stored.get("n_params_non_embedding") \
                and stored.get("tokens") is not None:
            # a record from before the ratio was stored: what its run would have stored
            stored["tokens_per_model_param"] = stored["tokens"] / stored["n_params_non_embedding"]
        if isinstance(trial, optuna.Trial):
            return cls(trial.number, TrialState.RUNNING, dict(trial.params), None, **stored)
        values = tuple(trial.values) if trial.values is not None else None
        if trial.datetime_start and trial.datetime_complete:
            stored["wall_seconds"] = (trial.datetime_complete
                                      - trial.datetime_start).total_seconds()
        return cls(trial.number, trial.state, dict(trial.params), values, **stored)

    @property
    def measured(self) -> bool:
        """It carries the measurements the tables and figures read."""
        return self.val_loss is not None and self.n_params is not None

    @property
    def arm_name(self) -> str:
        """The named variant, else the mode, with `+ve` for a value-embedding source."""
        if self.variant:
            return self.variant
        return f"{self.mode}+ve" if self.source == "value_embedding" else self.mode

    @property
    def label(self) -> str:
        """A short label of the plan, e.g. `learnable[3,4]` or `vanilla`."""
        if self.mode == BASELINE_MODE:
            return self.arm_name
        return f"{self.arm_name}[{','.join(map(str, self.receiving_layers))}]"

    @property
    def train(self) -> dict[str, Any]:
        return self.config.get("train", {})

    @property
    def model(self) -> dict[str, Any]:
        return self.config.get("model", {})

    @property
    def seed(self) -> int:
        return int(self.train.get("seed", 0))

    @property
    def trained_seeds(self) -> list[int]:
        """Every seed it trained on: its replicates' (nas.search.replicates), or its own."""
        return list(self.replicate_seeds) if self.replicate_seeds else [self.seed]

    @property
    def lr(self) -> float:
        return float(self.train.get("lr", math.nan))

    @property
    def shape(self) -> str:
        """`8L d128`: the model's depth and width."""
        return f"{self.model.get('n_layer', '?')}L d{self.model.get('d_model', '?')}"

    @property
    def shape_key(self) -> str:
        return json.dumps(self.model, sort_keys=True)

    @property
    def tokens_per_step(self) -> int:
        return int(self.train["batch_size"]) * int(self.model["seq_len"])

    @property
    def reported_loss(self) -> float:
        """The loss a comparison reports: test loss, or validation loss without a test split."""
        return float(self.test_loss if self.test_loss is not None else self.val_loss)

    def queued_attrs(self) -> dict[str, Any]:
        """What a retry of this trial inherits: the attributes it was queued with (a retry
        measures everything else again)."""
        return record_attrs(baseline=True) if self.baseline else {}

    def objective(self, name: str) -> float | None:
        """The stored value of objective `name`, None if the trial lacks it."""
        value = getattr(self, name)
        return None if value is None else float(value)


_ATTRS = {f.name for f in fields(TrialRecord)} - {"number", "state", "params", "values",
                                                  "wall_seconds"}
# Attributes stored under an older name, read under the new one: the measured ratio was stored
# as `tokens_per_param`, the name of the budget key it is not.
RENAMED = {"tokens_per_param": "tokens_per_model_param"}


def record_attrs(**values: Any) -> dict[str, Any]:
    """`values` as user attributes, refusing a name that is not a TrialRecord field (a typo
    would otherwise be stored and never read)."""
    unknown = sorted(set(values) - _ATTRS)
    if unknown:
        raise KeyError(f"not a TrialRecord field: {', '.join(unknown)}")
    return values


def write_record(trial: optuna.Trial, **values: Any) -> None:
    """Store `values` on a running trial (the one writer of trial attributes)."""
    for key, value in record_attrs(**values).items():
        trial.set_user_attr(key, value)


def records(trials: Iterable[FrozenTrial]) -> list[TrialRecord]:
    return [TrialRecord.from_trial(t) for t in trials]


def same_run(study: optuna.Study, config: dict[str, Any]) -> TrialRecord | None:
    """The first completed or pruned trial of `study` that trained this run config, or None."""
    return next((r for r in records(study.get_trials(deepcopy=False, states=(
        TrialState.COMPLETE, TrialState.PRUNED))) if r.config == config), None)


def completed(study: optuna.Study) -> list[TrialRecord]:
    """Completed trials that carry the measurements the figures read."""
    done = records(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    return [r for r in done if r.measured]


def nondominated(trials: Sequence[TrialRecord], objectives: Sequence[str]
                 ) -> list[TrialRecord]:
    """The trials that no other trial beats on every objective (read from their stored
    attributes), sorted by the second objective, then the first."""
    def key(r: TrialRecord) -> tuple[float, ...]:
        return tuple(r.objective(o) * (1 if OBJECTIVES[o] == "minimize" else -1)
                     for o in objectives)

    points = [(key(r), r) for r in trials
              if all(r.objective(o) is not None for o in objectives)]
    front = [r for k, r in points if not any(
        all(a <= b for a, b in zip(other, k, strict=True)) and other != k
        for other, _ in points)]
    return sorted(front, key=lambda r: key(r)[1:] + key(r)[:1])


def front_indices(points: Sequence[tuple[float, int]]) -> set[int]:
    """The indices of the (loss, n_params) points that no other point beats on both, as
    `nondominated` reads trials (for what is not one trial: an arm, a confirmed plan)."""
    stand_ins = [TrialRecord(i, TrialState.COMPLETE, val_loss=loss, n_params=n)
                 for i, (loss, n) in enumerate(points)]
    return {r.number for r in nondominated(stand_ins, ["val_loss", "n_params"])}


def study_objectives(study: optuna.Study) -> list[str]:
    """The objectives a study was created with, in order."""
    return study.user_attrs.get("objectives") or study.metric_names or ["val_loss"]


def front(study: optuna.Study) -> list[TrialRecord]:
    """The Pareto front of the study's objectives, or its five best trials (one objective)."""
    done = records(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    objectives = study_objectives(study)
    if len(objectives) > 1:
        return nondominated(done, objectives)
    return sorted((r for r in done if r.measured), key=lambda r: r.values[0])[:5]


# How a front table heads and writes a stored measurement.
COLUMNS = {
    "val_loss": ("val_loss", "{:.4f}"),
    "n_params": ("n_params", "{:,}"),
    "n_params_non_embedding": ("n_params_non_emb", "{:,}"),
    "tokens_per_s": ("tok/s", "{:,.0f}"),
    "kv_bytes_per_token": ("kv_bytes/token", "{:,}"),
    "decode_tokens_per_s": ("decode tok/s", "{:,.0f}"),
}


def front_rows(study: optuna.Study) -> list[dict[str, Any]]:
    """The study's front as table rows (terminal, report, dashboard note): the trial, its plan,
    every objective of the study, and its parameter count and training throughput where they
    are not objectives; in a study with replicates, the standard error of val_loss over the
    seeds."""
    objectives = study_objectives(study)
    shown = [*objectives, *(c for c in ("n_params", "tokens_per_s") if c not in objectives)]
    shown_front = [t for t in front(study) if t.measured]
    # A study with replicates (nas.search.replicates) shows how far its seeds agree.
    replicated = any(t.replicate_val_se is not None for t in shown_front)
    rows = []
    for t in shown_front:
        row: dict[str, Any] = {"trial": t.number, "plan": t.label}
        for name in shown:
            header, form = COLUMNS.get(name, (name, "{:,.4g}"))
            value = getattr(t, name)
            row[header] = "" if value is None else form.format(value)
            if name == "val_loss" and replicated:
                row["val_se (seeds)"] = ("" if t.replicate_val_se is None else
                                         f"{t.replicate_val_se:.4f} ({len(t.trained_seeds)})")
        rows.append(row)
    return rows
