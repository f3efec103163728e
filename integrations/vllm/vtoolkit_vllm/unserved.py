"""vLLM's own classes for the multimodal families the plugin does not prune, under their own names: stock behaviour,
except that a ``vtoolkit`` entry in the config is an error at engine start (it would otherwise be ignored)."""
from __future__ import annotations

import importlib

from vtoolkit_vllm import UNSERVED, config

_MODULES = {
    "LlavaNextForConditionalGeneration": "llava_next",
    "LlavaOnevisionForConditionalGeneration": "llava_onevision",
    "Qwen3VLForConditionalGeneration": "qwen3_vl",
}


def _guarded(arch: str):
    base = getattr(importlib.import_module(f"vllm.model_executor.models.{_MODULES[arch]}"), arch)

    def __init__(self, *, vllm_config, prefix: str = ""):
        if getattr(vllm_config.model_config.hf_config, config.KEY, None) is not None:
            raise ValueError(f"the vtoolkit vLLM plugin does not serve {arch}: it prunes LLaVA-1.5 "
                             f"(LlavaForConditionalGeneration), Qwen2-VL (Qwen2VLForConditionalGeneration) and Qwen2.5-VL "
                             f"(Qwen2_5_VLForConditionalGeneration); "
                             f"remove hf_overrides['{config.KEY}'] to run this model unpruned")
        base.__init__(self, vllm_config=vllm_config, prefix=prefix)

    return type(arch, (base,), {"__init__": __init__, "__module__": __name__})


def __getattr__(name: str):
    if name in UNSERVED:
        cls = _guarded(name)
        globals()[name] = cls
        return cls
    raise AttributeError(name)
