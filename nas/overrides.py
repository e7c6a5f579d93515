"""`--set KEY=VALUE`: overrides of a run config (`nas train`) or of a study's space
(`nas search`), by dotted key: `--set train.lr=1e-3 --set model.n_layer=12`.

A value is read as a YAML value, as the file would give it (`1e-3` a float, `[1, 2]` a list,
`null` unset). The file is checked as it is first (its errors name the file); then the config
with the overrides, whose errors name `--set` and the key, in the same one line as the file's.
What gets stored (a run folder's config.yaml, a study's space and its trials' configs) is the
config with the overrides; a study also stores the overrides themselves (`STUDY_ATTR`, see
`nas.search.stored_overrides`), which every later command on it applies again.

`--set model.preset=NAME` is the preset's size: it replaces the keys a preset sets
(`PRESET_SIZE_KEYS`) wherever the file gives them, and a later `--set` of one of them still
applies on top.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nas.config import MODEL_PRESETS, RunConfig, from_dict
from nas.errors import ConfigError, excerpt, shorten
from nas.parsing import load_yaml, read_yaml

WHERE = "--set"
STUDY_ATTR = "overrides"  # a study's user attribute: the KEY=VALUE texts it was searched with
PRESET = ["model", "preset"]
# Every key some preset sets: a preset given by --set replaces them all (ffn_hidden too, which
# only the paper presets set: the others leave it to its default of 3.5 x d_model).
PRESET_SIZE_KEYS = tuple(sorted({key for size in MODEL_PRESETS.values() for key in size}))

Override = tuple[list[str], Any]  # the dotted key's parts and the value


def parse_override(text: str) -> Override:
    """`KEY=VALUE` -> (KEY split at dots, VALUE read as YAML, within `parsing.load_yaml`'s
    bounds)."""
    key, eq, value = text.partition("=")
    parts = key.strip().split(".")
    if not eq or not all(parts):
        raise ConfigError(f"{WHERE} {shorten(text)}: expected KEY=VALUE with a dotted key, "
                          "e.g. train.lr=1e-3")
    return parts, load_yaml(value, f"{WHERE} {shorten(text)}", malformed="malformed value")


def apply(raw: Any, overrides: Sequence[Override]) -> dict:
    """A copy of the mapping `raw` with each override set, in order (a later one wins), the
    mappings on the way to a key created where missing."""
    out = copy.deepcopy(raw) if isinstance(raw, dict) else {}
    for parts, value in overrides:
        if parts == PRESET:
            out = without_preset_sizes(out)
        node = out
        for depth, part in enumerate(parts[:-1]):
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise ConfigError(f"{WHERE}: {'.'.join(parts[:depth + 1])}: is "
                                  f"{excerpt(node)}, not a mapping, so it has no key "
                                  f"{shorten(parts[depth + 1])}")
        node[parts[-1]] = copy.deepcopy(value)
    return out


def without_preset_sizes(raw: dict) -> dict:
    """`raw` less the model keys a preset sets (PRESET_SIZE_KEYS): what a --set preset
    replaces."""
    model = raw.get("model")
    if not isinstance(model, dict):
        return raw
    return {**raw, "model": {k: v for k, v in model.items() if k not in PRESET_SIZE_KEYS}}


def sets_preset(overrides: Sequence[Override]) -> bool:
    return any(parts == PRESET for parts, _ in overrides)


def load_config(path: str | Path, sets: Sequence[str] = (),
                data: str | None = None) -> RunConfig:
    """A run config file with the `--set` overrides, and `--data` (data.source), on top,
    checked as the module docstring says."""
    raw = read_yaml(path)
    cfg = from_dict(raw, where=str(path))
    overrides = parse_all(sets)
    if data is not None:
        overrides.append((["data", "source"], data))  # a path as given, not read as YAML
    if not overrides:
        return cfg
    flags = [flag for flag, given in ((WHERE, sets), ("--data", data is not None)) if given]
    return from_dict(apply(raw, overrides), where=", ".join(flags))


def parse_all(sets: Sequence[str]) -> list[Override]:
    return [parse_override(text) for text in sets]


def as_stored(sets: Sequence[str]) -> list[str]:
    """The `--set` texts as a study stores them: `KEY=VALUE`, spaces around both trimmed."""
    return [f"{key.strip()}={value.strip()}" for key, _, value in
            (text.partition("=") for text in sets)]


def by_key(sets: Sequence[str]) -> dict[str, tuple[str, str]]:
    """Each dotted key's `--set` (the later of two wins) -> (its KEY=VALUE text, its value as
    canonical JSON: `1e-3` and `0.001` are one value, `1` and `true` two)."""
    found = {}
    for text, (parts, value) in zip(as_stored(sets), parse_all(sets), strict=True):
        found[".".join(parts)] = (text, json.dumps(value, sort_keys=True, default=str))
    return found


def canonical(sets: Sequence[str]) -> dict[str, str]:
    """What the overrides set, whatever their order or spelling: key -> value (JSON)."""
    return {key: value for key, (_, value) in sorted(by_key(sets).items())}


def mismatch(study: str, stored: Sequence[str], given: Sequence[str], *,
             complete: bool) -> str | None:
    """One line naming the first key where the `given` overrides depart from those the study
    was searched with (`stored`), with both values, or None where they agree: a key given
    with another value, or given and not stored; with `complete`, a stored key not given."""
    was, now = by_key(stored), by_key(given)
    for key in [*now, *(k for k in was if complete and k not in now)]:
        if key in was and key in now and was[key][1] == now[key][1]:
            continue
        then = f"with {was[key][0]}" if key in was else "without it"
        here = f"here {now[key][0]}" if key in now else "here without it"
        return (f"{WHERE} {key}: study {study!r} was searched {then}, {here}; leave {WHERE} "
                "out to go on as it was searched (a study applies its own), or give the spec "
                "a new name to search another setting")
    return None
