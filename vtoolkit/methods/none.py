"""The identity method: installs the shared per-call machinery and changes nothing.

It exercises the full lifecycle (apply, per-prefill reset, disable, remove) and is the baseline row of every sweep.
"""
from __future__ import annotations

from dataclasses import dataclass

from vtoolkit.config import MethodConfig
from vtoolkit.methods.base import Method
from vtoolkit.registry import register_method


@dataclass(frozen=True)
class NoneConfig(MethodConfig):
    """No options."""


@register_method("none", config=NoneConfig, kind="identity", stage="none", architectures=("*",),
                 aliases=("identity", "baseline"), description="Identity: the stock model (lifecycle check, baseline)")
class NoneMethod(Method):
    supports_video = True
    supports_continuation = True

    def install(self, hooks, ctx) -> None:
        ctx.listeners.append(self)

    def on_prefill(self, ctx) -> None:
        spans = ctx.spans if ctx.inputs.get("input_ids") is not None else []
        n = [sum(s.num_tokens for s in ss) for ss in spans]
        self._stats = {"visual_tokens_before": n, "visual_tokens_after": list(n)}
