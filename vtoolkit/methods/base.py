"""Base class of methods: a small object that installs hooks through a HookSet and keeps per-call state."""
from __future__ import annotations

from typing import Any, ClassVar

from vtoolkit.config import MethodConfig


class Method:
    """A method instance bound to one model (through its adapter).

    Subclasses implement :meth:`install` (register hooks on ``hooks``; they are removed by the handle, also when
    ``install`` fails half-way) and :meth:`on_prefill` (reset per-call state). ``stats`` reports what the method decided
    in the last call.
    """

    spec: ClassVar[Any]
    # What the call context refuses on the method's behalf (see vtoolkit/hooks/context.py); opt in where handled.
    supports_video: ClassVar[bool] = False          # video input (Qwen-VL) is refused with a clear error
    supports_continuation: ClassVar[bool] = False   # a forward continuing from a cache this call did not build
    rewrites_sequence: ClassVar[bool] = False       # changes the rows the LLM sees (labels= are realigned)

    def __init__(self, config: MethodConfig, adapter) -> None:
        self.config = config
        self.adapter = adapter
        self._stats: dict[str, Any] = {}

    @property
    def name(self) -> str:
        return self.spec.name

    def check(self) -> None:
        """Raise a clear error if this model cannot run this configuration (called before installing; ``vtoolkit
        eval`` also calls it right after loading the model, before the first batch, and exits 2 on a ValueError or
        NotImplementedError). The base checks the config's model bounds (:meth:`MethodConfig.check_model`);
        subclasses that override it call ``super().check()`` first."""
        self.config.check_model(self.adapter)

    def install(self, hooks, ctx) -> None:
        raise NotImplementedError

    def on_prefill(self, ctx) -> None:
        self._stats = {}

    @property
    def stats(self) -> dict[str, Any]:
        return dict(self._stats)
