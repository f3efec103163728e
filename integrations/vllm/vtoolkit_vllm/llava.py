"""LLaVA-1.5 (CLIP tower, features from ``vision_feature_layer``) with pre-LLM pruning.

- Placeholders: the processing info returns ``T = budget(N)`` tokens per image instead of N, so the prompt, the
  scheduler, the KV cache and the encoder budget all see the pruned length before the model runs.
- Encoder path: vLLM already truncates the CLIP tower at ``vision_feature_layer`` (HF's layer -2 is its last
  layer), so a forward hook on that layer's fused ``qkv_proj`` gives the q/k FasterVLM scores from
  (``vtoolkit_core.cls_attention``); the top-T patches are kept in raster order and projected (the projector is
  per token). Positions: vLLM numbers the pruned prompt 0..L'-1, which is vtoolkit's LLaVA default
  (``positions="contiguous"``, as the official FasterVLM).
"""
from __future__ import annotations

import torch
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaProcessingInfo,
    _build_llava_or_pixtral_hf_info,
    _build_llava_or_pixtral_hf_processor,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

import vtoolkit_core
from vtoolkit_vllm import config, trace


def _spec_and_patches(hf_config):
    spec = config.spec_from(hf_config)
    if spec is None:
        return None, None
    vc = hf_config.vision_config
    if getattr(vc, "model_type", None) != "clip_vision_model":
        raise ValueError(f"the vtoolkit vLLM plugin prunes LLaVA with a CLIP tower ([CLS] attention); this model's "
                         f"vision tower is {getattr(vc, 'model_type', None)!r}")
    if hf_config.vision_feature_select_strategy != "default":
        raise ValueError("vtoolkit pruning expects vision_feature_select_strategy='default' (the CLS feature dropped), "
                         f"got {hf_config.vision_feature_select_strategy!r}")
    n = (vc.image_size // vc.patch_size) ** 2
    spec.budget(n, "an image of this model")      # raises here (engine start) for keep_tokens > N
    return spec, n


class VtoolkitLlavaInfo(LlavaProcessingInfo):
    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        n = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        spec, _ = _spec_and_patches(self.get_hf_config())
        return n if spec is None else spec.budget(n, "an image")


def _info(ctx):
    spec = config.spec_from(ctx.get_hf_config())
    return _build_llava_or_pixtral_hf_info(ctx) if spec is None else VtoolkitLlavaInfo(ctx)


@MULTIMODAL_REGISTRY.register_processor(_build_llava_or_pixtral_hf_processor, info=_info,
                                        dummy_inputs=LlavaDummyInputsBuilder)
class VtoolkitLlava(LlavaForConditionalGeneration):
    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        self._vtk, self._vtk_n = _spec_and_patches(vllm_config.model_config.hf_config)
        if self._vtk is not None and vllm_config.parallel_config.tensor_parallel_size > 1:
            raise ValueError("vtoolkit pruning with tensor_parallel_size > 1 is not supported: each rank holds a "
                             "share of the ViT heads, so its [CLS] scores would differ per rank")
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._qkv = None
        if self._vtk is not None and self._vtk.method == "fastervlm":
            self._attn = self.vision_tower.vision_model.encoder.layers[-1].self_attn
            self._attn.qkv_proj.register_forward_hook(self._keep_qkv)

    def _keep_qkv(self, module, args, out):
        self._qkv = out[0] if isinstance(out, tuple) else out

    def _scores(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[B, N]`` scores of the patches of each image (after the tower ran on ``pixel_values``)."""
        spec, n = self._vtk, self._vtk_n
        if spec.method == "random":
            return torch.stack([vtoolkit_core.random_scores([n], vtoolkit_core.image_seed(p, spec.seed))[0]
                                for p in pixel_values])
        qkv, self._qkv = self._qkv, None
        if qkv is None:
            raise RuntimeError("vtoolkit fastervlm: the CLIP feature layer's qkv_proj did not run for these images")
        a = self._attn
        H, d = a.num_heads_per_partition, a.head_dim
        B, T, _ = qkv.shape
        q, k = qkv[..., : H * d], qkv[..., H * d: 2 * H * d]
        q_cls = q[:, 0].reshape(B, H, d)
        kh = k.reshape(B, T, H, d).transpose(1, 2)
        return vtoolkit_core.cls_attention(q_cls, kh, a.scale)

    def _process_image_input(self, image_input):
        if self._vtk is None or image_input["type"] != "pixel_values":
            return super()._process_image_input(image_input)
        pixel_values = image_input["pixel_values"]
        feats = self._process_image_pixels(image_input)          # [B, N, C]: the feature layer, CLS dropped
        scores = self._scores(pixel_values)
        n = feats.shape[1]
        t = self._vtk.budget(n, "an image")
        out = []
        for b in range(feats.shape[0]):
            kept = vtoolkit_core.top_k_raster(scores[b].to(feats.device), t)
            trace.record(pixel_values[b], kept.tolist(), n)
            out.append(self.multi_modal_projector(feats[b, kept]))
        return tuple(out)
