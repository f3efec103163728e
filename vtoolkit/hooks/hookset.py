"""A set of hooks owned by one handle: registered together, switched off together, removed exactly once.

Every hook a method registers goes through a :class:`HookSet`, which wraps it so that ``active = False`` makes it a
no-op (``handle.disabled()``), and which records a restorer for every non-hook change (an attention implementation
switched, an attribute set) so that ``remove()`` undoes all of it in reverse order. It never touches hooks it did not
register.
"""
from __future__ import annotations

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

    def set_attr(self, obj, name: str, value) -> None:
        """Set ``obj.name = value`` on the instance; on removal restore the old instance attribute, or delete ours when
        there was none (so class attributes such as bound methods show through again, as before)."""
        missing = object()
        old = vars(obj).get(name, missing) if hasattr(obj, "__dict__") else getattr(obj, name, missing)
        setattr(obj, name, value)

        def restore():
            if old is missing:
                try:
                    delattr(obj, name)
                except AttributeError:
                    pass
            else:
                setattr(obj, name, old)

        self.on_remove(restore)

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


def count_hooks(model: torch.nn.Module) -> int:
    """Number of forward / pre-forward / backward hooks on every submodule of ``model`` (leak checks)."""
    n = 0
    for m in model.modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                     "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs"):
            d = getattr(m, attr, None)
            if d and attr not in ("_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs"):
                n += len(d)
    return n
