"""The shared mechanics: hook sets, per-call context, attention interception, sequence and KV-cache rewriting."""
from vtoolkit.hooks.hookset import HookSet, count_hooks

__all__ = ["HookSet", "count_hooks"]
