"""LLaVA-1.5 (``LlavaForConditionalGeneration``) and LLaVA-NeXT (``LlavaNextForConditionalGeneration``)."""
from __future__ import annotations

import torch

from vtoolkit.models.base import ConfigFeatureLayer, ImageSpan, ModelAdapter
from vtoolkit.registry import register_adapter


@register_adapter("llava")
class LlavaAdapter(ConfigFeatureLayer, ModelAdapter):
    family = "llava"
    has_cls = True

    @property
    def vision_layers(self):
        return self.vision_tower.encoder.layers

    def vision_attention(self, layer: int):
        return self.vision_layers[layer].self_attn

    @property
    def projector(self):
        return self.core.multi_modal_projector

    @property
    def tokens_per_crop(self) -> int:
        vc = self.vision_config
        n = (vc.image_size // vc.patch_size) ** 2
        return n + (1 if self.config.vision_feature_select_strategy == "full" else 0)

    @property
    def crop_grid(self) -> tuple[int, int]:
        g = self.vision_config.image_size // self.vision_config.patch_size
        return g, g

    def image_token_counts(self, inputs, encoded: bool = False) -> list[int]:
        pixels = inputs.get("pixel_values")
        if encoded and pixels is not None:
            return [self.tokens_per_crop] * pixels.shape[0]
        n_img = (inputs["input_ids"] == self.image_token_id).sum().item()
        if n_img % self.tokens_per_crop:
            raise ValueError(f"{n_img} image tokens is not a multiple of {self.tokens_per_crop} per image")
        return [self.tokens_per_crop] * (n_img // self.tokens_per_crop)

    def _make_span(self, positions, image_index, inputs) -> ImageSpan:
        return ImageSpan(positions=positions, image_index=image_index, crops=[positions], grid=self.crop_grid)

    def format_prompt(self, processor, question: str, num_images: int = 1) -> str:
        """LLaVA-1.5 conversation format (``USER: <image>\\n... ASSISTANT:``), as the llava-hf model cards use."""
        return "USER: " + "<image>\n" * num_images + question + " ASSISTANT:"


@register_adapter("llava_next")
class LlavaNextAdapter(LlavaAdapter):
    """LLaVA-NeXT anyres: per image a base crop plus high-res tiles, unpadded, with an ``image_newline`` per row.

    The packing is taken from HF itself: we run ``pack_image_features`` on a tensor of source indices, so our map
    from sequence position to (crop, patch) can never drift from HF's unpad logic.
    """

    family = "llava_next"

    def _packed_sources(self, image_sizes) -> list[torch.Tensor]:
        """Per image: for each packed token, ``crop * N + patch`` (crop 0 = base image) or -1 for newlines."""
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        n = self.tokens_per_crop
        feats = []
        for size in image_sizes:
            crops = image_size_to_num_patches(image_size=size, grid_pinpoints=self.config.image_grid_pinpoints,
                                              patch_size=self.vision_config.image_size)
            feats.append(torch.arange(crops * n, dtype=torch.float64).view(crops, n, 1))
        packed, lens = self.core.pack_image_features(feats, image_sizes, self.config.vision_feature_select_strategy,
                                                     image_newline=torch.tensor([-1.0], dtype=torch.float64))
        return [t.view(-1).long() for t in packed]

    def image_token_counts(self, inputs, encoded: bool = False) -> list[int]:
        return [int(s.numel()) for s in self._packed_sources(self._sizes(inputs))]

    def _sizes(self, inputs):
        sizes = inputs.get("image_sizes")
        if sizes is None:
            raise ValueError("LLaVA-NeXT inputs need image_sizes (the processor returns them)")
        return sizes.tolist() if torch.is_tensor(sizes) else [list(s) for s in sizes]

    def image_pixels(self, inputs, image_index: int):
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        size = self._sizes(inputs)[image_index]
        crops = image_size_to_num_patches(image_size=size, grid_pinpoints=self.config.image_grid_pinpoints,
                                          patch_size=self.vision_config.image_size)
        return inputs["pixel_values"][image_index][:crops]   # [max_crops, ...] is zero-padded across the batch

    def image_spans(self, inputs):
        self._sources = self._packed_sources(self._sizes(inputs))
        try:
            return super().image_spans(inputs)
        finally:
            del self._sources

    def _make_span(self, positions, image_index, inputs) -> ImageSpan:
        src = self._sources[image_index].to(positions.device)
        n = self.tokens_per_crop
        num_crops = int(src.max().item()) // n + 1
        crops, patches = [], []
        for c in range(num_crops):
            sel = (src >= c * n) & (src < (c + 1) * n)
            order = torch.argsort(src[sel])           # crop raster order
            crops.append(positions[sel][order])
            patches.append(src[sel][order] - c * n)
        return ImageSpan(positions=positions, image_index=image_index, crops=crops, crop_patches=patches,
                         newlines=positions[src < 0], grid=self.crop_grid)
