"""``apply_method`` and the :class:`MethodHandle` lifecycle.

The handle changes the model in place through hooks it owns; nothing is patched at class or module level, so two
models in one process can carry different methods. ``remove()`` (also on leaving ``with``, and when applying fails
half-way) takes every hook and every change back, after which the model computes bit-exactly as before.
"""
from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterable
from typing import Any

import torch

from vtoolkit.compat import check_transformers_version
from vtoolkit.config import MethodConfig
from vtoolkit.hooks.context import CallContext
from vtoolkit.hooks.hookset import HookSet
from vtoolkit.models.base import get_adapter
from vtoolkit.registry import MethodSpec, get_method, spec_for_config

MethodLike = str | MethodConfig | tuple

# unwrapped model -> handles currently applied to it
_ACTIVE: weakref.WeakKeyDictionary[torch.nn.Module, list[MethodHandle]] = weakref.WeakKeyDictionary()


def _resolve(item: MethodLike, overrides: dict[str, Any]) -> tuple[MethodSpec, MethodConfig]:
    if isinstance(item, tuple):
        name, opts = item
        return _resolve(name, {**(opts or {}), **overrides})
    if isinstance(item, MethodConfig):
        spec = spec_for_config(item)
        return spec, item.replace(**overrides) if overrides else item
    if isinstance(item, str):
        spec = get_method(item)
        spec.config_cls.check_keys(overrides)
        return spec, spec.config_cls(**overrides)
    raise TypeError(f"a method is a name, a config object or a (name, options) pair; got {type(item).__name__}")


def _supports(spec: MethodSpec, adapter) -> bool:
    archs = spec.architectures
    return "*" in archs or adapter.config.model_type in archs or adapter.family in archs


def _check_compatible(specs: list[MethodSpec], existing: list[MethodSpec]) -> None:
    pruners = [s.name for s in existing + specs if s.kind == "prune"]
    if len(pruners) > 1:
        raise ValueError(f"methods {pruners[0]!r} and {pruners[1]!r} both prune visual tokens and cannot be composed: "
                         f"the second would rank tokens in a sequence the first already rewrote")
    by_stage = {s.stage: s.name for s in existing + specs}
    inside = by_stage.get("llm") or by_stage.get("llm_attention")
    if "decode" in by_stage and inside:
        raise ValueError(f"methods {by_stage['decode']!r} and {inside!r} cannot be composed: "
                         f"{by_stage['decode']!r} runs its contrast rows through every decoder layer as extra batch "
                         f"rows, and {inside!r} changes what those layers compute per row (heads, attention, "
                         f"or a mid-stack token removal sized for the prompt's rows). Compose contrastive decoding "
                         f"with a pre-LLM pruner (fastervlm, random) only")
    seen: dict[str, str] = {}
    for s in existing + specs:
        if s.stage == "none":
            continue
        if s.stage in seen:
            raise ValueError(f"methods {seen[s.stage]!r} and {s.name!r} both act at stage {s.stage!r} and cannot be "
                             f"composed; apply one of them, or remove the other handle first")
        seen[s.stage] = s.name


class MethodHandle:
    """What :func:`apply_method` returns: owns the hooks of one or more methods on one model."""

    def __init__(self, model: torch.nn.Module, methods: list, hooks: HookSet, ctx: CallContext):
        self.model = model
        self.methods = methods
        self._hooks = hooks
        self._ctx = ctx
        self._inner = ctx.adapter.model

    # -- introspection ------------------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return [m.name for m in self.methods]

    @property
    def config(self):
        return self.methods[0].config if len(self.methods) == 1 else [m.config for m in self.methods]

    @property
    def stats(self) -> dict[str, Any]:
        """What the method(s) decided in the last call; for a composition, ``{name: stats}``."""
        if len(self.methods) == 1:
            return self.methods[0].stats
        return {m.name: m.stats for m in self.methods}

    @property
    def active(self) -> bool:
        return not self._hooks.removed

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"MethodHandle({'+'.join(self.names)}, {state}, hooks={len(self._hooks)})"

    # -- lifecycle ----------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def disabled(self):
        """Temporarily run the untouched model (hooks stay registered but do nothing)."""
        if self._hooks.removed:
            raise RuntimeError("this handle was removed")
        prev = self._hooks.active
        self._hooks.active = False
        try:
            yield self
        finally:
            self._hooks.active = prev

    def remove(self) -> None:
        """Remove every hook and change; idempotent. Afterwards the model is bit-exact as before."""
        if self._hooks.removed:
            return
        try:
            self._hooks.remove()
        finally:
            lst = _ACTIVE.get(self._inner)
            if lst is not None and self in lst:
                lst.remove(self)
                if not lst:
                    del _ACTIVE[self._inner]

    def __enter__(self) -> MethodHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def apply_method(model: torch.nn.Module, method: MethodLike | Iterable[MethodLike], **overrides: Any) -> MethodHandle:
    """Apply one method (or several, composed) to ``model`` in place; returns a :class:`MethodHandle`.

    ``method`` is a registered name (``"fastervlm"``), a config object (``FasterVLMConfig(keep_ratio=0.1)``), a
    ``(name, options)`` pair, or a list of those for composition. ``overrides`` set config fields of a single method.

    >>> h = apply_method(model, "none")
    >>> out = model.generate(**inputs)
    >>> h.remove()
    """
    check_transformers_version(stacklevel=3)
    items = list(method) if isinstance(method, (list,)) else [method]
    if not items:
        raise ValueError("no method given")
    if len(items) > 1 and overrides:
        raise ValueError("keyword overrides are ambiguous with several methods; pass (name, options) pairs")
    resolved = [_resolve(it, overrides) for it in items]
    specs = [s for s, _ in resolved]

    adapter = get_adapter(model)
    existing = _ACTIVE.get(adapter.model, [])
    active_names = {m.name for h in existing for m in h.methods}
    for s in specs:
        if s.name in active_names:
            raise RuntimeError(f"{s.name!r} is already applied to this model; call .remove() on its handle first "
                               f"(or use handle.disabled() for a temporary baseline)")
        if not _supports(s, adapter):
            raise NotImplementedError(f"{s.name!r} does not support {adapter.config.model_type!r} models; it supports: "
                                      f"{', '.join(s.architectures)}")
    if len(set(s.name for s in specs)) != len(specs):
        raise ValueError("the same method appears twice in one composition")
    _check_compatible(specs, [m.spec for h in existing for m in h.methods])

    hooks = HookSet()
    ctx = CallContext(adapter)
    methods = [spec.cls(cfg, adapter) for spec, cfg in resolved]
    try:
        for m in methods:
            m.check()
        ctx.install(hooks)
        for m in methods:
            m.install(hooks, ctx)
    except BaseException:
        hooks.remove()
        raise
    handle = MethodHandle(model, methods, hooks, ctx)
    _ACTIVE.setdefault(adapter.model, []).append(handle)
    return handle


def active_handles(model: torch.nn.Module) -> list[MethodHandle]:
    """Handles currently applied to ``model``."""
    return list(_ACTIVE.get(get_adapter(model).model, []))
