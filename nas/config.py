"""Run configs: pydantic dataclasses, named model presets, loading and validation.

A run config has four sections (`model`, `value_residual`, `train`, `data`). Each section is a
pydantic dataclass that declares its keys, their types and ranges (`Field(gt=0)`, `Literal`) and,
in validators, the rules that span several keys. A typo or a bad value is a ValidationError that
`nas.parsing.config_error` turns into one line naming the file, the key and what is allowed,
never a silently ignored setting. This module knows nothing of torch. One piece (about 400
lines): it is the single source of truth for every run-config key, its default and the rules
between keys (the budget, the tokenizer's vocabulary), which the model, the space and the
trainer all read. What it does not own lives beside it: the vanilla parameter formula
(`nas.params`), tokenizer.json and shard files (`nas.corpus_files`), and how records made
before later keys stay equal (`nas.old_records`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, get_args

import yaml
from pydantic import (
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.dataclasses import dataclass

from nas.corpus_files import shard_tokenizer, tokenizer_vocab
from nas.errors import ConfigError
from nas.modes import BASELINE_MODE, MODES
from nas.old_records import as_recorded_before
from nas.params import vanilla_non_embedding_params
from nas.parsing import STRICT, Refusal, parse, read_yaml, refuse, unknown

Source = Literal["first_layer", "value_embedding"]
SOURCES: tuple[str, ...] = get_args(Source)

# Named model sizes (litgpt-style presets). The paper's sizes use FFN = 3.5 * d_model.
MODEL_PRESETS: dict[str, dict[str, int]] = {
    "pico": {"n_layer": 2, "d_model": 32, "n_head": 2, "seq_len": 32},
    "nano": {"n_layer": 4, "d_model": 64, "n_head": 4, "seq_len": 64},
    "micro": {"n_layer": 6, "d_model": 96, "n_head": 4, "seq_len": 128},
    "tiny": {"n_layer": 8, "d_model": 128, "n_head": 4, "seq_len": 128},
    "small": {"n_layer": 8, "d_model": 192, "n_head": 6, "seq_len": 128},
    "medium": {"n_layer": 10, "d_model": 256, "n_head": 8, "seq_len": 256},
    "large": {"n_layer": 8, "d_model": 384, "n_head": 6, "seq_len": 256},
    "paper-82m": {"n_layer": 8, "d_model": 512, "n_head": 8, "seq_len": 2048, "ffn_hidden": 1792},
    "paper-180m": {"n_layer": 12, "d_model": 768, "n_head": 12, "seq_len": 2048,
                   "ffn_hidden": 2688},
    "paper-468m": {"n_layer": 24, "d_model": 1024, "n_head": 16, "seq_len": 2048,
                   "ffn_hidden": 3584},
}


@dataclass(config=STRICT)
class ModelConfig:
    EXTRA_KEYS: ClassVar[tuple[str, ...]] = ("preset",)  # a named size, resolved by from_preset
    vocab_size: int = Field(256, gt=0)
    # At most 1024: the parameter count builds each layer (on the meta device), so a
    # count in the billions would hang the check instead of failing it.
    n_layer: int = Field(8, gt=0, le=1024)
    d_model: int = Field(128, gt=0)
    n_head: int = Field(4, gt=0)
    seq_len: int = Field(128, gt=0)
    # SwiGLU hidden width; None means 3.5 * d_model rounded up to a multiple of 16, as the paper.
    ffn_hidden: int | None = Field(None, gt=0)
    rope_theta: float = Field(10000.0, gt=0)
    norm_eps: float = Field(1e-5, gt=0, lt=1)  # added to the mean square: small and positive

    @model_validator(mode="after")
    def _heads_fit(self) -> ModelConfig:
        if self.d_model % self.n_head:
            raise refuse(f"{self.n_head} does not divide d_model={self.d_model}", key="n_head")
        if self.head_dim % 2:
            raise refuse(f"head_dim={self.head_dim} must be even for rotary embeddings",
                         key="n_head")
        return self

    @classmethod
    def from_preset(cls, name: str, /, **overrides: Any) -> ModelConfig:
        """The named size with `overrides` on top (litgpt's `Config.from_name`): the one place
        a preset is resolved."""
        if not isinstance(name, str) or name not in MODEL_PRESETS:
            raise refuse(unknown("preset", name, MODEL_PRESETS), key="preset")
        return cls(**{**MODEL_PRESETS[name], **overrides})

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def ffn(self) -> int:
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        return 16 * math.ceil(3.5 * self.d_model / 16)


@dataclass(config=STRICT)
class ValueResidualConfig:
    mode: str = BASELINE_MODE
    # "all" (every layer after the first) or a list of 0-based receiving layers.
    layers: str | list[int] = "all"
    # Any finite coefficient (STRICT): a negative or large one is an odd mix, not an impossible
    # one, and the search spaces choose the ranges.
    lambda1: float = 0.5
    lambda2: float = 0.5
    # NeuTRENO's lambda has a key of its own, not lambda1: it weighs (V_src - V_n) added to the
    # attention output, where ResFormer's lambda1 weighs V_src before attention, so one key
    # would tie two different coefficients together in a search and in the tables.
    neutreno_lambda: float = 0.5
    source: Source = "first_layer"
    # The value-embedding family (ve_unet, ve_unet_gated; nas.modes): its number of tables, at
    # most half of model.n_layer (table i serves layer i and its mirror, layer n_layer-1-i),
    # and the initial weights on a layer's own values and on its table's row (modded-nanogpt's
    # 0.5 and 0.5). Both weights train.
    value_embeddings: int = Field(1, gt=0)
    v_lambda: float = 0.5
    ve_lambda: float = 0.5

    @field_validator("mode")
    @classmethod
    def _known_mode(cls, mode: str) -> str:
        # MODES, not a Literal: a mode registered at run time (as a test does) is a mode
        if mode not in MODES:
            raise refuse(unknown("mode", mode, MODES))
        return mode

    @field_validator("layers")
    @classmethod
    def _all_or_indices(cls, layers: str | list[int]) -> str | list[int]:
        if isinstance(layers, str) and layers != "all":
            raise refuse(f"must be 'all' or a list of layer indices, got {layers!r}")
        return layers

    @field_validator("lambda1")
    @classmethod
    def _not_for_neutreno(cls, lambda1: float, info: ValidationInfo) -> float:
        # runs only where lambda1 is given: a neutreno config from before the rename
        if info.data.get("mode") == "neutreno":
            raise refuse("mode neutreno does not read lambda1; its coefficient is "
                         "value_residual.neutreno_lambda (renamed from lambda1)")
        return lambda1

    def reads(self, key: str) -> bool:
        """Whether the plan's mode reads this value_residual key (`nas.modes.Mode.keys`)."""
        return key in MODES[self.mode].keys

    def table_layout(self, n_layer: int) -> dict[int, int]:
        """The value-embedding family's U-net layout, layer -> the table it reads: table i
        serves layer i and its mirror from the end, layer n_layer-1-i (leloykun's U-net in
        modded-nanogpt; later records read 012...012 instead)."""
        k = self.value_embeddings
        return {layer: min(layer, n_layer - 1 - layer)
                for layer in (*range(k), *range(n_layer - k, n_layer))}

    def tables(self, n_layer: int) -> int:
        """The value-embedding tables the plan allocates (each vocab_size x d_model): the
        family's `value_embeddings`, one where the residual source is a value embedding and
        some layer receives it, else none. They are the sources before layer 0."""
        if self.reads("value_embeddings"):
            return self.value_embeddings
        return int(self.reads("source") and self.source == "value_embedding"
                   and bool(self.receiving(n_layer)))

    def receiving(self, n_layer: int) -> list[int]:
        """The 0-based layers that receive the residual (none for vanilla); for the
        value-embedding family, the layers that read a table (layer 0 among them)."""
        if self.mode == BASELINE_MODE:
            return []
        if self.reads("value_embeddings"):
            return sorted(self.table_layout(n_layer))
        if self.layers == "all":
            return list(range(1, n_layer))
        return sorted(set(self.layers))


DEFAULT_STEPS = 600
MAX_TIME = 10.0**9  # seconds (31 years): what Python's timedelta, Lightning's timer, holds
BUDGET_KEYS = ("steps", "tokens", "tokens_per_param")  # a run's length: exactly one of them


@dataclass(config=STRICT)
class TrainConfig:
    # The run's length: `steps`, or `tokens` (rounded up to whole steps), or `tokens_per_param`
    # (tokens = R x the non-embedding parameters of the vanilla model of this shape, so that
    # every value-residual plan of a shape trains on the same tokens). At most one is given;
    # `RunConfig` resolves the other two into `steps` (600 when none is given).
    steps: int | None = Field(None, gt=0, allow_inf_nan=False)
    tokens: int | None = Field(None, gt=0, allow_inf_nan=False)
    # validated when absent too: its validator checks the three keys together
    tokens_per_param: float | None = Field(None, gt=0, allow_inf_nan=False, validate_default=True)
    # The global batch, whatever train.devices: under DDP each process trains on its equal
    # slice of the rows one process would draw (nas.training.data.RandomWindows), so a run's
    # tokens, steps and losses do not depend on how many devices share it. It must split evenly
    # between them.
    batch_size: int = Field(32, gt=0)
    lr: float = Field(3.0e-3, gt=0)
    seed: int = Field(0, ge=0, lt=2**32)  # what numpy's and Lightning's seeding accept
    warmup_steps: int | None = Field(None, ge=0)  # None: 10% of steps
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    grad_clip: float = Field(1.0, ge=0)  # the gradient norm's limit; 0 turns clipping off
    eval_every: int | None = Field(None, gt=0)  # None: 10 evaluations per run
    eval_batches: int = Field(8, gt=0)
    # Batches of the validations during training, which only draw the curve (and feed a
    # pruner): fewer than eval_batches cuts their cost; the final validation, what every
    # choice reads, and the test always score all eval_batches. None: eval_batches.
    curve_batches: int | None = Field(None, gt=0)
    accelerator: str = "auto"
    devices: int | str = 1
    strategy: str = "auto"
    precision: str = "32-true"
    # Wall-clock seconds one run may train (Lightning's `max_time`; None: no limit). A run that
    # reaches it fails (nas.training.train.TimeLimitError): a hung or far too slow trial ends FAIL
    # with its reason, instead of holding its worker.
    max_time: float | None = Field(None, gt=0, le=MAX_TIME, allow_inf_nan=False)
    # Save a checkpoint every N training steps (None: never), from which `nas train --resume`
    # and a retried trial continue (nas.training.checkpoint); they are deleted when the run finishes
    # unless keep_checkpoints.
    checkpoint_every: int | None = Field(None, gt=0)
    keep_checkpoints: Annotated[bool, Refusal("must be true or false, got {value!r}")] = False
    # torch.compile of the model's training forward: `auto` where the run is long enough to
    # repay the compilation (nas.training.compiling).
    compile: Annotated[bool | Literal["auto"],
                       Refusal("must be auto, true or false, got {value!r}")] = "auto"
    # Where `nas train` logs losses, learning rate, throughput, every coefficient and its
    # results (nas.training.loggers): metrics.csv in the run folder, or the tensorboard, mlflow or
    # wandb extra.
    logger: Literal["csv", "tensorboard", "mlflow", "wandb"] = "csv"

    @field_validator("tokens_per_param")
    @classmethod
    def _one_budget(cls, tokens_per_param: float | None, info: ValidationInfo) -> float | None:
        # A field validator, not a model one: those run again on an instance passed through
        # (dataclasses.replace of a RunConfig), whose steps are resolved beside its tokens.
        values = {**info.data, "tokens_per_param": tokens_per_param}
        given = [k for k in BUDGET_KEYS if values.get(k) is not None]
        if len(given) > 1:
            raise refuse(f"give one of {', '.join(BUDGET_KEYS)}, not {' and '.join(given)}",
                         key=given[1])
        return tokens_per_param

    def budget_key(self) -> str:
        """The budget key the config was given (`steps` when none was)."""
        return next((k for k in BUDGET_KEYS[1:] if getattr(self, k) is not None), "steps")

    @property
    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else max(1, self.steps // 10)

    @property
    def eval_interval(self) -> int:
        return self.eval_every if self.eval_every is not None else max(1, self.steps // 10)


DEFAULT_TEST_FRACTION = 0.05


@dataclass(config=STRICT)
class DataConfig:
    # "builtin", "builtin-prose", a UTF-8 text file, or a glob of nanoGPT .bin token shards.
    source: str = "builtin"
    val_fraction: float = Field(0.1, gt=0, lt=1)
    # The test split: the tail of every file (None: 0.05, or 0 with a test_source), or all of
    # `test_source` (a file or shard glob). No training, pruning or selection ever reads it.
    test_fraction: float | None = Field(None, ge=0, lt=1)
    test_source: str | None = None

    @field_validator("source")
    @classmethod
    def _named(cls, source: str) -> str:
        if not source:
            raise refuse("must be 'builtin', a text file or a .bin glob")
        return source

    @model_validator(mode="after")
    def _leaves_training_data(self) -> DataConfig:
        if self.test_source and self.test_fraction:
            raise refuse("must be 0 (or unset) with a data.test_source: the test set is then "
                         "all of test_source", key="test_fraction")
        if self.val_fraction + self.test_share >= 1:
            raise refuse(f"val_fraction {self.val_fraction} + test_fraction {self.test_share} "
                         "leaves no training data; their sum must be below 1",
                         key="test_fraction")
        return self

    @property
    def test_share(self) -> float:
        if self.test_fraction is not None:
            return self.test_fraction
        return 0.0 if self.test_source else DEFAULT_TEST_FRACTION


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "value_residual": ValueResidualConfig,
    "train": TrainConfig,
    "data": DataConfig,
}


@dataclass(config=ConfigDict(extra="forbid"))
class RunConfig:
    KEY_NOUN: ClassVar[str] = "section"  # its keys are sections: "unknown section"
    model: ModelConfig = field(default_factory=ModelConfig)
    value_residual: ValueResidualConfig = field(default_factory=ValueResidualConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)

    @field_validator(*SECTIONS, mode="before")
    @classmethod
    def _section(cls, raw: Any, info: ValidationInfo) -> Any:
        """A section from its mapping (left blank: all defaults); `model` may name a preset."""
        section = SECTIONS[info.field_name]
        if isinstance(raw, section):
            return raw
        raw = {} if raw is None else raw
        if not isinstance(raw, dict):
            raise refuse(f"must be a mapping, got {type(raw).__name__}")
        # built here rather than by pydantic: a strict section accepts only its own instances
        values = {str(k): v for k, v in raw.items()}
        if section is ModelConfig and "preset" in values:
            return ModelConfig.from_preset(values.pop("preset"), **values)
        return section(**values)

    @model_validator(mode="after")
    def _layers_exist(self) -> RunConfig:
        layers, n_layer = self.value_residual.layers, self.model.n_layer
        bad = [i for i in layers if not 1 <= i < n_layer] if isinstance(layers, list) else []
        if bad:
            raise refuse(f"indices {bad} out of range; allowed 1..{n_layer - 1} "
                         "(layer 0 is the source and never receives)", key="value_residual.layers")
        return self

    @model_validator(mode="after")
    def _tables_fit(self) -> RunConfig:
        vr, n_layer = self.value_residual, self.model.n_layer
        if vr.reads("value_embeddings") and 2 * vr.value_embeddings > n_layer:
            raise refuse(f"must be at most half of model.n_layer ({n_layer} // 2 = "
                         f"{n_layer // 2}): table i serves layer i and its mirror, layer "
                         f"n_layer-1-i; got {vr.value_embeddings}",
                         key="value_residual.value_embeddings")
        return self

    def __post_init__(self) -> None:
        self.train.steps = resolve_steps(self)

    def to_dict(self) -> dict[str, Any]:
        """The YAML-ready form; `from_dict(to_dict())` round-trips exactly. A budget given as
        tokens or tokens_per_param is kept as given, without the steps it resolved to."""
        out = dataclasses.asdict(self)
        key = self.train.budget_key()
        for other in BUDGET_KEYS:
            if other != key:
                out["train"].pop(other)
        return as_recorded_before(out, self.value_residual.mode)

    @property
    def tokens_per_step(self) -> int:
        return self.train.batch_size * self.model.seq_len


def resolve_steps(cfg: RunConfig) -> int:
    """The training steps of a config's budget (see TrainConfig)."""
    t = cfg.train
    if t.tokens is not None:
        tokens = float(t.tokens)
    elif t.tokens_per_param is not None:
        tokens = t.tokens_per_param * vanilla_non_embedding_params(cfg.model)
    else:
        return DEFAULT_STEPS if t.steps is None else t.steps
    return max(1, math.ceil(tokens / max(1, cfg.tokens_per_step)))


def from_dict(raw: Any, where: str = "config") -> RunConfig:
    """Build and validate a RunConfig from a parsed mapping. On shards with a tokenizer.json
    beside them (`nas prepare` writes both), model.vocab_size defaults to the tokenizer's."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping with sections {', '.join(SECTIONS)}")
    return parse(RunConfig, _with_tokenizer_vocab(raw, where), where)


def _with_tokenizer_vocab(raw: dict, where: str) -> dict:
    """`raw` with model.vocab_size from the tokenizer beside its shards, where it has none."""
    data, model = raw.get("data"), raw.get("model")
    source = data.get("source") if isinstance(data, dict) else None
    tokenizer = shard_tokenizer(source) if isinstance(source, str) and source else None
    if tokenizer is None or not (model is None or isinstance(model, dict)):
        return raw  # no tokenizer, or a malformed section that the validation names
    vocab, given = tokenizer_vocab(tokenizer), (model or {}).get("vocab_size")
    if given is None:
        return {**raw, "model": {**(model or {}), "vocab_size": vocab}}
    if isinstance(given, int) and given < vocab:
        raise ConfigError(f"{where}: model.vocab_size: {given} is smaller than the {vocab} "
                          f"tokens of {tokenizer}; leave it out to take the tokenizer's")
    return raw


def load_config(path: str | Path) -> RunConfig:
    """Load a run config YAML file (what `nas train` reads and `nas export` writes)."""
    return from_dict(read_yaml(path), where=str(path))


def dump_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")
