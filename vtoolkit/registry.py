"""Method and model-adapter registries.

Methods register with ``@register_method(name, config=..., kind=...)``; model adapters with
``@register_adapter(*model_types)`` keyed by the HF ``config.model_type``. Unknown names raise with a did-you-mean.
Method modules are imported lazily on first lookup so ``import vtoolkit`` stays light.
"""
from __future__ import annotations

import difflib
import fnmatch
import importlib
from dataclasses import dataclass, field
from typing import Any

KINDS = ("identity", "prune", "mitigate")
# Where a method acts. Two methods may compose when their stages differ, or when both declare `composable`.
# "llm": changes which tokens the LLM layers run on (mid-stack pruning); "llm_attention": changes the attention
# probabilities of LLM layers in place (the sequence is untouched), so it composes with pruners at either stage.
STAGES = ("none", "vision", "pre_llm", "llm", "llm_attention", "decode")

# Modules that define the built-in methods; imported on first registry access.
_BUILTIN_METHOD_MODULES = (
    "vtoolkit.methods.none",
    "vtoolkit.methods.fastervlm",
    "vtoolkit.methods.fastv",
    "vtoolkit.methods.dart",
    "vtoolkit.methods.random_prune",
    "vtoolkit.methods.dyvte",
    "vtoolkit.methods.vhr",
    "vtoolkit.methods.damro",
    "vtoolkit.methods.vcd",
    "vtoolkit.methods.var",
)


@dataclass(frozen=True)
class MethodSpec:
    """Everything the registry knows about a method, checked before any hook is installed."""

    name: str
    cls: type
    config_cls: type
    kind: str
    stage: str
    architectures: tuple[str, ...]
    requires: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    description: str = ""
    extras: dict[str, Any] = field(default_factory=dict)

    def as_row(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "stage": self.stage, "architectures": list(self.architectures),
                "requires": list(self.requires), "aliases": list(self.aliases), "description": self.description,
                "config": self.config_cls.__name__}


_METHODS: dict[str, MethodSpec] = {}
_ALIASES: dict[str, str] = {}
_ADAPTERS: dict[str, type] = {}
_loaded = False


def _normalise(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def register_method(name: str, *, config: type, kind: str, stage: str, architectures: tuple[str, ...],
                    requires: tuple[str, ...] = (), aliases: tuple[str, ...] = (), description: str = ""):
    """Class decorator adding a method to the registry."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")

    def deco(cls):
        key = _normalise(name)
        existing = _METHODS.get(key)
        if existing is not None and existing.cls is not cls:
            raise ValueError(f"method {key!r} is already registered by {existing.cls.__module__}.{existing.cls.__name__}")
        doc = description or (cls.__doc__ or "").strip().splitlines()[0] if (description or cls.__doc__) else ""
        spec = MethodSpec(key, cls, config, kind, stage, tuple(architectures), tuple(requires),
                          tuple(_normalise(a) for a in aliases), doc)
        _METHODS[key] = spec
        for a in spec.aliases:
            _ALIASES[a] = key
        cls.spec = spec
        return cls

    return deco


def _ensure_loaded() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in _BUILTIN_METHOD_MODULES:
        importlib.import_module(mod)
    try:  # third-party methods
        from importlib.metadata import entry_points

        for ep in entry_points(group="vtoolkit.methods"):
            ep.load()
    except Exception:  # pragma: no cover - a broken plugin must not break the library
        pass


def _did_you_mean(name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" Did you mean {close[0]!r}?" if close else ""


def get_method(name: str) -> MethodSpec:
    """Look a method up by name or alias; unknown names raise ``KeyError`` with the closest name."""
    _ensure_loaded()
    if not isinstance(name, str):
        raise TypeError(f"method name must be a string, got {type(name).__name__}")
    key = _normalise(name)
    key = _ALIASES.get(key, key)
    if key not in _METHODS:
        names = sorted(set(_METHODS) | set(_ALIASES))
        raise KeyError(f"Unknown method {name!r}.{_did_you_mean(key, names)} "
                       f"Available: {', '.join(sorted(_METHODS))}.")
    return _METHODS[key]


def spec_for_config(cfg) -> MethodSpec:
    """The registered method whose config class is exactly ``type(cfg)``."""
    _ensure_loaded()
    for spec in _METHODS.values():
        if type(cfg) is spec.config_cls:
            return spec
    raise TypeError(f"{type(cfg).__name__} is not the config of a registered method")


def list_methods(pattern: str = "*") -> list[dict[str, Any]]:
    """Registered methods matching a glob: name, kind, stage, architectures, requirements, description."""
    _ensure_loaded()
    rows = [s.as_row() for k, s in sorted(_METHODS.items())]
    return [r for r in rows if fnmatch.fnmatch(r["name"], pattern) or fnmatch.fnmatch(r["kind"], pattern.strip("*"))]


def register_adapter(*model_types: str):
    """Class decorator registering a model adapter for HF ``config.model_type`` values."""

    def deco(cls):
        for t in model_types:
            _ADAPTERS[t] = cls
        cls.model_types = tuple(model_types)
        return cls

    return deco


def adapter_class_for(model_type: str) -> type:
    import vtoolkit.models  # noqa: F401  (registers the built-in adapters)

    if model_type not in _ADAPTERS:
        raise NotImplementedError(
            f"vtoolkit has no adapter for model_type {model_type!r}.{_did_you_mean(model_type, _ADAPTERS)} "
            f"Supported: {', '.join(sorted(_ADAPTERS))}. Write one with @vtoolkit.registry.register_adapter.")
    return _ADAPTERS[model_type]


def supported_model_types() -> list[str]:
    import vtoolkit.models  # noqa: F401

    return sorted(_ADAPTERS)
