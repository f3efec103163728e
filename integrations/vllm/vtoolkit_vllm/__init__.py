"""vtoolkit's pre-LLM visual-token pruning served by vLLM: an out-of-tree plugin.

vLLM loads it through the ``vllm.general_plugins`` entry point (``register`` below) in every process. It registers,
under the architecture names it serves, subclasses of vLLM's own models that prune only when the model's config
carries a ``vtoolkit`` entry, given without code:

    LLM(model=DIR, hf_overrides={"vtoolkit": {"method": "fastervlm", "keep_tokens": 64}})
    python -m vllm.entrypoints.openai.api_server --model DIR --hf-overrides '{"vtoolkit": {...}}'

Without that entry every class behaves exactly as vLLM's. The selection rules come from ``vtoolkit_core`` (the
same code vtoolkit's Hugging Face path runs). Served: ``fastervlm`` and ``random`` on LLaVA-1.5
(``LlavaForConditionalGeneration`` with a CLIP tower), Qwen2-VL (``Qwen2VLForConditionalGeneration``) and
Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``, scores un-permuted from its ViT's window order). Other
multimodal families listed in ``UNSERVED`` raise at engine start when given a ``vtoolkit`` entry.
"""
from __future__ import annotations

SERVED = {
    "LlavaForConditionalGeneration": "vtoolkit_vllm.llava:VtoolkitLlava",
    "Qwen2VLForConditionalGeneration": "vtoolkit_vllm.qwen2_vl:VtoolkitQwen2VL",
    "Qwen2_5_VLForConditionalGeneration": "vtoolkit_vllm.qwen2_vl:VtoolkitQwen2_5VL",
}
# families this plugin does not prune: a vtoolkit entry on them is an error at engine start, not a silent no-op
UNSERVED = ("LlavaNextForConditionalGeneration", "LlavaOnevisionForConditionalGeneration",
            "Qwen3VLForConditionalGeneration")


def register() -> None:
    """The ``vllm.general_plugins`` entry point: lazy registrations (no model module is imported here)."""
    from vllm import ModelRegistry

    for arch, target in SERVED.items():
        ModelRegistry.register_model(arch, target)
    for arch in UNSERVED:
        ModelRegistry.register_model(arch, f"vtoolkit_vllm.unserved:{arch}")
    import os

    if os.environ.get("VTOOLKIT_VLLM_NO_RUNNER_PATCH") != "1":
        from vtoolkit_vllm.runner import patch_runners

        patch_runners()
