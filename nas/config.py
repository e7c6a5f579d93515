"""Run configs: dataclasses, named model presets, loading and validation.

A run config has four sections (`model`, `value_residual`, `train`, `data`). Every key is
checked against the dataclass that owns it, so a typo is an error naming the file, the key and
what is allowed, never a silently ignored setting. This module knows nothing of torch.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .modes import MODES


class ConfigError(ValueError):
    """Bad user input; the CLI prints the message as one line and exits with status 2."""


SOURCES = ("first_layer", "value_embedding")

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


@dataclass
class ModelConfig:
    vocab_size: int = 256
    n_layer: int = 8
    d_model: int = 128
    n_head: int = 4
    seq_len: int = 128
    # SwiGLU hidden width; None means 3.5 * d_model rounded up to a multiple of 16, as the paper.
    ffn_hidden: int | None = None
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def ffn(self) -> int:
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        return 16 * math.ceil(3.5 * self.d_model / 16)


@dataclass
class ValueResidualConfig:
    mode: str = "vanilla"
    # "all" (every layer after the first) or a list of 0-based receiving layers.
    layers: str | list[int] = "all"
    lambda1: float = 0.5
    lambda2: float = 0.5
    source: str = "first_layer"

    def receiving(self, n_layer: int) -> list[int]:
        """The 0-based layers that receive the residual (none for vanilla)."""
        if self.mode == "vanilla":
            return []
        if self.layers == "all":
            return list(range(1, n_layer))
        return sorted(set(self.layers))


DEFAULT_STEPS = 600
BUDGET_KEYS = ("steps", "tokens", "tokens_per_param")  # a run's length: exactly one of them


@dataclass
class TrainConfig:
    # The run's length: `steps`, or `tokens` (rounded up to whole steps), or `tokens_per_param`
    # (tokens = R x the non-embedding parameters of the vanilla model of this shape, so that
    # every value-residual plan of a shape trains on the same tokens). At most one is given;
    # `RunConfig` resolves the other two into `steps` (600 when none is given).
    steps: int | None = None
    tokens: int | None = None
    tokens_per_param: float | None = None
    batch_size: int = 32
    lr: float = 3.0e-3
    seed: int = 0
    warmup_steps: int | None = None  # None: 10% of steps
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int | None = None  # None: 10 evaluations per run
    eval_batches: int = 8
    accelerator: str = "auto"
    devices: int | str = 1
    strategy: str = "auto"
    precision: str = "32-true"

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


@dataclass
class DataConfig:
    # "builtin", "builtin-prose", a UTF-8 text file, or a glob of nanoGPT .bin token shards.
    source: str = "builtin"
    val_fraction: float = 0.1
    # The test split: the tail of every file (None: 0.05, or 0 with a test_source), or all of
    # `test_source` (a file or shard glob). No training, pruning or selection ever reads it.
    test_fraction: float | None = None
    test_source: str | None = None

    @property
    def test_share(self) -> float:
        if self.test_fraction is not None:
            return self.test_fraction
        return 0.0 if self.test_source else DEFAULT_TEST_FRACTION


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    value_residual: ValueResidualConfig = field(default_factory=ValueResidualConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)

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
        return out

    @property
    def tokens_per_step(self) -> int:
        return self.train.batch_size * self.model.seq_len


def vanilla_non_embedding_params(m: ModelConfig) -> int:
    """Non-embedding parameters of the vanilla model of this shape (the output head counts):
    per layer two norms, Q, K, V, O and the SwiGLU MLP; a final norm; the head."""
    per_layer = 2 * m.d_model + 4 * m.d_model ** 2 + 3 * m.d_model * m.ffn
    return m.n_layer * per_layer + m.d_model + m.vocab_size * m.d_model


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


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "value_residual": ValueResidualConfig,
    "train": TrainConfig,
    "data": DataConfig,
}


def _fail(where: str, key: str, problem: str) -> ConfigError:
    return ConfigError(f"{where}: {key}: {problem}")


def _check_type(where: str, key: str, value: Any, annotation: str) -> Any:
    """Coerce a YAML value to the annotated field type, or raise a ConfigError."""
    kinds = [k.strip() for k in annotation.split("|")]
    if value is None:
        if "None" in kinds:
            return None
        raise _fail(where, key, f"must be set (expected {annotation})")
    for kind in kinds:
        if kind == "int" and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if kind == "str" and isinstance(value, str):
            return value
        if kind == "list[int]" and isinstance(value, list) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            return list(value)
    raise _fail(where, key, f"expected {annotation}, got {value!r}")


def _build_section(where: str, name: str, cls: type, raw: Any) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise _fail(where, name, f"must be a mapping, got {type(raw).__name__}")
    raw = dict(raw)
    if cls is ModelConfig and "preset" in raw:
        preset = raw.pop("preset")
        if preset not in MODEL_PRESETS:
            raise _fail(where, "model.preset", f"unknown preset {preset!r}; allowed: "
                        + ", ".join(MODEL_PRESETS))
        raw = {**MODEL_PRESETS[preset], **raw}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in raw.items():
        if key not in fields:
            allowed = ", ".join(fields) + (", preset" if cls is ModelConfig else "")
            raise _fail(where, f"{name}.{key}", f"unknown key; allowed: {allowed}")
        values[key] = _check_type(where, f"{name}.{key}", value, str(fields[key].type))
    return cls(**values)


def _positive(where: str, key: str, value: float) -> None:
    if value <= 0:
        raise _fail(where, key, f"must be > 0, got {value}")


def validate(cfg: RunConfig, where: str = "config") -> RunConfig:
    """Check the values that types alone cannot: shapes, ranges and names."""
    m, vr, t, d = cfg.model, cfg.value_residual, cfg.train, cfg.data
    for key in ("vocab_size", "n_layer", "d_model", "n_head", "seq_len"):
        _positive(where, f"model.{key}", getattr(m, key))
    if m.d_model % m.n_head:
        raise _fail(where, "model.n_head", f"{m.n_head} does not divide d_model={m.d_model}")
    if m.head_dim % 2:
        raise _fail(where, "model.n_head",
                    f"head_dim={m.head_dim} must be even for rotary embeddings")
    if m.ffn_hidden is not None:
        _positive(where, "model.ffn_hidden", m.ffn_hidden)
    _positive(where, "model.rope_theta", m.rope_theta)
    if vr.mode not in MODES:
        raise _fail(where, "value_residual.mode",
                    f"unknown mode {vr.mode!r}; allowed: {', '.join(MODES)}")
    if vr.source not in SOURCES:
        raise _fail(where, "value_residual.source",
                    f"unknown source {vr.source!r}; allowed: {', '.join(SOURCES)}")
    if isinstance(vr.layers, str) and vr.layers != "all":
        raise _fail(where, "value_residual.layers",
                    f"must be 'all' or a list of layer indices, got {vr.layers!r}")
    if isinstance(vr.layers, list):
        bad = [i for i in vr.layers if not 1 <= i < m.n_layer]
        if bad:
            raise _fail(where, "value_residual.layers",
                        f"indices {bad} out of range; allowed 1..{m.n_layer - 1} "
                        "(layer 0 is the source and never receives)")
    for key in ("batch_size", "eval_batches"):
        _positive(where, f"train.{key}", getattr(t, key))
    _positive(where, "train.lr", t.lr)
    if t.warmup_steps is not None and t.warmup_steps < 0:
        raise _fail(where, "train.warmup_steps", f"must be >= 0, got {t.warmup_steps}")
    if t.eval_every is not None:
        _positive(where, "train.eval_every", t.eval_every)
    if not 0 <= t.min_lr_ratio <= 1:
        raise _fail(where, "train.min_lr_ratio", f"must be in [0, 1], got {t.min_lr_ratio}")
    if t.weight_decay < 0:
        raise _fail(where, "train.weight_decay", f"must be >= 0, got {t.weight_decay}")
    for key in ("beta1", "beta2"):
        if not 0 <= getattr(t, key) < 1:
            raise _fail(where, f"train.{key}", f"must be in [0, 1), got {getattr(t, key)}")
    if not 0 < d.val_fraction < 1:
        raise _fail(where, "data.val_fraction", f"must be in (0, 1), got {d.val_fraction}")
    if d.test_fraction is not None:
        if not 0 <= d.test_fraction < 1:
            raise _fail(where, "data.test_fraction", f"must be in [0, 1), got {d.test_fraction}")
        if d.test_source and d.test_fraction > 0:
            raise _fail(where, "data.test_fraction", "must be 0 (or unset) with a "
                        "data.test_source: the test set is then all of test_source")
    if d.val_fraction + d.test_share >= 1:
        raise _fail(where, "data.test_fraction",
                    f"val_fraction {d.val_fraction} + test_fraction {d.test_share} leaves no "
                    "training data; their sum must be below 1")
    if not d.source:
        raise _fail(where, "data.source", "must be 'builtin', a text file or a .bin glob")
    return cfg


def _check_budget(where: str, t: TrainConfig) -> None:
    """Exactly one budget key, each a finite positive number (before steps are resolved)."""
    given = [k for k in BUDGET_KEYS if getattr(t, k) is not None]
    if len(given) > 1:
        raise _fail(where, f"train.{given[1]}", f"give one of {', '.join(BUDGET_KEYS)}, "
                    f"not {' and '.join(given)}")
    for key in given:
        value = getattr(t, key)
        if not math.isfinite(value) or value <= 0:
            raise _fail(where, f"train.{key}", f"must be > 0 and finite, got {value}")


def from_dict(raw: Any, where: str = "config") -> RunConfig:
    """Build and validate a RunConfig from a parsed mapping."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping with sections {', '.join(SECTIONS)}")
    unknown = [k for k in raw if k not in SECTIONS]
    if unknown:
        raise _fail(where, str(unknown[0]), f"unknown section; allowed: {', '.join(SECTIONS)}")
    sections = {name: _build_section(where, name, cls, raw.get(name))
                for name, cls in SECTIONS.items()}
    _check_budget(where, sections["train"])
    return validate(RunConfig(**sections), where)


def read_yaml(path: str | Path) -> Any:
    """Parse a YAML file with safe_load; every failure is a ConfigError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "not valid YAML"
        raise ConfigError(f"{path}: malformed YAML{at}: {problem}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None


def load_config(path: str | Path) -> RunConfig:
    """Load a run config YAML file (what `nas train` reads and `nas export` writes)."""
    return from_dict(read_yaml(path), where=str(path))


def dump_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")
