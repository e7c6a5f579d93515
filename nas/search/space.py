"""Search spaces: a run config with holes, turned into `trial.suggest_*` calls.

A space has the run config's sections. In it:
- a list is a categorical choice: `n_head: [2, 4]`;
- a mapping `{low, high}` (optional `log`, `step`) is a range, int if both ends are ints;
- anything else is fixed.
`value_residual.layers` is special: `all`, a fixed list of layers, or a pattern mapping
`{pattern: P}` where P is `subset` (one boolean per layer), `last_k`, `unet` (the first and last k
layers) or `all`, or a list of those to choose from. Optional `k` for last_k/unet: a range
`{low, high}` to search, a fixed number of layers (`k: 3`), or a fixed share of n_layer
(`k: 0.375`: 3 of 8 layers, 2 of 4; rounded half up, at least 1), which keeps a pattern comparable
across model sizes.

`variants` (beside the sections) names value-residual plans to choose among as a whole, e.g.
`{identity: {mode: resformer, lambda1: 0.5, lambda2: 0.5}, sparse: {...}}`: each trial picks a
name (parameter `variant`) and its mapping overrides the space's `value_residual` section.
Named variants are how a study compares the paper's fixed forms (two of them share the mode
`resformer`) rather than searching their coefficients.

Conditional parameters are suggested only where they apply: `value_residual` keys only for the
modes that read them (`nas.modes.MODES`), per-layer booleans only up to the trial's n_layer.
Parameter names are dotted paths (`value_residual.lambda1`). Knows nothing of torch.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Protocol

from nas.config import MODEL_PRESETS, SECTIONS, ModelConfig
from nas.errors import ConfigError, excerpt
from nas.modes import BASELINE_MODE, MODES
from nas.parsing import allowed_keys, first_non_finite

PATTERNS = ("all", "subset", "last_k", "unet")
RANGE_KEYS = {"low", "high", "log", "step"}


class Suggester(Protocol):
    """The part of optuna.Trial a space needs."""

    def suggest_categorical(self, name: str, choices: Any) -> Any: ...
    def suggest_int(self, name: str, low: int, high: int, step: int = 1,
                    log: bool = False) -> int: ...
    def suggest_float(self, name: str, low: float, high: float, *, step: float | None = None,
                      log: bool = False) -> float: ...


def merge(base: dict, override: dict) -> dict:
    """Deep-merge two config mappings; `override` wins."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and not _is_range(value):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _is_range(value: Any) -> bool:
    return isinstance(value, dict) and {"low", "high"} <= set(value) and set(value) <= RANGE_KEYS


def check_space(space: Any, where: str) -> dict:
    """Structural checks that need no sampling: sections, keys, ranges, choices, patterns."""
    if not isinstance(space, dict):
        raise ConfigError(f"{where}: a search space must be a mapping of run-config sections")
    for section, body in space.items():
        if section == "variants":
            _check_variants(body, where)
            continue
        if section not in SECTIONS:
            raise ConfigError(f"{where}: {section}: unknown section; allowed: "
                              + ", ".join([*SECTIONS, "variants"]))
        if not isinstance(body, dict):
            raise ConfigError(f"{where}: {section}: must be a mapping")
        allowed = allowed_keys(SECTIONS[section])
        for key, value in body.items():
            name = f"{section}.{key}"
            if key not in allowed:
                raise ConfigError(f"{where}: {name}: unknown key; allowed: {', '.join(allowed)}")
            # here, not at a draw: a draw may never pick the one bad choice of a list
            if (bad := first_non_finite(value)) is not None:
                raise ConfigError(f"{where}: {name}: must be finite, got {bad}")
            if name == "value_residual.layers":
                _check_layers(value, where)
            elif isinstance(value, list):
                if not value:
                    raise ConfigError(f"{where}: {name}: an empty list offers no choice")
                if not all(v is None or isinstance(v, (bool, int, float, str)) for v in value):
                    raise ConfigError(f"{where}: {name}: choices must be plain values")
            elif isinstance(value, dict):
                _check_range(value, name, where)
    return space


def _check_variants(variants: Any, where: str) -> None:
    if not isinstance(variants, dict) or not variants:
        raise ConfigError(f"{where}: variants: must be a mapping of names to value_residual "
                          "settings, e.g. {identity: {mode: resformer}}")
    for name, body in variants.items():
        if not isinstance(name, str) or not isinstance(body, dict):
            raise ConfigError(f"{where}: variants.{name}: must be a name mapped to "
                              "value_residual settings")
        check_space({"value_residual": body}, f"{where}: variants.{name}")


def _check_range(value: dict, name: str, where: str) -> None:
    if not _is_range(value):
        raise ConfigError(f"{where}: {name}: a range needs low and high (optional log, step); "
                          f"got keys {excerpt(sorted(map(str, value)))}")
    low, high = value["low"], value["high"]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)):
        raise ConfigError(f"{where}: {name}: low and high must be numbers")
    if low > high:
        raise ConfigError(f"{where}: {name}: low {low} is above high {high}")
    if value.get("log") and low <= 0:
        raise ConfigError(f"{where}: {name}: a log range needs low > 0")


def _check_layers(value: Any, where: str) -> None:
    name = "value_residual.layers"
    if value == "all" or (isinstance(value, list) and all(isinstance(v, int) for v in value)):
        return
    if not isinstance(value, dict) or "pattern" not in value:
        raise ConfigError(f"{where}: {name}: expected 'all', a list of layers or "
                          f"{{pattern: {'|'.join(PATTERNS)}}}")
    unknown = set(value) - {"pattern", "k"}
    if unknown:
        raise ConfigError(f"{where}: {name}: unknown key {sorted(unknown)[0]}; "
                          "allowed: pattern, k")
    patterns = value["pattern"] if isinstance(value["pattern"], list) else [value["pattern"]]
    bad = [p for p in patterns if p not in PATTERNS]
    if bad or not patterns:
        raise ConfigError(f"{where}: {name}.pattern: unknown pattern {bad[0] if bad else '[]'!r}"
                          f"; allowed: {', '.join(PATTERNS)}")
    k = value.get("k")
    if isinstance(k, dict):
        _check_range(k, f"{name}.k", where)
    elif k is not None and (isinstance(k, bool) or not (
            (isinstance(k, int) and k >= 1) or (isinstance(k, float) and 0 < k < 1))):
        raise ConfigError(f"{where}: {name}.k: expected {{low, high}}, a number of layers >= 1 "
                          f"or a share of the layers in (0, 1); got {excerpt(k)}")


def _suggest(trial: Suggester, name: str, value: Any) -> Any:
    if isinstance(value, list):
        return trial.suggest_categorical(name, value)
    if _is_range(value):
        low, high = value["low"], value["high"]
        log = bool(value.get("log", False))
        if isinstance(low, int) and isinstance(high, int) and isinstance(value.get("step", 1), int):
            return trial.suggest_int(name, low, high, step=value.get("step", 1), log=log)
        return trial.suggest_float(name, float(low), float(high), step=value.get("step"), log=log)
    return copy.deepcopy(value)


def _n_layer(model: dict) -> int:
    """The drawn model's n_layer: its own, else its preset's, else the default."""
    if "n_layer" in model:
        return int(model["n_layer"])
    if model.get("preset") in MODEL_PRESETS:  # an unknown name is the run config's to refuse
        return ModelConfig.from_preset(model["preset"]).n_layer
    return ModelConfig().n_layer


def _suggest_layers(trial: Suggester, value: Any, n_layer: int) -> str | list[int]:
    name = "value_residual.layers"
    if not isinstance(value, dict):
        return copy.deepcopy(value)
    pattern = _suggest(trial, f"{name}.pattern", value["pattern"])
    if pattern == "all":
        return "all"
    if pattern == "subset":
        return [i for i in range(1, n_layer)
                if trial.suggest_categorical(f"{name}.{i}", [True, False])]
    most = n_layer - 1 if pattern == "last_k" else max(1, (n_layer - 1) // 2)
    bounds = value.get("k", {"low": 1, "high": most})
    if isinstance(bounds, dict):
        k = trial.suggest_int(f"{name}.{pattern}", max(1, bounds["low"]),
                              min(most, bounds["high"]))
    else:  # fixed: a number of layers, or a share of them
        k = min(most, max(1, math.floor(bounds * n_layer + 0.5) if isinstance(bounds, float)
                              else bounds))
    last = list(range(n_layer - k, n_layer))
    return last if pattern == "last_k" else sorted(set(range(1, k + 1)) | set(last))


def _offers(vr_space: dict, mode: str) -> bool:
    choices = vr_space.get("mode", BASELINE_MODE)
    return mode in choices if isinstance(choices, list) else mode == choices


def mode_params(space: dict, mode: str) -> dict[str, Any]:
    """The parameters by which a trial of `space` comes to run `mode`, as `sample` suggests
    them: the first variant that offers it (`variant`) and the mode among a list of choices
    (`value_residual.mode`). Empty where the space offers no such choice: the mode fixed, or
    not among the choices (no distribution of the space's can record it).

    The vanilla baselines are queued with these, so that they record the mode with the
    distribution every other trial records it with: GP and NSGA-II model only the parameters
    every finished trial has with one distribution (Optuna's IntersectionSearchSpace)."""
    vr_space = space.get("value_residual", {})
    params: dict[str, Any] = {}
    if space.get("variants"):
        name = next((n for n, body in space["variants"].items()
                     if _offers(merge(vr_space, body), mode)), None)
        if name is None:
            return {}
        params["variant"] = name
        vr_space = merge(vr_space, space["variants"][name])
    if not _offers(vr_space, mode):
        return {}
    if isinstance(vr_space.get("mode"), list):
        params["value_residual.mode"] = mode
    return params


def sample(space: dict, trial: Suggester, force_mode: str | None = None) -> dict:
    """One run-config mapping drawn from `space` (already merged with the study's base).

    `force_mode` (the enqueued vanilla baselines) runs that mode. Where the space offers it as
    a choice, the trial still makes the choice (`mode_params`), which its queue entry holds
    fixed, so that it records the mode as every trial does; a trial whose choice comes out
    otherwise is refused (ValueError: queued without them). Elsewhere the mode is fixed
    without suggesting it or a variant."""
    raw: dict[str, dict] = {}
    for section in ("model", "train", "data"):
        raw[section] = {k: _suggest(trial, f"{section}.{k}", v)
                        for k, v in space.get(section, {}).items()}
    vr_space = space.get("value_residual", {})
    choosing = force_mode is None or bool(mode_params(space, force_mode))
    if space.get("variants") and choosing:
        name = trial.suggest_categorical("variant", list(space["variants"]))
        vr_space = merge(vr_space, space["variants"][name])
    mode = (_suggest(trial, "value_residual.mode", vr_space.get("mode", BASELINE_MODE))
            if choosing else force_mode)
    if force_mode and mode != force_mode:
        raise ValueError(f"a trial that must run {force_mode} chose {mode}: it was queued "
                         f"without {mode_params(space, force_mode)}")
    vr: dict[str, Any] = {"mode": mode}
    for key in MODES[mode].keys if mode in MODES else ():
        if key not in vr_space:
            continue
        if key == "layers":
            vr[key] = _suggest_layers(trial, vr_space[key], _n_layer(raw["model"]))
        else:
            vr[key] = _suggest(trial, f"value_residual.{key}", vr_space[key])
    raw["value_residual"] = vr
    return raw


class _NoChoice:
    """A Suggester for a plan that must be fixed: any suggestion is a choice it offers."""

    def _refuse(self, name: str, *_: Any, **__: Any) -> Any:
        raise ConfigError(f"{name}: offers a choice; a fixed plan has one value per key")

    suggest_categorical = suggest_int = suggest_float = _refuse


def fixed_plan(body: dict, n_layer: int) -> dict:
    """The value_residual settings `body` (a named variant's) as one plan at `n_layer` layers,
    a layer pattern resolved there; a key that offers a choice is a ConfigError naming it."""
    return sample({"model": {"n_layer": n_layer}, "value_residual": body},
                  _NoChoice())["value_residual"]


def fixed_choices(space: dict, section: str, key: str) -> list[Any]:
    """The values a space allows for one categorical or fixed key (for enqueuing baselines)."""
    value = space.get(section, {}).get(key)
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]
