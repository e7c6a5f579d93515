"""Study specs: a YAML file naming a search space, the objectives and the fixed parts of the run
config, read and checked before any storage is opened. Owns what a spec may say (its keys,
objectives, samplers and pruners by name); never opens a storage, never trains. Knows nothing
of torch (`check_trainable` imports the data module when a search is about to start).
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import optuna

from . import lr_sweep
from . import space as spaces
from .config import ConfigError, RunConfig, from_dict, read_yaml
from .storage import HEARTBEAT
from .trials import OBJECTIVES

SAMPLERS = ("tpe", "nsga2", "random", "bruteforce")
PRUNERS = ("none", "pareto", "median", "hyperband")

# Heartbeats, grouped TPE and metric names are marked experimental but are what we rely on.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


@dataclass
class StudySpec:
    name: str
    space: dict
    objectives: list[str] = field(default_factory=lambda: ["val_loss", "n_params"])
    n_trials: int = 20
    storage: str | None = None
    base: dict = field(default_factory=dict)
    sampler: dict = field(default_factory=lambda: {"type": "tpe"})
    pruner: dict = field(default_factory=lambda: {"type": "none"})
    seed: int = 0
    max_params: int | None = None
    baselines: bool = True
    heartbeat: dict = field(default_factory=dict)  # overrides of HEARTBEAT
    artifacts: str | None = None  # artifact folder (default: next to the storage)
    lr_sweep: str = "all_seeds"  # or first_seed (nas.lr_sweep)
    path: str = "study"

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    @property
    def merged_space(self) -> dict:
        return spaces.merge(self.base, self.space)

    def default_storage(self) -> str:
        return f"sqlite:///runs/{self.name}.db"



def load_spec(path: str | Path, data: str | None = None) -> StudySpec:
    """Read and check a study spec; `data` overrides the base's data.source."""
    path = Path(path)
    where = str(path)
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: a study spec must be a mapping")
    fields = {f.name for f in dataclasses.fields(StudySpec)} - {"path"}
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise ConfigError(f"{where}: {unknown[0]}: unknown key; allowed: "
                          + ", ".join(sorted(fields)))
    for key in ("name", "space"):
        if key not in raw:
            raise ConfigError(f"{where}: {key}: required")
    if not isinstance(raw["name"], str) or not raw["name"]:
        raise ConfigError(f"{where}: name: must be a non-empty string")
    space = raw["space"]
    if isinstance(space, str):
        space_path = (path.parent / space) if not Path(space).is_absolute() else Path(space)
        space = read_yaml(space_path)
        where_space = str(space_path)
    else:
        where_space = f"{where}: space"
    spec = StudySpec(**{**raw, "space": spaces.check_space(space, where_space), "path": where})
    if data is not None:
        spec.base = spaces.merge(spec.base, {"data": {"source": data}})
    _check_spec(spec, where)
    return spec


def _check_spec(spec: StudySpec, where: str) -> None:
    if not isinstance(spec.objectives, list) or not spec.objectives:
        raise ConfigError(f"{where}: objectives: must be a non-empty list of "
                          + ", ".join(OBJECTIVES))
    for name in spec.objectives:
        if name not in OBJECTIVES:
            raise ConfigError(f"{where}: objectives: unknown objective {name!r}; allowed: "
                              + ", ".join(OBJECTIVES))
    if spec.objectives[0] != "val_loss":
        raise ConfigError(f"{where}: objectives: the first objective must be val_loss")
    if not isinstance(spec.n_trials, int) or spec.n_trials < 1:
        raise ConfigError(f"{where}: n_trials: must be a positive integer, got {spec.n_trials!r}")
    if spec.max_params is not None and (not isinstance(spec.max_params, int)
                                        or spec.max_params < 1):
        raise ConfigError(f"{where}: max_params: must be a positive integer")
    for key, kinds, allowed in (("seed", int, "an integer"), ("baselines", bool, "true or false"),
                                ("storage", (str, type(None)), "a storage URL or path")):
        if not isinstance(getattr(spec, key), kinds):
            raise ConfigError(f"{where}: {key}: must be {allowed}, got {getattr(spec, key)!r}")
    if not isinstance(spec.heartbeat, dict):
        raise ConfigError(f"{where}: heartbeat: must be a mapping with keys "
                          + ", ".join(HEARTBEAT))
    for key, value in spec.heartbeat.items():
        if key not in HEARTBEAT:
            raise ConfigError(f"{where}: heartbeat.{key}: unknown key; allowed: "
                              + ", ".join(HEARTBEAT))
        low = 0 if key == "max_retry" else 1
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ConfigError(f"{where}: heartbeat.{key}: must be an integer >= {low} "
                              f"(seconds for interval and grace_period), got {value!r}")
    spaces.check_space(spec.base, f"{where}: base")
    _check_lr_grid(spec, where)
    for key, allowed in (("sampler", SAMPLERS), ("pruner", PRUNERS)):
        value = getattr(spec, key)
        if not isinstance(value, dict) or value.get("type") not in allowed:
            raise ConfigError(f"{where}: {key}.type: must be one of {', '.join(allowed)}")
    if spec.multi_objective and spec.pruner["type"] in ("median", "hyperband"):
        raise ConfigError(f"{where}: pruner.type: Optuna cannot prune multi-objective studies "
                          "with median or hyperband; use pareto or none")
    draw_configs(spec, where)


def _check_lr_grid(spec: StudySpec, where: str) -> None:
    """A named-variant study's learning-rate list is a grid the analysis chooses from; the
    first_seed protocol needs a grid, seeds and the queue it fills."""
    space = spec.merged_space
    lr, seed = space.get("train", {}).get("lr"), space.get("train", {}).get("seed")
    if space.get("variants") and isinstance(lr, list) and len(lr) < 2:
        raise ConfigError(f"{where}: train.lr: a learning-rate grid needs at least 2 values "
                          f"for the analysis to choose among, got {lr}; give one number to fix it")
    if spec.lr_sweep not in lr_sweep.PROTOCOLS:
        raise ConfigError(f"{where}: lr_sweep: must be one of {', '.join(lr_sweep.PROTOCOLS)}, "
                          f"got {spec.lr_sweep!r}")
    if spec.lr_sweep == "first_seed":
        for key, value, need in (("variants", space.get("variants"), "named variants"),
                                 ("train.lr", lr, "a list of at least 2 learning rates"),
                                 ("train.seed", seed, "a list of at least 2 seeds")):
            if not value or (isinstance(value, list) and len(value) < 2) or (
                    key != "variants" and not isinstance(value, list)):
                raise ConfigError(f"{where}: {key}: lr_sweep first_seed needs {need}")
        if spec.sampler.get("type") != "bruteforce":
            raise ConfigError(f"{where}: sampler.type: lr_sweep first_seed needs bruteforce")


def draw_configs(spec: StudySpec, where: str, draws: int = 32) -> list[RunConfig]:
    """Sample the space at random (no training) so that impossible shapes fail now."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    probe = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    merged = spec.merged_space
    configs = []
    for _ in range(draws):
        trial = probe.ask()
        raw = spaces.sample(merged, trial)
        configs.append(from_dict(raw, where=f"{where} (a draw from the space)"))
        probe.tell(trial, 0.0)
    return configs


def check_trainable(spec: StudySpec, draws: int = 32) -> None:
    """What `nas search` needs beyond a valid spec, checked before the study is touched: every
    data source the space can draw opens and is long enough (imports torch), and each trial
    trains on one device (run one worker per GPU instead)."""
    from .data import TokenDataModule

    seen = set()
    for cfg in draw_configs(spec, spec.path, draws):
        if cfg.train.devices not in (1, "1"):
            raise ConfigError(f"{spec.path}: train.devices: must be 1 in a study, got "
                              f"{cfg.train.devices!r}: run one `nas search` worker per GPU; "
                              "several devices per run are for `nas train`")
        d, m = cfg.data, cfg.model
        key = (d.source, d.val_fraction, d.test_fraction, d.test_source, m.seq_len, m.vocab_size)
        if key in seen:
            continue
        seen.add(key)
        try:
            TokenDataModule(d, m.seq_len, m.vocab_size, 1, 1, cfg.train.seed, 1, 1)
        except ConfigError as exc:
            raise ConfigError(f"{spec.path}: {exc}") from None
