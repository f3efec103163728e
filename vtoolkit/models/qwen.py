"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL: no CLS token, 2x2 patch merger, M-RoPE positions with ``rope_deltas``."""
from __future__ import annotations

import torch

from vtoolkit.models.base import ImageSpan, ModelAdapter
from vtoolkit.registry import register_adapter


@register_adapter("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
class QwenVLAdapter(ModelAdapter):
    family = "qwen_vl"
    position_kind = "mrope"
    has_cls = False

    @property
    def visual_marker_ids(self) -> tuple[int, ...]:
        return tuple(t for t in (self.config.vision_start_token_id, self.config.vision_end_token_id) if t is not None)

    @property
    def vision_tower(self):
        return self.core.visual

    @property
    def vision_layers(self):
        return self.vision_tower.blocks

    def vision_attention(self, layer: int):
        return self.vision_layers[layer].attn

    @property
    def projector(self):
        return self.vision_tower.merger

    @property
    def merge_size(self) -> int:
        return self.vision_config.spatial_merge_size

    def full_attention_layers(self) -> list[int]:
        """ViT blocks that attend over the whole image (Qwen2.5-VL: ``fullatt_block_indexes``; others: all)."""
        full = getattr(self.vision_config, "fullatt_block_indexes", None)
        return list(full) if full else list(range(len(self.vision_layers)))

    def window_index(self, grid_thw: torch.Tensor) -> torch.Tensor | None:
        """Qwen2.5-VL's merged-token window permutation (ViT order -> raster order is ``argsort`` of it)."""
        vt = self.vision_tower
        if not hasattr(vt, "permute_input_for_window_attn"):   # no window attention (Qwen2-VL, Qwen3-VL)
            return None
        from transformers.vision_utils import get_vision_window_index

        return get_vision_window_index(grid_thw, spatial_merge_size=vt.spatial_merge_size, window_size=vt.window_size,
                                       patch_size=vt.patch_size)[0]

    def vision_feature_layer(self) -> int:
        return len(self.vision_layers) - 1

    def image_token_counts(self, inputs, encoded: bool = False) -> list[int]:
        thw = inputs.get("image_grid_thw")
        if thw is None:
            return []
        return (thw.prod(-1) // self.merge_size**2).tolist()

    def image_pixels(self, inputs, image_index: int):
        counts = inputs["image_grid_thw"].prod(-1).tolist()          # patches per image, flattened over the batch
        start = sum(counts[:image_index])
        return inputs["pixel_values"][start:start + counts[image_index]]

    def image_frames(self, inputs, image_index: int):
        """A still image is repeated into ``temporal_patch_size`` frames by the processor; each row of
        ``pixel_values`` is one patch flattened as ``[channel, time, patch, patch]``: view ``[T, N, C, p, p]``."""
        rows = self.image_pixels(inputs, image_index)
        vc = self.vision_config
        t, p = vc.temporal_patch_size, vc.patch_size
        return rows.view(rows.shape[0], -1, t, p, p).permute(2, 0, 1, 3, 4)

    def image_spans(self, inputs):
        self._thw = inputs.get("image_grid_thw")
        try:
            return super().image_spans(inputs)
        finally:
            del self._thw

    def _make_span(self, positions, image_index, inputs) -> ImageSpan:
        t, h, w = self._thw[image_index].tolist()
        return ImageSpan(positions=positions, image_index=image_index, crops=[positions],
                         grid=(t * h // self.merge_size, w // self.merge_size))

    def rope_index(self, inputs, attention_mask=None):
        """M-RoPE positions ``[3, B, L]`` and ``rope_deltas [B, 1]`` of the (unpruned) input, as HF computes them."""
        kw = {k: inputs[k] for k in ("image_grid_thw", "video_grid_thw") if inputs.get(k) is not None}
        if inputs.get("mm_token_type_ids") is not None:
            kw["mm_token_type_ids"] = inputs["mm_token_type_ids"]
        return self.core.get_rope_index(inputs["input_ids"], attention_mask=attention_mask, **kw)

    def format_prompt(self, processor, question: str, num_images: int = 1) -> str:
        content = [{"type": "image"}] * num_images + [{"type": "text", "text": question}]
        return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
