"""Reading what users write: YAML files (with `1e-3` a float), and pydantic's ValidationErrors
turned into the project's one-line messages (`file: key: what is allowed`). Run configs
(nas.config) and study specs (nas.spec) are built through `parse`; their fields declare their
own wording with `Refusal`, their validators raise `refuse(...)`. Knows nothing of torch.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar, get_args

import yaml
from annotated_types import Ge, Gt, Le, Lt
from pydantic import ConfigDict, ValidationError
from pydantic.types import AllowInfNan
from pydantic_core import ErrorDetails, PydanticCustomError

from .errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Refusal:
    """A field's own line for a bad value, in place of the generic `expected TYPE, got VALUE` or
    `must be > 0, got VALUE`: `Annotated[int, Refusal("must be ..., got {value!r}")]`."""

    text: str


def refuse(problem: str, key: str | None = None) -> PydanticCustomError:
    """What a validator raises for a rule a value breaks. `key` (dotted) names the field, relative
    to the object whose validator raises it, when that is not the field being validated."""
    return PydanticCustomError("refused", "{problem}", {"problem": problem, "key": key})


def unknown(what: str, value: Any, allowed: Iterable[str]) -> str:
    return f"unknown {what} {value!r}; allowed: {', '.join(allowed)}"


# A section refuses unknown keys and never converts between types (the string "4" is not 4, true
# is not 1); an int is still accepted, as a float, where a float is wanted. No float key takes
# nan or inf: each would train on silently, to a NaN loss or none at all.
STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


def allowed_keys(cls: type) -> list[str]:
    """The keys a mapping for `cls` may hold: its fields and its EXTRA_KEYS (a model section
    may also name a preset)."""
    return [f.name for f in dataclasses.fields(cls) if f.init] + list(
        getattr(cls, "EXTRA_KEYS", ()))


# Errors that break a rule rather than a type: reported after any unknown key or wrong type, as
# the checks always were (a typo first, then a range).
RULE_ERRORS = frozenset({"refused", "literal_error", "greater_than", "greater_than_equal",
                         "less_than", "less_than_equal", "finite_number", "string_too_short",
                         "too_short"})
UNKNOWN_KEY_ERRORS = frozenset({"unexpected_keyword_argument", "extra_forbidden"})
BOUNDS = ((Gt, "gt", ">", "("), (Ge, "ge", ">=", "["), (Lt, "lt", "<", ")"), (Le, "le", "<=", "]"))


def config_error(exc: ValidationError, where: str, root: type) -> ConfigError:
    """The one line for a ValidationError from building `root`: `where: key: what is allowed`."""
    error = min(exc.errors(), key=lambda e: e["type"] in RULE_ERRORS)
    loc = [str(part) for part in error["loc"]]
    owner, depth = root, 0  # down the sections to the dataclass that owns the key
    while depth < len(loc) and dataclasses.is_dataclass(sub := _field_type(owner, loc[depth])):
        owner, depth = sub, depth + 1
    # the key within `owner`; any later parts (a union member, a list index) are inside its value
    name = loc[depth] if depth < len(loc) else ""
    named = error["ctx"]["key"] if error["type"] == "refused" else None
    key = loc[:depth] + named.split(".") if named else loc[:depth + 1]
    return ConfigError(f"{where}: {'.'.join(key)}: {_problem(error, owner, name)}")


def _field_type(owner: type, name: str) -> Any:
    declared = getattr(owner, "__pydantic_fields__", {}).get(name)
    return declared.annotation if declared else None


def _problem(error: ErrorDetails, owner: type, name: str) -> str:
    kind, value = error["type"], error["input"]
    if kind == "refused":
        return error["ctx"]["problem"]
    if kind == "missing":
        return "required"
    if kind in UNKNOWN_KEY_ERRORS:
        noun = getattr(owner, "KEY_NOUN", "key")  # a run config's keys are its sections
        return f"unknown {noun}; allowed: {', '.join(allowed_keys(owner))}"
    declared = owner.__pydantic_fields__[name]
    refusal = next((m for m in declared.metadata if isinstance(m, Refusal)), None)
    if refusal:
        return refusal.text.format(value=value)
    written = next(f.type for f in dataclasses.fields(owner) if f.name == name)  # "int | None"
    if kind == "literal_error":
        choices = get_args(declared.annotation)
        if isinstance(value, type(choices[0])):  # a wrong name; anything else is a wrong type
            return unknown(name, value, choices)
        written = type(choices[0]).__name__
    elif kind in RULE_ERRORS:
        # shown as kept: an int given for a float is the float
        shown = float(value) if "float" in written and type(value) is int else value
        return f"must be {_bounds(declared.metadata, kind == 'finite_number')}, got {shown}"
    if value is None:
        return f"must be set (expected {written})"
    return f"expected {written}, got {value!r}"


def _bounds(metadata: list[Any], finite: bool = False) -> str:
    """A field's constraints as a message states them: `> 0`, `>= 0`, `in (0, 1)`, `in [0, 1)`;
    ` and finite` where the value was not (`finite`) or the field says so itself."""
    found = [(op, bracket, getattr(m, attr)) for cls, attr, op, bracket in BOUNDS
             for m in metadata if isinstance(m, cls)]
    if len(found) == 2:  # a lower and an upper bound: an interval
        (_, left, low), (_, right, high) = found
        text = f"in {left}{low}, {high}{right}"
    else:
        text = " and ".join(f"{op} {limit}" for op, _, limit in found)
    finite |= any(isinstance(m, AllowInfNan) and not m.allow_inf_nan for m in metadata)
    if not text:
        return "a finite number" if finite else "valid"
    return text + (" and finite" if finite else "")


def first_non_finite(value: Any) -> float | None:
    """The first nan or inf anywhere in a parsed YAML value (mappings and lists included)."""
    if isinstance(value, float):
        return None if math.isfinite(value) else value
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    return next((bad for item in items if (bad := first_non_finite(item)) is not None), None)


Validated = TypeVar("Validated")


def parse(cls: type[Validated], raw: dict, where: str) -> Validated:
    """Build `cls` from a parsed mapping; what pydantic refuses is one ConfigError line."""
    try:
        return cls(**{str(k): v for k, v in raw.items()})
    except ValidationError as exc:
        raise config_error(exc, where, cls) from None


class YamlLoader(yaml.SafeLoader):
    """safe_load, except that `1e-3` is a float as in YAML 1.2 and Python (PyYAML's YAML 1.1
    wants `1.0e-3`): for run-config files and `--set` values alike."""


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def read_yaml(path: str | Path) -> Any:
    """Parse a YAML file (YamlLoader); every failure is a ConfigError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=YamlLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "not valid YAML"
        raise ConfigError(f"{path}: malformed YAML{at}: {problem}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
