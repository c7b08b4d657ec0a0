"""How a config is read, independent of its schema: a strict YAML loader, dotted command-line overrides, and the
building of a nested dataclass from a dict with its keys, types and ranges checked, each error naming the key and
where it was set (the file, the override or the defaults). The schema itself is `guide_mega/config.py`."""

from __future__ import annotations

import dataclasses
import difflib
import math
import operator
import re
import types
import typing
from dataclasses import field
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A bad configuration value, with the key path and where it came from."""


def ranged(
    default: Any, *, ge: float | None = None, gt: float | None = None, le: float | None = None, lt: float | None = None
) -> Any:
    """A dataclass field whose value must lie in the given bounds (checked when the config is loaded)."""
    return field(default=default, metadata={"ge": ge, "gt": gt, "le": le, "lt": lt})


_FLOAT_TEXT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _finite_float(value: str | int | float, key: str) -> float:
    """float(value), refusing infinity and NaN: no limit, timeout or rate means anything there."""
    try:
        number = float(value)
    except OverflowError:
        raise ConfigError(f"{key}: expected a finite number, got an integer too large for a float") from None
    if not math.isfinite(number):
        raise ConfigError(f"{key}: expected a finite number, got {number}")
    return number


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check `value` against the type `hint` and convert lossless cases (int -> float, '1e-6' -> float)."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise ConfigError(f"{key}: must be one of {list(typing.get_args(hint))}, got {value!r}")
        return value
    if origin in (types.UnionType, typing.Union):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        (inner,) = [arg for arg in args if arg is not type(None)]
        return _coerce(value, inner, key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        (item,) = typing.get_args(hint)
        return [_coerce(element, item, f"{key}[{index}]") for index, element in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if hint is float:
        # PyYAML reads '1e-6' (no dot) as a string, so numeric text is accepted for float fields.
        if isinstance(value, str) and _FLOAT_TEXT.match(value.strip()):
            return _finite_float(value, key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return _finite_float(value, key)
    elif hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif hint in (bool, str) and isinstance(value, hint):
        return value
    raise ConfigError(f"{key}: expected {getattr(hint, '__name__', hint)}, got {type(value).__name__} {value!r}")


_BOUNDS = {"ge": (operator.ge, ">="), "gt": (operator.gt, ">"), "le": (operator.le, "<="), "lt": (operator.lt, "<")}


def _check_range(value: Any, metadata: typing.Mapping, key: str) -> None:
    for name, (holds, symbol) in _BOUNDS.items():
        bound = metadata.get(name)
        if value is not None and bound is not None and not holds(value, bound):
            raise ConfigError(f"{key}: must be {symbol} {bound}, got {value!r}")


def _key_paths(cls: type, prefix: str = "") -> list[str]:
    """Every key path of dataclass `cls`, sections and leaves."""
    hints = typing.get_type_hints(cls)
    paths = []
    for item in dataclasses.fields(cls):
        paths.append(f"{prefix}{item.name}")
        if dataclasses.is_dataclass(hints[item.name]):
            paths += _key_paths(hints[item.name], f"{prefix}{item.name}.")
    return paths


def _suggestion(name: str, cls: type, prefix: str, root: type) -> str:
    """' (did you mean 'x'?)' for unknown key `name`: the closest key of its section, else of the whole config
    (dataclass `root`)."""
    close = difflib.get_close_matches(name, [item.name for item in dataclasses.fields(cls)], n=1)
    if close:
        return f" (did you mean {prefix + close[0]!r}?)"
    by_name = {path.rpartition(".")[2]: path for path in reversed(_key_paths(root))}
    close = difflib.get_close_matches(name, list(by_name), n=1)
    return f" (did you mean {by_name[close[0]]!r}?)" if close else ""


def _origin_of_key(key: str, origins: dict[str, str]) -> str:
    """Where `key` was set: itself, its section, or a key below it (a value overridden as if it were a section)."""
    candidates = [key, key.rpartition(".")[0], *(name for name in origins if name.startswith(f"{key}."))]
    return next((origins[name] for name in candidates if name in origins), "defaults")


def origin_of_message(message: str, origins: dict[str, str], default: str) -> str:
    """Where the keys that a cross-check message names were set, a command-line override first (it is the change
    the user just made)."""
    named = [origins[key] for key in re.findall(r"[a-z0-9_]+(?:\.[a-z0-9_]+)+", message) if key in origins]
    overrides = [where for where in named if where.startswith("command-line override")]
    return (overrides or named or [default])[0]


def build_dataclass(
    cls: type, values: dict[str, Any], prefix: str, *, origins: dict[str, str], renamed: dict[str, str], root: type
) -> Any:
    """Instantiate dataclass `cls` (the section `prefix` of dataclass `root`) from a nested dict, checking keys
    (unknown ones with a suggestion, `renamed` old keys naming the new one), types and ranges; errors name where
    the key was set (`origins`: key path -> file or override)."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(values).__name__} {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}{name}"
        try:
            if key in renamed:
                raise ConfigError(f"{key}: renamed to {renamed[key]}")
            if name not in fields:
                raise ConfigError(f"{key}: unknown key{_suggestion(name, cls, prefix, root)}")
            if dataclasses.is_dataclass(hints[name]):
                kwargs[name] = build_dataclass(
                    hints[name], value, f"{key}.", origins=origins, renamed=renamed, root=root
                )
                continue
            kwargs[name] = _coerce(value, hints[name], key)
            _check_range(kwargs[name], fields[name].metadata, key)
        except ConfigError as exc:
            if str(exc).startswith("config error in"):
                raise
            raise ConfigError(f"config error in {_origin_of_key(key, origins)}: {exc}") from None
    return cls(**kwargs)


class _YamlRefusal(yaml.YAMLError):
    """YAML that parses but that a config refuses, at a line."""

    def __init__(self, mark: yaml.Mark, reason: str) -> None:
        super().__init__(reason)
        self.line, self.reason = mark.line + 1, reason


class _StrictYamlLoader(yaml.SafeLoader):
    """YAML as a config needs it: no aliases (so no alias bomb), string keys only (`1:`, `null:`, and `on:` or `yes:`,
    which YAML 1.1 reads as booleans, are refused) and no key given twice (YAML would keep the last one silently)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise _YamlRefusal(self.peek_event().start_mark, "aliases (*name) are not supported in configs")
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        first_lines: dict[str, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, str):
                reason = f"key {key_node.value!r} is read as {type(key).__name__} {key!r}, not a string; quote it"
                raise _YamlRefusal(key_node.start_mark, reason)
            if key in first_lines:
                reason = f"key {key!r} is given twice (first at line {first_lines[key]})"
                raise _YamlRefusal(key_node.start_mark, reason)
            first_lines[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def load_yaml(text: str, where: str) -> Any:
    """`text` parsed by _StrictYamlLoader; any problem is one ConfigError line naming `where` (and the line)."""
    try:
        return yaml.load(text, Loader=_StrictYamlLoader)
    except _YamlRefusal as exc:
        raise ConfigError(f"config error in {where}, line {exc.line}: {exc.reason}") from None
    except RecursionError:
        raise ConfigError(f"config error in {where}: nested too deeply") from None
    except (yaml.YAMLError, ValueError) as exc:  # ValueError: an integer past Python's digit limit
        raise ConfigError(f"config error in {where}: invalid YAML: {' '.join(str(exc).split())}") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """'algorithm.guide.threshold=0.125' -> (['algorithm', 'guide', 'threshold'], 0.125); values parse as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip() or any(not part for part in key.strip().split(".")):
        raise ConfigError(f"config error in command-line override {text!r}: expected section.key=value")
    return key.strip().split("."), load_yaml(raw, f"command-line override {text!r}") if raw.strip() else ""


def merge_override(target: dict, path: list[str], value: Any) -> None:
    for part in path[:-1]:
        node = target.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config error in command-line override: {'.'.join(path)}: {part} is not a section")
        target = node
    target[path[-1]] = value


def record_origins(values: Any, prefix: str, where: str, origins: dict[str, str]) -> None:
    if isinstance(values, dict):
        for name, value in values.items():
            key = f"{prefix}{name}"
            origins[key] = where
            record_origins(value, f"{key}.", where, origins)
