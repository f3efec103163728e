"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): SigLIP without a CLS token, anyres-max tiling.

Per image: a base crop, then the high-res tiles (one crop each), unpadded, with an ``image_newline`` after every row
of the tile grid; a prompt with several images uses one base crop per image (no tiles), as HF does via
``batch_num_images``. As for LLaVA-NeXT, the map from sequence position to (crop, patch) is taken from HF's own
``pack_image_features`` run on a tensor of source indices, so it cannot drift from HF's unpad / newline logic.

``anyres_max_N`` shrinks the unpadded tile grid by bilinear interpolation when it holds more than N base crops'
worth of patches; the LLM tokens are then mixtures of patches, not patches. The adapter detects this (the packed
source indices stop being distinct integers) and raises: token positions per crop are not defined for such an
image. SigLIP has no CLS token: visual scores are the received-attention substitute, per crop.
"""
from __future__ import annotations

import torch

from vtoolkit.models.llava import LlavaNextAdapter
from vtoolkit.registry import register_adapter


@register_adapter("llava_onevision")
class LlavaOnevisionAdapter(LlavaNextAdapter):
    family = "llava_onevision"
    has_cls = False
    scores_per_crop = True
    nested_images = True     # the processor counts images per sample (batch_num_images): a multi-image prompt gets
                             # one base crop per image, as HF runs OneVision on several images

    @property
    def tokens_per_crop(self) -> int:
        vc = self.vision_config
        return (vc.image_size // vc.patch_size) ** 2            # SigLIP: no CLS, "full" keeps every patch

    def full_attention_layers(self) -> list[int]:
        """SigLIP attends over the whole crop in every layer."""
        return list(range(len(self.vision_layers)))

    def unused_vision_layers(self) -> list[int]:
        return super().unused_vision_layers() if isinstance(self.config.vision_feature_layer, int) else []

    def _num_crops(self, inputs) -> list[int]:
        from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

        sizes = self._sizes(inputs)
        per_sample = inputs.get("batch_num_images")
        patching = [True] * len(sizes) if per_sample is None else \
            [int(n) == 1 for n in per_sample.tolist() for _ in range(int(n))]
        return [image_size_to_num_patches(image_size=s, grid_pinpoints=self.config.image_grid_pinpoints,
                                          patch_size=self.vision_config.image_size) if p else 1
                for s, p in zip(sizes, patching)]

    def _packed_sources(self, image_sizes, inputs=None) -> list[torch.Tensor]:
        n = self.tokens_per_crop
        crops = self._num_crops(inputs) if inputs is not None else None
        feats = [torch.arange(c * n, dtype=torch.float64).view(c, n, 1) for c in crops]
        packed, _ = self.core.pack_image_features(feats, image_sizes, image_newline=torch.tensor([-1.0],
                                                  dtype=torch.float64),
                                                  vision_aspect_ratio=self.config.vision_aspect_ratio)
        out = []
        for i, t in enumerate(packed):
            v = t.view(-1)
            src = v[v >= 0]
            if not torch.equal(src, src.round()) or src.unique().numel() != src.numel():
                raise NotImplementedError(
                    f"image {i} (size {image_sizes[i]}) is large enough that LLaVA-OneVision's "
                    f"{self.config.vision_aspect_ratio} interpolates its tile features: its LLM tokens are mixtures of "
                    f"patches, so per-crop token positions are not defined; use a smaller image or a pinpoint grid "
                    f"within the limit")
            out.append(v.long())
        return out

    def image_token_counts(self, inputs, encoded: bool = False) -> list[int]:
        return [int(s.numel()) for s in self._packed_sources(self._sizes(inputs), inputs)]

    def image_spans(self, inputs):
        self._sources = self._packed_sources(self._sizes(inputs), inputs)
        try:
            return super(LlavaNextAdapter, self).image_spans(inputs)
        finally:
            del self._sources

    def image_pixels(self, inputs, image_index: int):
        return inputs["pixel_values"][image_index][:self._num_crops(inputs)[image_index]]

    def format_prompt(self, processor, question: str, num_images: int = 1) -> str:
        content = [{"type": "image"}] * num_images + [{"type": "text", "text": question}]
        return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
