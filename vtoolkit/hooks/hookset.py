"""A set of hooks owned by one handle: registered together, switched off together, removed exactly once.

Every hook a method registers goes through a :class:`HookSet`, which wraps it so that ``active = False`` makes it a
no-op (``handle.disabled()``), and which records a restorer for every non-hook change (an attention implementation
switched, an attribute set) so that ``remove()`` undoes all of it in reverse order. It never touches hooks it did not
register. Attribute patches (:meth:`HookSet.patch`) of several handles on one object stack and unstack in any order.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import torch


class HookSet:
    def __init__(self) -> None:
        self._handles: list = []
        self._restorers: list[Callable[[], None]] = []
        self.active = True
        self.removed = False

    # -- registration -------------------------------------------------------------------------------------------
    def forward_pre(self, module: torch.nn.Module, fn: Callable, *, with_kwargs: bool = True, prepend: bool = False):
        """``fn(module, args, kwargs) -> None | (args, kwargs)``; skipped while the set is inactive."""
        self._check_open()

        def hook(mod, args, kwargs=None):
            if not self.active:
                return None
            return fn(mod, args, kwargs) if with_kwargs else fn(mod, args)

        if with_kwargs:
            h = module.register_forward_pre_hook(hook, with_kwargs=True, prepend=prepend)
        else:
            h = module.register_forward_pre_hook(lambda m, a: hook(m, a), prepend=prepend)
        self._handles.append(h)
        return h

    def forward(self, module: torch.nn.Module, fn: Callable, *, with_kwargs: bool = False, prepend: bool = False):
        """``fn(module, args, output)`` (or ``fn(module, args, kwargs, output)``); skipped while inactive."""
        self._check_open()
        if with_kwargs:
            def hook(mod, args, kwargs, output):
                return fn(mod, args, kwargs, output) if self.active else None

            h = module.register_forward_hook(hook, with_kwargs=True, prepend=prepend)
        else:
            def hook(mod, args, output):
                return fn(mod, args, output) if self.active else None

            h = module.register_forward_hook(hook, prepend=prepend)
        self._handles.append(h)
        return h

    def on_remove(self, restorer: Callable[[], None]) -> None:
        """Run ``restorer`` at :meth:`remove` (reverse registration order)."""
        self._check_open()
        self._restorers.append(restorer)

    def patch(self, obj, name: str, wrapper: Callable) -> None:
        """Wrap the callable attribute ``obj.name`` (e.g. a module's ``forward``, a model's ``get_image_features``)
        with ``wrapper(inner, *args, **kwargs)``, on the instance only, while this set is active.

        Patches of several handles on the same attribute stack in one chain (first applied = innermost): each is
        skipped while its handle is disabled, and removing any of them, in any order, leaves the others working;
        when the last one is removed the instance attribute is deleted (or the one that was there is restored).
        The installed function keeps the original's signature (``generate`` inspects it).
        """
        self._check_open()
        chain = _PatchChain.get(obj, name)
        entry = (self, wrapper)
        chain.entries.append(entry)
        self.on_remove(lambda: chain.drop(entry))

    # -- teardown -----------------------------------------------------------------------------------------------
    def remove(self) -> None:
        """Remove every hook and undo every change; idempotent."""
        if self.removed:
            return
        self.removed = True
        errors = []
        for h in reversed(self._handles):
            h.remove()
        for r in reversed(self._restorers):
            try:
                r()
            except Exception as e:  # keep undoing the rest, then report
                errors.append(e)
        self._handles.clear()
        self._restorers.clear()
        if errors:
            raise RuntimeError(f"vtoolkit: {len(errors)} restorer(s) failed while removing hooks: {errors!r}")

    def __len__(self) -> int:
        return len(self._handles)

    def _check_open(self):
        if self.removed:
            raise RuntimeError("this hook set was removed; apply the method again to get a new handle")


class _PatchChain:
    """The stack of :meth:`HookSet.patch` wrappers on one attribute of one object."""

    def __init__(self, obj, name: str):
        self.obj, self.name = obj, name
        self.missing = name not in vars(obj)
        self.saved = vars(obj).get(name)
        self.original = getattr(obj, name)          # bound method / function seen before any patch
        self.entries: list[tuple[HookSet, Callable]] = []
        chain = self

        @functools.wraps(self.original)
        def patched(*args, **kwargs):
            return chain.call(len(chain.entries), *args, **kwargs)

        patched.__vtoolkit_chain__ = self
        setattr(obj, name, patched)

    @classmethod
    def get(cls, obj, name: str) -> _PatchChain:
        current = vars(obj).get(name)
        chain = getattr(current, "__vtoolkit_chain__", None)
        if chain is not None:
            return chain
        return cls(obj, name)

    def call(self, depth: int, *args, **kwargs):
        """Run the wrappers ``entries[:depth]`` (outermost last) around the original."""
        for i in range(depth - 1, -1, -1):
            hooks, wrapper = self.entries[i]
            if hooks.active:
                return wrapper(functools.partial(self.call, i), *args, **kwargs)
        return self.original(*args, **kwargs)

    def drop(self, entry) -> None:
        if entry in self.entries:
            self.entries.remove(entry)
        if not self.entries:
            if self.missing:
                vars(self.obj).pop(self.name, None)
            else:
                setattr(self.obj, self.name, self.saved)


def count_hooks(model: torch.nn.Module) -> int:
    """Number of forward / pre-forward / backward hooks on every submodule of ``model`` (leak checks). Hooks that
    transformers installs lazily on a model's first call (output capturing) are not counted."""
    n = 0
    for m in model.modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
            for fn in (getattr(m, attr, None) or {}).values():
                n += not getattr(fn, "__module__", "").startswith("transformers.")
    return n
