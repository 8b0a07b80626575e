"""Typed experiment configs: frozen dataclasses, overridden by a YAML file and ``key=value``.

One YAML file per experiment; any key can be overridden on the command line:
``swiftjax world train configs/world.yaml model.num_layers=6 train.lr=3e-3``.
A config may name a ``base: other.yaml`` (relative to itself) that it extends. The dataclass
field defaults are the only defaults; the merged mapping is validated whole (:func:`build`).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence, Union

import yaml


def _merge(base: dict, over: Mapping) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config: expected a YAML file, {path} does not exist"
                         + (" (it is a directory)" if path.is_dir() else ""))
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ValueError(f"config {path}: expected UTF-8 text ({e.reason} at byte {e.start})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ValueError(f"config {path}:{at}: expected valid YAML ({getattr(e, 'problem', None) or e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"config {path}: expected a mapping at top level, got {type(data).__name__}")
    base = data.pop("base", None)
    if base:
        data = _merge(load_yaml(path.parent / base), data)
    return data


def parse_value(raw: str):
    """YAML-typed value; numbers YAML 1.1 reads as strings (``1e-3``) become floats."""
    v = yaml.safe_load(raw)
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return v
    return v


# ----------------------------------------------------------------------------- typed configs
#
# A command's configuration is a frozen dataclass (nested dataclasses for sections): its field
# defaults are the only defaults. YAML files and ``key=value`` overrides only override them, and
# the whole mapping is checked against the dataclass (unknown keys, types, finite floats,
# choices) before any work starts.


def _type_name(tp) -> str:
    if tp is type(None):
        return "null"
    if isinstance(tp, type):
        return {"int": "an int", "float": "a number", "bool": "true/false", "str": "a string"}.get(
            tp.__name__, tp.__name__)
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (tuple, list):
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return str(tp)


_FAIL = object()


def _coerce(tp, value, where: str):
    """``value`` checked against type ``tp``; returns the converted value or raises."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        errors = []
        for arm in typing.get_args(tp):
            try:
                return _coerce(arm, value, where)
            except ValueError as e:
                errors.append(e)
        raise ValueError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in typing.get_args(tp) and type(value) in {type(a) for a in typing.get_args(tp)}:
            return value
        raise ValueError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin in (tuple, list):
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected {_type_name(tp)}, got {value!r}")
        return tuple(_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is type(None):
        if value is None:
            return None
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, Mapping):
            return build(tp, value, where)
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ValueError(f"{where}: expected a finite number, got {value!r}")
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"{where}: unsupported config type {tp}")
    raise ValueError(f"{where}: expected {_type_name(tp)}, got {value!r}")


def build(cls, data: Mapping | None, where: str = ""):
    """Dataclass ``cls`` from a mapping: unknown keys, wrong types, non-finite numbers and
    values outside a ``Literal`` are errors naming the key (``where`` prefixes it, e.g. the
    config file). Missing keys take the dataclass defaults; ``__post_init__`` checks the rest."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    prefix = f"{where}." if where else ""
    if unknown:
        raise ValueError(f"{prefix}{unknown[0]}: unknown key; expected one of {sorted(fields)}")
    kwargs = {}
    for name, v in data.items():
        default = fields[name].default
        if isinstance(v, Mapping) and dataclasses.is_dataclass(default) and not isinstance(default, type):
            # a section overrides its parent's default instance, not its class defaults
            v = {**{f.name: getattr(default, f.name) for f in dataclasses.fields(default) if f.init}, **v}
        kwargs[name] = _coerce(hints[name], v, f"{prefix}{name}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where or cls.__name__}: {e}") from None


def to_plain(obj):
    """A config dataclass as plain JSON-able data (for cache keys and results.json)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, Mapping):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj


def _set_path(cfg: dict, key: str, value, item: str) -> None:
    parts = key.lstrip("+").split(".")
    node = cfg
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ValueError(f"override {item!r}: {p!r} is not a section")
        node = nxt
    node[parts[-1]] = value


def parse_typed(cls, argv: Sequence[str] | None, command: str = "config"):
    """``[CONFIG.yaml] [key=value ...]`` -> a validated ``cls``. Raises ValueError with one
    line naming the file (or ``override``), the key and what was expected."""
    argv = list(argv or [])
    path = argv[0] if argv and "=" not in argv[0] else None
    data: dict = load_yaml(path) if path is not None else {}
    source = str(path) if path is not None else command
    for item in argv[1:] if path is not None else argv:
        if "=" not in item:
            raise ValueError(f"override {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        if not key.lstrip("+"):
            raise ValueError(f"override {item!r}: expected key=value")
        _set_path(data, key, parse_value(raw), item)
    try:
        return build(cls, data)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


def subcommand(command: str, table: Mapping, argv: Sequence[str]) -> int:
    """Dispatch ``swiftjax COMMAND SUB [args]`` to ``table[SUB](args)``."""
    argv = list(argv or [])
    if not argv or argv[0] not in table:
        got = f", got {argv[0]!r}" if argv else ""
        raise ValueError(f"{command}: expected a subcommand, one of {', '.join(table)}{got}")
    return int(table[argv[0]](argv[1:]) or 0)
