"""Frozen dataclass configs for methods, with validation, ``replace`` with did-you-mean, YAML presets and
``key=value`` overrides.

Every method config subclasses :class:`MethodConfig`; defaults are the paper's / official code's, and ``validate``
raises ``ValueError`` naming the field and the fix.
"""
from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Any

import yaml


@dataclasses.dataclass(frozen=True)
class MethodConfig:
    """Base class of method configs. Subclasses are frozen dataclasses; override :meth:`validate`."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:  # pragma: no cover - default: nothing to check
        return None

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def check_keys(cls, keys) -> None:
        names = cls.field_names()
        for k in keys:
            if k not in names:
                close = difflib.get_close_matches(k, names, n=1, cutoff=0.5)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                valid = ", ".join(names) or "(none)"
                raise TypeError(f"{cls.__name__} has no option {k!r}.{hint} Valid options: {valid}.")

    def replace(self, **overrides: Any) -> MethodConfig:
        """A copy with ``overrides`` applied (validated); unknown keys raise with the closest valid name."""
        self.check_keys(overrides)
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MethodConfig:
        cls.check_keys(d)
        return cls(**d)


def parse_value(text: str) -> Any:
    """Parse a ``--set`` value with YAML scalar rules: ``0.1`` -> float, ``true`` -> bool, ``[1,2]`` -> list."""
    return yaml.safe_load(text)


def parse_overrides(items) -> dict[str, Any]:
    """``["keep_ratio=0.1", "method.seed=3"]`` -> ``{"keep_ratio": 0.1, "method": {"seed": 3}}``."""
    out: dict[str, Any] = {}
    for item in items or ():
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value (e.g. keep_ratio=0.1)")
        key, value = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ValueError(f"override {item!r} has an empty key")
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r} conflicts with an earlier override of {p!r}")
        node[parts[-1]] = parse_value(value)
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Load a YAML preset with ``yaml.safe_load`` (no arbitrary objects); the top level must be a mapping."""
    with open(path, encoding="utf-8") as fh:
        data = yaml.safe_load(fh)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the top level of a preset must be a mapping, got {type(data).__name__}")
    return data


def load_method_preset(path: str | Path, overrides=()) -> tuple[str, dict[str, Any]]:
    """A method preset file ``{method: NAME, <options>...}`` plus ``key=value`` overrides -> (name, options)."""
    data = dict(load_yaml(path))
    if "method" not in data:
        raise ValueError(f"{path}: a method preset needs a 'method: <name>' key")
    name = data.pop("method")
    data.update(parse_overrides(overrides))
    return name, data
