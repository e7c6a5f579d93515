"""Study specs: a YAML file naming a search space, the objectives and the fixed parts of the run
config, read and checked before any storage is opened. Owns what a spec may say (its keys,
objectives, samplers and pruners by name); never opens a storage, never trains. Knows nothing
of torch (`check_trainable` and `data_fingerprint` import the data and training modules when a
search is about to start).
"""

from __future__ import annotations

import hashlib
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import optuna
from pydantic import Field, ValidationInfo, field_validator, model_validator
from pydantic.dataclasses import dataclass
from pydantic_core import ArgsKwargs

from nas import overrides
from nas.config import RunConfig, from_dict
from nas.errors import ConfigError, excerpt
from nas.parsing import (
    STRICT,
    Refusal,
    first_non_finite,
    parse,
    read_yaml,
    refuse,
    section,
    unknown,
)
from nas.search import lr_sweep
from nas.search import space as spaces
from nas.search.lease import Heartbeat
from nas.search.lr_sweep import Sweep
from nas.search.storage import redact
from nas.search.trials import OBJECTIVES, PLANNED

if TYPE_CHECKING:
    from nas.training.data import TokenDataModule

# auto: nas.search.samplers.auto_kind
SAMPLERS = ("tpe", "gp", "nsga2", "random", "bruteforce", "auto")
PRUNERS = ("none", "pareto", "median", "hyperband")

# The lines bad values of some spec keys get: those used twice or built from the names they list
# (the others are written at their keys).
NOT_A_SPACE = Refusal("a search space must be a mapping of run-config sections")
NOT_A_HEARTBEAT = Refusal("must be a mapping with keys interval, grace_period, max_retry, "
                          "got {value!r}")
NOT_OBJECTIVES = Refusal(f"must be a non-empty list of {', '.join(OBJECTIVES)}")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # a study name (see StudySpec._plain_name)
# Budgets: spec key -> the objective, known before training (trials.PLANNED), it bounds, and
# its unit. A trial over one is pruned before it trains; every trial carries its excess over
# each as an Optuna constraint (trial.set_constraint), which GP, TPE and NSGA-II read.
CONSTRAINTS = {"max_kv_bytes": ("kv_bytes_per_token", "KV-cache bytes per token"),
               "max_params": ("n_params", "params")}

# Heartbeats, grouped TPE and metric names are marked experimental but are what we rely on.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


@dataclass(config=STRICT)
class Choice:
    """A sampler or a pruner as a spec names it: `type`, and the rest of its mapping as the
    options of the class that type constructs (nas.search.samplers), each finite."""

    type: str
    options: dict = field(default_factory=dict)

    @staticmethod
    def named(raw: Any, allowed: Sequence[str]) -> Choice:
        """The choice a spec's mapping `{type: ..., option: value, ...}` makes (in the field's
        validator: the keys refused are relative to the field)."""
        if isinstance(raw, Choice):
            return raw
        if not isinstance(raw, dict) or raw.get("type") not in allowed:
            raise refuse(f"must be one of {', '.join(allowed)}", key="type")
        for option, value in raw.items():
            if (bad := first_non_finite(value)) is not None:
                raise refuse(f"must be finite, got {bad}", key=str(option))
        return Choice(raw["type"], {str(k): v for k, v in raw.items() if k != "type"})


@dataclass(config=STRICT)
class WarmStart:
    """A spec's `warm_start`: the earlier study whose finished trials seed this one when it is
    created (nas.search.warm_start), and its storage (default: this study's)."""

    study: Annotated[str | None, Refusal("must be a non-empty string")] = Field(
        None, min_length=1)
    storage: Annotated[str | None, Refusal("must be a non-empty string")] = Field(
        None, min_length=1)

    @model_validator(mode="after")
    def _names_a_study(self) -> WarmStart:
        if self.study is None:
            raise refuse("needs study: the name of the study to start from (storage: its "
                         "URL, default this study's)", key="study")
        return self


@dataclass(config=STRICT, kw_only=True)
class StudySpec:
    """A study spec as its file gives it. The keys are declared in alphabetical order: an
    unknown key's message lists them in that order."""

    artifacts: str | None = None  # artifact folder (default: next to the storage)
    base: Annotated[dict, NOT_A_SPACE] = field(default_factory=dict)
    baselines: Annotated[bool, Refusal("must be true or false, got {value!r}")] = True
    heartbeat: Heartbeat = field(default_factory=Heartbeat)
    # the learning-rate protocol of a named-variant sweep (nas.search.lr_sweep)
    lr_sweep: Sweep = field(default_factory=Sweep)
    max_kv_bytes: Annotated[int | None, Refusal("must be a positive integer (bytes of KV cache "
                                                "per token)")] = Field(None, ge=1)
    max_params: Annotated[int | None, Refusal("must be a positive integer")] = Field(None, ge=1)
    n_trials: Annotated[int, Refusal("must be a positive integer, got {value!r}")] = Field(20, ge=1)
    name: Annotated[str, Refusal("must be a non-empty string")] = Field(min_length=1)
    objectives: Annotated[list, NOT_OBJECTIVES] = Field(
        default_factory=lambda: ["val_loss", "n_params"], min_length=1)
    pruner: Choice = field(default_factory=lambda: Choice("none"))
    sampler: Choice = field(default_factory=lambda: Choice("tpe"))
    # Below 2**31: a joining worker adds an offset below 2**31, and samplers' numpy seeds must be
    # below 2**32.
    seed: Annotated[int, Refusal("must be an integer in 0..2147483647, got {value!r}")] = Field(
        0, ge=0, lt=2**31)
    space: Annotated[dict | str, NOT_A_SPACE]  # a file's path until load_spec reads it
    storage: Annotated[str | None, Refusal("must be a storage URL or path, got {value!r}")] = None
    # An earlier study whose finished trials seed this one when it is created
    # (nas.search.warm_start).
    warm_start: WarmStart | None = None
    path: str = field(default="study", init=False)  # the spec's file, set by load_spec
    # A study derived by code (`nas confirm`), never by a spec file: the params of every trial
    # it runs (its whole queue), and the user attributes it records when created.
    queue: list = field(default_factory=list, init=False)
    attrs: dict = field(default_factory=dict, init=False)
    # The `--set` overrides load_spec applied to the space, as a study stores them
    # (nas.overrides.as_stored).
    overrides: list[str] = field(default_factory=list, init=False)
    # The run configs the space draws (`drawn_configs`), drawn once per search.
    draws: list = field(default_factory=list, init=False)

    @model_validator(mode="before")
    @classmethod
    def _known_constraints(cls, raw: Any) -> Any:
        # An unknown max_* key is a constraint that does not exist: name the ones that do, not
        # every key of a spec. (A pydantic dataclass gets its arguments as ArgsKwargs.)
        given = raw.kwargs if isinstance(raw, ArgsKwargs) else raw
        if isinstance(given, dict):
            for key in given:
                if isinstance(key, str) and key.startswith("max_") and key not in CONSTRAINTS:
                    raise refuse(unknown("constraint", key, CONSTRAINTS), key=key)
        return raw

    @field_validator("lr_sweep", mode="before")
    @classmethod
    def _sweep_shorthand(cls, raw: Any) -> Any:
        return lr_sweep.sweep_section(raw)

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: str) -> str:
        # The name makes file names (runs/<name>.db, exports) and the dashboard's URLs.
        if not NAME.fullmatch(name) or ".." in name:
            raise refuse("must be letters, digits, '_', '-' and '.' (starting with a letter or "
                         f"digit, no '..'): it names files and URLs; got {excerpt(name)}")
        return name

    @field_validator("objectives")
    @classmethod
    def _known_objectives(cls, objectives: list) -> list:
        for name in objectives:
            if name not in OBJECTIVES:
                raise refuse(unknown("objective", name, OBJECTIVES))
        if objectives[0] != "val_loss":
            raise refuse("the first objective must be val_loss")
        return objectives

    @field_validator("heartbeat", mode="before")
    @classmethod
    def _heartbeat(cls, raw: Any) -> Any:
        return section(Heartbeat, raw, NOT_A_HEARTBEAT.text)

    @field_validator("warm_start", mode="before")
    @classmethod
    def _warm_start(cls, raw: Any) -> Any:
        return None if raw is None else section(
            WarmStart, raw, "must be a mapping with keys study, storage, got {value!r}")

    @field_validator("sampler", "pruner", mode="before")
    @classmethod
    def _choice(cls, raw: Any, info: ValidationInfo) -> Any:
        allowed = SAMPLERS if info.field_name == "sampler" else PRUNERS
        return Choice.named(raw, allowed)

    @model_validator(mode="after")
    def _prunable(self) -> StudySpec:
        if self.multi_objective and self.pruner.type in ("median", "hyperband"):
            raise refuse("Optuna cannot prune multi-objective studies with median or hyperband; "
                         "use pareto or none", key="pruner.type")
        measured = [o for o in self.objectives[1:] if o not in PLANNED]
        if self.pruner.type == "pareto" and measured:
            # The pruner judges a running trial against those no worse on every other
            # objective, which it must know before training; a trial it stops might have
            # reached the front through one it cannot know.
            raise refuse(f"pareto compares trials on objectives known before training "
                         f"({', '.join(PLANNED)}); {', '.join(measured)} is measured by "
                         "training, so a pruned trial could have been on the front; use none",
                         key="pruner.type")
        return self

    @model_validator(mode="after")
    def _warm_startable(self) -> StudySpec:
        if self.warm_start is not None and self.sampler.type == "bruteforce":
            # It enumerates: it would skip the seeded configs rather than measure them here.
            raise refuse("the bruteforce sampler would skip the seeded trials' configs instead "
                         "of measuring them; use tpe, gp or auto", key="warm_start")
        return self

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    @property
    def merged_space(self) -> dict:
        return spaces.merge(self.base, self.space)

    @property
    def queue_driven(self) -> bool:
        """Every trial comes from a queue: a derived study's (`queue`), or a learning-rate
        sweep's (nas.search.lr_sweep)."""
        return bool(self.queue) or (self.sampler.type == "bruteforce"
                                    and lr_sweep.is_sweep(self.merged_space))

    @property
    def trial_space(self) -> dict:
        """The space trials draw from: a sweep's rate list with the rates its extension may add
        (the grid of `merged_space` is what the sweep starts with)."""
        space = self.merged_space
        if self.queue_driven and self.lr_sweep.extend:
            space["train"]["lr"] = lr_sweep.candidates(space["train"]["lr"],
                                                       self.lr_sweep.extend)
        return space

    def default_storage(self) -> str:
        return default_storage(self.name)


def default_storage(name: str) -> str:
    """Where a study of this name lives when neither --storage nor its spec says."""
    return f"sqlite:///runs/{name}.db"


def load_spec(path: str | Path, data: str | None = None, sets: Sequence[str] = (),
              warm_start: str | None = None) -> StudySpec:
    """Read and check a study spec; `data` overrides the base's data.source, `sets`
    (`--set KEY=VALUE`, nas.overrides) the space, once the file is checked as it is, and
    `warm_start` (`--warm-start STUDY[@STORAGE]`) the spec's warm_start."""
    path = Path(path)
    where = str(path)
    raw = read_yaml(path)
    if raw is None:
        raise ConfigError(f"{where}: the file is empty; a study spec needs at least name and "
                          "space")
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: a study spec must be a mapping")
    if warm_start is not None:
        raw = {**raw, "warm_start": warm_start_flag(warm_start)}
    spec = parse(StudySpec, raw, where)
    spec.path = where
    if isinstance(spec.space, str):  # a file beside the spec (an absolute path stays as it is)
        space_path = path.parent / spec.space
        spec.space = spaces.check_space(read_yaml(space_path), str(space_path))
    else:
        spaces.check_space(spec.space, f"{where}: space")
    if data is not None:
        spec.base = spaces.merge(spec.base, {"data": {"source": data}})
    spaces.check_space(spec.base, f"{where}: base")
    _check_lr_grid(spec, where)
    spec.draws = draw_configs(spec, where)
    if sets:  # into the space, which the base cannot override: a searched key becomes fixed
        given = overrides.parse_all(sets)
        spec.space = overrides.apply(spec.space, given)
        if overrides.sets_preset(given):  # the preset's size, whatever the base says
            spec.base = overrides.without_preset_sizes(spec.base)
        spec.overrides = overrides.as_stored(sets)
        spaces.check_space(spec.space, overrides.WHERE)
        _check_lr_grid(spec, overrides.WHERE)
        spec.draws = draw_configs(spec, overrides.WHERE)
    return spec


def _check_lr_grid(spec: StudySpec, where: str) -> None:
    """A named-variant study's learning-rate list is a grid the analysis chooses from; a
    protocol other than the default's needs a sweep (variants, rates, seeds) run by its queue,
    and a grid that suits it (nas.search.lr_sweep.check_grid)."""
    space = spec.merged_space
    lr = space.get("train", {}).get("lr")
    if space.get("variants") and isinstance(lr, list) and len(lr) < 2:
        raise ConfigError(f"{where}: train.lr: a learning-rate grid needs at least 2 values "
                          f"for the analysis to choose among, got {lr}; give one number to fix it")
    if (refused := lr_sweep.refusal(spec.lr_sweep, space)) is not None:
        raise ConfigError(f"{where}: {refused[0]}: {refused[1]}")
    if not spec.lr_sweep.default and spec.sampler.type != "bruteforce":
        raise ConfigError(f"{where}: sampler.type: lr_sweep {spec.lr_sweep.protocol} needs "
                          "bruteforce (its queue decides every trial)")
    if spec.queue_driven and (problem := lr_sweep.check_grid(lr, spec.lr_sweep)):
        raise ConfigError(f"{where}: train.lr: {problem}")


def draw_configs(spec: StudySpec, where: str, draws: int = 32) -> list[RunConfig]:
    """Sample the space at random (no training) so that impossible shapes fail now; a derived
    study's configs are those of its queue."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    if spec.queue:
        return [from_dict(spaces.sample(spec.merged_space, optuna.trial.FixedTrial(params)),
                          where=f"{where} (a queued trial)") for params in spec.queue]
    probe = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    merged = spec.merged_space
    configs = []
    for _ in range(draws):
        trial = probe.ask()
        raw = spaces.sample(merged, trial)
        configs.append(from_dict(raw, where=f"{where} (a draw from the space)"))
        probe.tell(trial, 0.0)
    return configs


def drawn_configs(spec: StudySpec) -> list[RunConfig]:
    """The configs the spec's space draws: those load_spec drew, or (a derived study's) drawn
    now, once."""
    if not spec.draws:
        spec.draws = draw_configs(spec, spec.path)
    return spec.draws


def check_trainable(spec: StudySpec, force: bool = False) -> None:
    """What `nas search` needs beyond a valid spec, checked before the study is touched: every
    data source the space can draw opens and is long enough (imports torch), each trial trains
    on one device (run one worker per GPU instead), and, unless `force`, each draw's estimated
    training memory fits in the free memory (`nas.training.train.check_memory`)."""
    from nas.training.train import check_memory

    configs = drawn_configs(spec)
    for cfg in configs:
        if cfg.train.devices not in (1, "1"):
            raise ConfigError(f"{spec.path}: train.devices: must be 1 in a study, got "
                              f"{cfg.train.devices!r}: run one `nas search` worker per GPU; "
                              "several devices per run are for `nas train`")
        if not force:
            check_memory(cfg, f"{spec.path} (a draw from the space)")
    for _ in _data_modules(spec, configs):
        pass  # opening each checks it


def data_fingerprint(spec: StudySpec) -> str:
    """One digest of the validation and test tokens of every data setting the space draws
    (their content, not their paths: a corpus moved elsewhere keeps its digest)."""
    digests = {dm.eval_digest() for dm in _data_modules(spec, drawn_configs(spec))}
    return hashlib.sha256("\n".join(sorted(digests)).encode()).hexdigest()[:16]


def _data_modules(spec: StudySpec, configs: list[RunConfig]) -> Iterator[TokenDataModule]:
    """A data module for each distinct data setting among `configs` (imports torch); a source
    that does not open or is too short is a ConfigError naming the spec."""
    from nas.training.data import TokenDataModule

    seen = set()
    for cfg in configs:
        d, m = cfg.data, cfg.model
        key = (d.source, d.val_fraction, d.test_fraction, d.test_source, m.seq_len, m.vocab_size)
        if key in seen:
            continue
        seen.add(key)
        try:
            module = TokenDataModule(d, m.seq_len, m.vocab_size, 1, 1, cfg.train.seed, 1)
        except ConfigError as exc:
            raise ConfigError(f"{spec.path}: {exc}") from None
        yield module


def warm_start_flag(text: str) -> dict[str, str]:
    """`nas search --warm-start STUDY[@STORAGE]` as a spec's `warm_start` mapping. The first
    `@` splits: a study name holds none, a storage URL may (postgresql://user@host/db)."""
    name, at, storage = text.partition("@")
    if not NAME.fullmatch(name) or (at and not storage):
        raise ConfigError(f"--warm-start: expected STUDY or STUDY@STORAGE_URL (a study name of "
                          f"letters, digits, '_', '-' and '.'), got "
                          f"{excerpt(name + at + redact(storage))}")
    return {"study": name, **({"storage": storage} if storage else {})}
