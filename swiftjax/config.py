"""YAML experiment configs with ``key=value`` overrides (dotted keys, YAML-typed values).

One YAML file per experiment; any key can be overridden on the command line:
``swiftjax world train configs/world.yaml model.num_layers=6 train.lr=3e-3``.
A config may name a ``base: other.yaml`` (relative to itself) that it extends.
"""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any, Mapping, Sequence

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
        raise ValueError(f"config: expected a YAML file, {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"config {path}: expected a mapping at top level, got {type(data).__name__}")
    base = data.pop("base", None)
    if base:
        data = _merge(load_yaml(path.parent / base), data)
    return data


def apply_overrides(cfg: dict, overrides: Sequence[str]) -> dict:
    """Apply ``a.b.c=value`` overrides. Unknown keys are an error (a typo must not pass
    silently) unless the key is prefixed with ``+``, which adds it."""
    cfg = copy.deepcopy(cfg)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        add = key.startswith("+")
        parts = key.lstrip("+").split(".")
        node = cfg
        for p in parts[:-1]:
            if p not in node:
                if not add:
                    raise ValueError(f"override {item!r}: unknown key {key!r} (prefix with + to add)")
                node[p] = {}
            node = node[p]
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {p!r} is not a section")
        if parts[-1] not in node and not add:
            raise ValueError(
                f"override {item!r}: unknown key {key!r}; known here: {sorted(node)} (prefix with + to add)"
            )
        node[parts[-1]] = parse_value(raw)
    return cfg


def parse_value(raw: str):
    """YAML-typed value; numbers YAML 1.1 reads as strings (``1e-3``) become floats."""
    v = yaml.safe_load(raw)
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return v
    return v


def load_config(path: str | Path | None, overrides: Sequence[str] = (), defaults: Mapping | None = None) -> dict:
    cfg = dict(copy.deepcopy(defaults or {}))
    if path is not None:
        cfg = _merge(cfg, load_yaml(path))
    return apply_overrides(cfg, overrides)


def config_from_argv(argv: Sequence[str] | None, defaults: Mapping | None = None) -> dict:
    """The command-line form every swiftjax command takes: ``[CONFIG.yaml] [key=value ...]``.
    The first argument is a config file when it has no ``=``; the rest are overrides."""
    argv = list(argv or [])
    path = argv[0] if argv and "=" not in argv[0] else None
    return load_config(path, argv[1:] if path is not None else argv, defaults=defaults)


def to_dataclass(cls, d: Mapping[str, Any] | None, where: str = ""):
    """Build dataclass ``cls`` from a mapping; unknown keys raise ValueError naming them.
    Lists become tuples (dataclasses used as static jit args must be hashable)."""
    d = dict(d or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"config {where or cls.__name__}: unknown keys {unknown}; expected some of {sorted(known)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
