"""Per-call context: detects each new prefill and exposes that call's inputs and visual layout to the methods.

One pre-hook on the top-level model sees every forward that ``generate`` (or the user) makes. A forward whose KV
cache is empty (or absent) is a new prefill: the context records its inputs, drops the previous call's layout and
tells every method (``on_prefill``) to reset its per-call state. Later forwards of the same call are decode steps.
Nothing is carried from one call to the next.

No silent no-op: a method that needs one of its hooks to run in a forward says so with :meth:`CallContext.expect`
(usually from ``on_prefill`` / ``on_step`` when the call has visual input); the hook reports with
:meth:`CallContext.mark`. A post-hook on the top-level model checks, at the end of every forward, that each expected
hook ran, and raises otherwise, naming the method, the hook and the transformers version (a renamed argument, a
bypassed code path or an unsupported input kind would otherwise return unmodified output without a word).
"""
from __future__ import annotations

import functools
import inspect
import weakref
from typing import Any

import torch

from vtoolkit.compat import cache_length, get_cache, support_hint

_CAPTURED = ("input_ids", "attention_mask", "position_ids", "image_sizes", "image_grid_thw", "video_grid_thw",
             "mm_token_type_ids", "pixel_values")


class CallContext:
    def __init__(self, adapter) -> None:
        self.adapter = adapter
        self.listeners: list = []
        self.inputs: dict[str, Any] = {}
        self.step = -1            # 0 at prefill, then 1, 2, ... per decode forward
        self.num_calls = 0
        self._spans = None
        self._arg_names = list(inspect.signature(adapter.model.forward).parameters)
        self.has_visual = False   # this call's prompt holds visual input
        self._expected: dict[str, str] = {}   # key -> "owner: what did not happen", for the current forward
        self._marked: set[str] = set()

    def install(self, hooks) -> None:
        hooks.forward_pre(self.adapter.model, self._pre_forward, with_kwargs=True, prepend=True)
        hooks.forward(self.adapter.model, self._post_forward)
        # ``generate`` runs the vision encoder before the prefill forward and pops pixel_values / image_sizes /
        # image_grid_thw from the forward's kwargs; record them where the encoder is called (an instance-level
        # wrapper, restored on removal; the signature is preserved because generate inspects it).
        core = self.adapter.core
        original = core.get_image_features
        names = list(inspect.signature(original).parameters)

        @functools.wraps(original)
        def get_image_features(*args, **kwargs):
            if hooks.active:
                rec = dict(zip(names, args))
                rec.update(kwargs)
                self._encoder_inputs = {k: rec[k] for k in _CAPTURED if rec.get(k) is not None}
                self.encoder_calls += 1
                out = original(*args, **kwargs)
                self._encoder_output = weakref.ref(out)
                return out
            return original(*args, **kwargs)

        hooks.set_attr(core, "get_image_features", get_image_features)
        self._encoder_inputs: dict[str, Any] = {}
        self._encoder_output = None
        self.encoder_calls = 0   # vision-encoder runs seen; results of the vision stage are tagged with it
        self.features_from_hooked_encoder = True   # False when this call's image features bypassed our encoder hooks

    def _pre_forward(self, module, args, kwargs):
        kw = dict(zip(self._arg_names, args))
        kw.update(kwargs)
        self._expected, self._marked = {}, set()
        if cache_length(get_cache(kw)) == 0:
            self.inputs = {k: kw.get(k) for k in _CAPTURED}
            mm = kw.get("mm_encoder_outputs") or {}
            self.features_from_hooked_encoder = True
            if mm.get("image") is not None:   # features precomputed by this generate's encoder call
                ours = self._encoder_output() if self._encoder_output is not None else None
                self.features_from_hooked_encoder = mm["image"] is ours
                for k, v in self._encoder_inputs.items():   # (kept for every prefill of the call: use_cache=False)
                    if self.inputs.get(k) is None:
                        self.inputs[k] = v
            self.has_visual = self._visual_input(mm)
            self._spans = None
            self.step = 0
            self.num_calls += 1
            for listener in self.listeners:
                listener.on_prefill(self)
        else:
            self.step += 1
            for listener in self.listeners:
                on_step = getattr(listener, "on_step", None)
                if on_step is not None:
                    on_step(self)
        return None

    def _visual_input(self, mm) -> bool:
        ids = self.inputs.get("input_ids")
        if ids is not None and bool((ids == self.adapter.image_token_id).any()):
            return True
        return any(self.inputs.get(k) is not None for k in ("pixel_values", "pixel_values_videos")) or bool(mm)

    # -- no silent no-op ----------------------------------------------------------------------------------------
    def expect(self, key: str, owner: str, what: str) -> None:
        """Require that :meth:`mark` ``(key)`` is called before the current forward ends; ``what`` says what the
        missing hook means (e.g. "the language-model hook did not see this prefill: nothing was pruned")."""
        self._expected[key] = f"{owner}: {what}"

    def mark(self, key: str) -> None:
        """A hook that :meth:`expect` asked for ran in this forward."""
        self._marked.add(key)

    def _post_forward(self, module, args, output):
        missing = [msg for key, msg in self._expected.items() if key not in self._marked]
        self._expected, self._marked = {}, set()
        if missing:
            stage = "prefill" if self.step == 0 else f"decode step {self.step}"
            raise RuntimeError(f"{'; '.join(missing)} (in the {stage} of this call). The method did not run as "
                               f"designed, so the output is not the method's: {support_hint()}")
        return None

    @property
    def is_prefill(self) -> bool:
        return self.step == 0

    @property
    def batch_size(self) -> int:
        ids = self.inputs.get("input_ids")
        return 0 if ids is None else ids.shape[0]

    @property
    def spans(self):
        """Per sample, per image :class:`~vtoolkit.models.ImageSpan` of this call (computed once, lazily)."""
        if self._spans is None:
            if self.inputs.get("input_ids") is None:
                raise ValueError("vtoolkit needs input_ids at prefill to locate visual tokens; calls with only "
                                 "inputs_embeds are not supported by this method")
            self._spans = self.adapter.image_spans(self.inputs)
        return self._spans

    def visual_mask(self) -> torch.Tensor:
        """``[B, L]`` bool: True at this call's visual token positions."""
        ids = self.inputs["input_ids"]
        return ids == self.adapter.image_token_id
