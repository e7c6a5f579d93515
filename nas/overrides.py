"""`--set KEY=VALUE`: overrides of a run config (`nas train`) or of a study's space
(`nas search`), by dotted key: `--set train.lr=1e-3 --set model.n_layer=12`.

A value is read as a YAML value, as the file would give it (`1e-3` a float, `[1, 2]` a list,
`null` unset). The file is checked as it is first (its errors name the file); then the config
with the overrides, whose errors name `--set` and the key, in the same one line as the file's.
What gets stored (a run folder's config.yaml, a study's space and its trials' configs) is the
config with the overrides.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .config import ConfigError, RunConfig, from_dict
from .parsing import excerpt, load_yaml, read_yaml, shorten

WHERE = "--set"

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
