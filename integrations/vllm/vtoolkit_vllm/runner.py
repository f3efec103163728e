"""The one patch of vLLM internals: after a model runner loads a model, turn on the runner's multimodal-pruning
path (``is_multimodal_pruning_enabled``: the runner then calls ``model.recompute_mrope_positions`` with each prefill
chunk's encoder output) when the model asks for it (``vtoolkit_mrope_pruning``, set by the Qwen2-VL class only when
the config has a ``vtoolkit`` entry). vLLM sets the flag only for video pruning (EVS), and its CPU runner never.
Other models and runs without a ``vtoolkit`` entry are untouched."""
from __future__ import annotations

import functools
import importlib

RUNNERS = (("vllm.v1.worker.gpu_model_runner", "GPUModelRunner"),
           ("vllm.v1.worker.cpu_model_runner", "CPUModelRunner"))


def _wrap(cls) -> None:
    orig = cls.__dict__.get("load_model")
    if orig is None or getattr(orig, "_vtoolkit", False):
        return

    @functools.wraps(orig)
    def load_model(self, *args, **kwargs):
        out = orig(self, *args, **kwargs)
        if getattr(self.get_model(), "vtoolkit_mrope_pruning", False):
            self.is_multimodal_pruning_enabled = True
        return out

    load_model._vtoolkit = True
    cls.load_model = load_model


def patch_runners() -> None:
    for module, name in RUNNERS:
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
        _wrap(cls)
