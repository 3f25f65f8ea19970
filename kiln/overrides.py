"""Dotted overrides (`model.num_layers=4`) and dict round trips for config dataclasses.

Values are parsed once, as YAML scalars or lists, then checked against the
field's annotation, so `parallel.tp=two` fails here with the field's name
rather than deep inside megatron-core.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Iterable
from typing import Any, Literal, Union

import yaml

from kiln.errors import ConfigError


def apply(cfg: Any, overrides: Iterable[str] | dict[str, Any]) -> Any:
    """Set each `a.b.c=value` (or dict item) on the dataclass tree `cfg`, in place; returns cfg."""
    items = overrides.items() if isinstance(overrides, dict) else map(_split, overrides)
    for path, value in items:
        set_path(cfg, path, value)
    return cfg


def _split(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} has no '=': write it as field.path=value, e.g. parallel.tp=2")
    path, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({exc.problem})") from None
    return path.strip(), value


def get_path(cfg: Any, path: str) -> Any:
    for name in path.split("."):
        if not dataclasses.is_dataclass(cfg) or name not in _hints(type(cfg)):
            raise ConfigError(f"unknown config field {path!r}")
        cfg = getattr(cfg, name)
    return cfg


def set_path(cfg: Any, path: str, value: Any) -> None:
    node, parts = cfg, path.split(".")
    for i, name in enumerate(parts):
        hints = _hints(type(node))
        if name not in hints:
            close = difflib.get_close_matches(name, list(hints), n=1)
            hint = f"; did you mean {'.'.join(parts[:i] + close)}?" if close else ""
            known = ", ".join(hints)
            raise ConfigError(f"unknown config field {path!r}{hint} (fields here: {known})")
        if i == len(parts) - 1:
            setattr(node, name, coerce(value, hints[name], path))
            return
        child = getattr(node, name)
        if child is None:  # an optional section: create it with its defaults
            child = _dataclass_in(hints[name])()
            setattr(node, name, child)
        node = child


def coerce(value: Any, annotation: Any, path: str) -> Any:
    """Return `value` as `annotation` says, or raise ConfigError naming `path`."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path}={value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if isinstance(value, dict):
            return from_dict(annotation, value, path)
        raise ConfigError(f"{path} expects a mapping of {annotation.__name__} fields, got {value!r}")
    if origin in (list, tuple) or annotation in (list, tuple):
        if not isinstance(value, (list, tuple)):
            value = [value]
        return list(value)
    if annotation is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path} expects a mapping, got {value!r}")
        return dict(value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}={value!r} is not a boolean: use true or false")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{path}={value!r} is not an integer")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{path}={value!r} is not a number")
    if annotation is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{path}={value!r} is not a string")
    if annotation is Any:
        return value
    raise ConfigError(f"{path}: kiln cannot set a field of type {annotation!r} from text")


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls: type, data: dict, path: str = "") -> Any:
    """Build dataclass `cls` from a plain dict (a saved kiln.json or YAML config), strictly."""
    obj = cls()
    hints = _hints(cls)
    for key, value in data.items():
        full = f"{path}.{key}" if path else key
        if key not in hints:
            raise ConfigError(f"unknown config field {full!r} (fields here: {', '.join(hints)})")
        setattr(obj, key, coerce(value, hints[key], full))
    return obj


def _hints(cls: type) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in typing.get_type_hints(cls).items() if k in names}


def _dataclass_in(annotation: Any) -> type:
    for arg in (annotation, *typing.get_args(annotation)):
        if dataclasses.is_dataclass(arg):
            return arg
    raise ConfigError(f"{annotation!r} is not a config section")
