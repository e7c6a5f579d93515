"""Reading what users write: YAML files (with `1e-3` a float), and pydantic's ValidationErrors
turned into the project's one-line messages (`file: key: what is allowed`). Run configs
(nas.config) and study specs (nas.search.spec) are built through `parse`; their fields declare their
own wording with `Refusal`, their validators raise `refuse(...)`. Knows nothing of torch.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Hashable, Iterable
from pathlib import Path
from typing import Any, TypeVar, get_args

import yaml
from annotated_types import Ge, Gt, Le, Lt
from pydantic import ConfigDict, ValidationError
from pydantic.types import AllowInfNan
from pydantic_core import ErrorDetails, PydanticCustomError

from nas.errors import INT_LIMIT, ConfigError, excerpt, shorten


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
    return f"unknown {what} {excerpt(value)}; allowed: {', '.join(allowed)}"


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
    """A field's type; an optional section's (`WarmStart | None`) is the section's."""
    declared = getattr(owner, "__pydantic_fields__", {}).get(name)
    if declared is None:
        return None
    members = [t for t in get_args(declared.annotation) if t is not type(None)]
    optional = len(members) == 1 and type(None) in get_args(declared.annotation)
    return members[0] if optional else declared.annotation


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
        return refusal.text.format(value=Quoted(value))
    written = next(f.type for f in dataclasses.fields(owner) if f.name == name)  # "int | None"
    if kind == "literal_error":
        choices = get_args(declared.annotation)
        if isinstance(value, type(choices[0])):  # a wrong name; anything else is a wrong type
            return unknown(name, value, choices)
        written = type(choices[0]).__name__
    elif kind in RULE_ERRORS:
        # shown as kept: an int given for a float is the float
        shown = float(value) if "float" in written and type(value) is int else value
        return (f"must be {_bounds(declared.metadata, kind == 'finite_number')}, "
                f"got {shorten(str(shown))}")
    if value is None:
        return f"must be set (expected {written})"
    return f"expected {written}, got {excerpt(value)}"


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
    """The first nan or inf anywhere in a parsed YAML value (mappings and lists included). Each
    list or mapping is visited once: a value shared through YAML aliases is not walked again."""
    seen: set[int] = set()
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float):
            if not math.isfinite(item):
                return item
        elif isinstance(item, (dict, list)) and id(item) not in seen:
            seen.add(id(item))
            stack.extend(reversed(list(item.values() if isinstance(item, dict) else item)))
    return None


Validated = TypeVar("Validated")


def section(cls: type[Validated], raw: Any, not_a_mapping: str) -> Validated:
    """A nested section from its mapping, in a `mode="before"` validator (a strict dataclass
    accepts only its own instances, so it is built here); `not_a_mapping` is the line for any
    other value."""
    if isinstance(raw, cls):
        return raw
    if not isinstance(raw, dict):
        raise refuse(not_a_mapping.format(value=Quoted(raw)))
    return cls(**{str(k): v for k, v in raw.items()})


def parse(cls: type[Validated], raw: dict, where: str) -> Validated:
    """Build `cls` from a parsed mapping; what pydantic refuses is one ConfigError line."""
    try:
        return cls(**{str(k): v for k, v in raw.items()})
    except ValidationError as exc:
        raise config_error(exc, where, cls) from None


class Quoted:
    """A value as a Refusal's text quotes it: `{value!r}` and `{value}` are excerpts."""

    def __init__(self, value: Any):
        self.value = value

    def __repr__(self) -> str:
        return excerpt(self.value)

    def __str__(self) -> str:
        return shorten(str(self.value))


# What one YAML text may hold. A run config or a spec is a few hundred nodes, a few levels deep,
# a few KiB; these bounds keep an alias bomb, a deep nest or a huge file from exhausting memory,
# the stack or the terminal before anything is checked.
MAX_YAML_BYTES = 1 << 20
MAX_YAML_NODES = 100_000  # scalars, lists and mappings, each alias counted as what it repeats
MAX_YAML_DEPTH = 32  # lists and mappings inside one another
# The integers any field holds: torch's, numpy's and SQLite's are 64-bit.


class YamlRefusal(yaml.MarkedYAMLError):
    """A YAML text that parses but breaks one of the bounds above (or has a duplicate key)."""

    def __init__(self, problem: str, mark: yaml.Mark | None):
        super().__init__(problem=problem, problem_mark=mark)


class YamlLoader(yaml.SafeLoader):
    """safe_load, except that `1e-3` is a float as in YAML 1.2 and Python (PyYAML's YAML 1.1
    wants `1.0e-3`), within the bounds above, and refusing a key given twice in one mapping
    (PyYAML keeps the last): for run-config files and `--set` values alike."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self.depth = 0
        self.sizes: dict[int, int] = {}  # id(node) -> its nodes, aliases expanded

    def compose_node(self, parent: Any, index: Any) -> yaml.Node:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            node = self.anchors.get(event.anchor)
            if node is not None and id(node) not in self.sizes:
                raise YamlRefusal(f"alias *{event.anchor} refers to a list or mapping that "
                                  "holds it (a recursive alias)", event.start_mark)
            return super().compose_node(parent, index)
        self.depth += 1
        if self.depth > MAX_YAML_DEPTH:
            raise YamlRefusal(f"nested more than {MAX_YAML_DEPTH} lists or mappings deep",
                              self.peek_event().start_mark)
        try:
            node = super().compose_node(parent, index)
        finally:
            self.depth -= 1
        if isinstance(node, yaml.MappingNode):
            children = [child for pair in node.value for child in pair]
        else:
            children = node.value if isinstance(node, yaml.SequenceNode) else []
        self.sizes[id(node)] = size = 1 + sum(self.sizes[id(child)] for child in children)
        if size > MAX_YAML_NODES:
            raise YamlRefusal(f"more than {MAX_YAML_NODES:,} values once its aliases are "
                              "expanded (an alias bomb?)", node.start_mark)
        return node

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value if isinstance(node, yaml.MappingNode) else ():
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base`: its keys may be given again, to override them
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, Hashable):
                continue  # SafeLoader refuses it
            if key in seen:
                first = seen[key]
                raise YamlRefusal(f"duplicate key {excerpt(key)} (first at line {first.line + 1})"
                                  "; a key may appear once in a mapping", key_node.start_mark)
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        # Past 66 characters (`0b` and 64 binary digits) no text is a 64-bit integer; refused
        # before Python converts it (4,300 decimal digits raise, base 60 takes long).
        text = str(node.value).replace("_", "")
        value = super().construct_yaml_int(node) if len(text) <= 66 else INT_LIMIT
        if not -INT_LIMIT <= value < INT_LIMIT:
            raise YamlRefusal(f"integer {shorten(text, 24)} is out of range; no key takes one "
                              "beyond 64 bits (-2**63..2**63-1)", node.start_mark)
        return value


YamlLoader.add_constructor("tag:yaml.org,2002:int", YamlLoader.construct_yaml_int)
YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def load_yaml(text: str, where: str, malformed: str = "malformed YAML") -> Any:
    """Parse YAML text (YamlLoader) within the bounds above; every failure is a ConfigError
    `where: ...` with the line and column where the parser stopped (`where: malformed ...`
    for text that is not YAML)."""
    if len(text) > MAX_YAML_BYTES:
        raise ConfigError(f"{where}: {len(text):,} characters, more than the "
                          f"{MAX_YAML_BYTES:,} a config or spec may hold")
    try:
        return yaml.load(text, Loader=YamlLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        if isinstance(exc, YamlRefusal):
            raise ConfigError(f"{where}:{at.replace(' at', '', 1)}: {exc.problem}") from None
        problem = getattr(exc, "problem", None) or "not valid YAML"
        raise ConfigError(f"{where}: {malformed}{at}: {problem}") from None


def read_yaml(path: str | Path) -> Any:
    """Parse a YAML file (`load_yaml`); every failure is a ConfigError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    size = path.stat().st_size
    if size > MAX_YAML_BYTES:  # never read: it may be a disk image given by mistake
        raise ConfigError(f"{path}: {size:,} bytes, more than the {MAX_YAML_BYTES:,} a config "
                          "or spec may hold")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    return load_yaml(text, str(path))
