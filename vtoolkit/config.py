"""Frozen dataclass configs for methods, with validation, ``replace`` with did-you-mean, YAML presets and
``key=value`` overrides.

Every method config subclasses :class:`MethodConfig`; defaults are the paper's / official code's. Building a config
first checks every field's value against the field's type annotation (``int``, ``float``, ``bool``, ``str``, ``None``,
``Literal[...]`` and unions of them; ``bool`` is not an ``int`` here, an ``int`` is fine for a ``float`` and stored as
one), raising :class:`ConfigTypeError`; then ``validate`` raises ``ValueError`` naming the field and the fix.

:class:`ConfigError` is the error of a setting the user gave (a value, a file, a name): the command line prints its
message as one ``error:`` line per problem and exits with status 2.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import numbers
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A setting the user gave is wrong or missing; the message names the setting and the fix, one line per problem.

    ``problems`` is a message or a list of them (all the problems found at once, e.g. every bad entry of a sweep)."""

    def __init__(self, problems: str | list[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class ConfigTypeError(ConfigError, TypeError):
    """A value of the wrong type for a config field (``keep_ratio="0.1"``, ``keep_ratio=True``)."""


def _accepts(tp: Any, value: Any) -> bool | None:
    """Whether ``value`` fits the annotation ``tp``; None when the annotation is not one this module checks."""
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        verdicts = [_accepts(a, value) for a in typing.get_args(tp)]
        if True in verdicts:
            return True
        return None if None in verdicts else False
    if origin is typing.Literal:
        return any(value == v and type(value) is type(v) for v in typing.get_args(tp))
    if tp is type(None) or tp is None:
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if tp is Any:
        return True
    return None


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(v) for v in typing.get_args(tp))
    names = {bool: "a bool (true/false)", int: "an integer", float: "a number", str: "a string", type(None): "None"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _members(tp: Any) -> set:
    """The plain types a (union) annotation names: ``float | None`` -> {float, NoneType}."""
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        return set().union(*(_members(a) for a in typing.get_args(tp)))
    return {tp}


def _coerce(tp: Any, value: Any) -> Any:
    """An accepted number in its canonical type: a whole number given for a float field becomes a float, a numpy
    integer for an int field an int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return value
    members = _members(tp)
    if int in members and isinstance(value, numbers.Integral):
        return int(value)
    if float in members:
        return float(value)
    return value


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    """Resolved annotations of the dataclass fields of ``cls`` (fields whose annotation cannot be resolved are left
    out, i.e. not checked)."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - an annotation naming a type-checking-only import: check nothing rather than fail
        return {}
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.name in hints}


def check_field_types(cls: type, values: Mapping[str, Any], owner: str | None = None) -> dict[str, Any]:
    """Check ``values`` (field name -> value) against the field annotations of the dataclass ``cls``.

    Returns the values in canonical form (see :func:`_coerce`); raises :class:`ConfigTypeError` listing every value
    of the wrong type, naming the option and the type it needs. Fields with annotations this module does not check
    (lists, dicts, classes) pass unchanged."""
    owner = owner or cls.__name__
    types_ = _field_types(cls)
    out, problems = dict(values), []
    for name, value in values.items():
        tp = types_.get(name)
        if tp is None:
            continue
        if _accepts(tp, value) is False:
            problems.append(f"{owner} option {name!r} must be {_describe(tp)}, got {type(value).__name__} {value!r}")
        else:
            out[name] = _coerce(tp, value)
    if problems:
        raise ConfigTypeError(problems)
    return out


@dataclasses.dataclass(frozen=True)
class MethodConfig:
    """Base class of method configs. Subclasses are frozen dataclasses; override :meth:`validate`."""

    def __post_init__(self) -> None:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name, value in check_field_types(type(self), values).items():
            if value is not values[name]:
                object.__setattr__(self, name, value)
        self.validate()

    def validate(self) -> None:  # pragma: no cover - default: nothing to check
        return None

    def check_model(self, adapter, spans=None) -> None:
        """Raise ValueError when this config cannot run on the model of ``adapter`` (a
        :class:`vtoolkit.models.base.ModelAdapter`): the bounds only the loaded model knows (a layer index below its
        layer count, a token budget within its visual tokens). ``spans``: the :class:`~vtoolkit.models.base.ImageSpan`
        lists of a batch the model will see (``adapter.image_spans(inputs)``), when known; None checks the model
        only. Runs in :meth:`vtoolkit.methods.base.Method.check` (so in ``apply_method``) and in ``vtoolkit eval``
        right after loading, before the first batch (exit 2). Default: nothing to check."""
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
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text   # not YAML (e.g. "a: [b"): the literal text, which the option's type check then judges


def parse_overrides(items) -> dict[str, Any]:
    """``["keep_ratio=0.1", "method.seed=3"]`` -> ``{"keep_ratio": 0.1, "method": {"seed": 3}}``."""
    out: dict[str, Any] = {}
    for item in items or ():
        if "=" not in item:
            raise ConfigError(f"{item!r} must look like key=value (e.g. keep_ratio=0.1)")
        key, value = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"{item!r} has an empty key (write key=value, e.g. keep_ratio=0.1)")
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{item!r} conflicts with an earlier setting of {p!r}")
        node[parts[-1]] = parse_value(value)
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Load a YAML file with ``yaml.safe_load`` (no arbitrary objects); the top level must be a mapping.

    A missing file, invalid YAML or another top level raise :class:`ConfigError` naming the file (and the line)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such file" if not p.exists() else f"{p}: not a file")
    try:
        with open(p, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{p}: not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not a UTF-8 text file ({e.reason})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping (key: value lines), got {type(data).__name__}")
    return data


def load_method_preset(path: str | Path, overrides=()) -> tuple[str, dict[str, Any]]:
    """A method preset file ``{method: NAME, <options>...}`` plus ``key=value`` overrides -> (name, options)."""
    data = dict(load_yaml(path))
    if "method" not in data:
        raise ConfigError(f"{path}: a method preset needs a 'method: <name>' key")
    name = data.pop("method")
    data.update(parse_overrides(overrides))
    return name, data
