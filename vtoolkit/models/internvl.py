"""InternVL (``InternVLForConditionalGeneration``, the ``-hf`` checkpoints of InternVL2.5 / InternVL3).

Per image: dynamic tiles of ``image_size`` px (448 in InternVL3) and, when there are several, a thumbnail last; each
tile goes through InternViT (which has a CLS token) on its own; the feature layer's patch features (CLS dropped) are
pixel-shuffled 2x2 -> 1 token (``downsample_ratio=0.5``) and projected. The prompt holds
``<img>`` + ``<IMG_CONTEXT>`` x (tokens per tile x tiles) + ``</img>`` per image, tiles in order.

Which four patches form one LLM token is taken from HF's own ``pixel_shuffle`` run on a tensor of patch indices, so
the map cannot drift from HF. Visual scores: the CLS attention of the feature layer (post ``q_norm`` / ``k_norm``, as
the attention uses them) over the patches, then the mean over the four patches of each token (see
:meth:`InternVLAdapter.merge_patch_scores`).
"""
from __future__ import annotations

import torch

from vtoolkit.models.base import ConfigFeatureLayer, ImageSpan, ModelAdapter
from vtoolkit.registry import register_adapter


@register_adapter("internvl")
class InternVLAdapter(ConfigFeatureLayer, ModelAdapter):
    family = "internvl"
    has_cls = True

    @property
    def vision_layers(self):
        return self.vision_tower.encoder.layer

    def vision_attention(self, layer: int):
        return self.vision_layers[layer].attention

    def vision_qk(self, layer: int):
        """The modules whose outputs are the query / key the attention uses (InternViT normalises q and k)."""
        attn = self.vision_attention(layer)
        return attn.q_norm, attn.k_norm

    @property
    def projector(self):
        return self.core.multi_modal_projector

    @property
    def patch_grid(self) -> int:
        vc = self.vision_config
        size = vc.image_size[0] if isinstance(vc.image_size, (list, tuple)) else vc.image_size
        patch = vc.patch_size[0] if isinstance(vc.patch_size, (list, tuple)) else vc.patch_size
        return size // patch

    @property
    def tokens_per_crop(self) -> int:
        return int(self.patch_grid**2 * self.config.downsample_ratio**2)

    @property
    def crop_grid(self) -> tuple[int, int]:
        g = int(self.patch_grid * self.config.downsample_ratio)
        return g, g

    def shuffle_sources(self) -> torch.Tensor:
        """``[tokens_per_crop, r]``: the raster indices of the patches (CLS excluded) pixel shuffle merges into each
        LLM token of a tile (r = 4 for 2x2), from HF's own ``pixel_shuffle``."""
        g = self.patch_grid
        idx = torch.arange(g * g, dtype=torch.float64).view(1, g, g, 1)
        out = self.core.pixel_shuffle(idx, scale_factor=self.config.downsample_ratio)
        return out.reshape(-1, out.shape[-1]).long()

    def merge_patch_scores(self, rows: torch.Tensor) -> torch.Tensor:
        """Patch scores ``[n_crops, N]`` -> token scores ``[n_crops, N / 4]``: the mean over the four patches pixel
        shuffle concatenates into one token. The token's feature is a function of all four patches alike (their
        features are concatenated before the MLP), so its share of the CLS attention is the mass on those four;
        the mean is that mass over 4 (same ranking as the sum), and unlike the max one outlier patch cannot carry
        a token whose other three patches the CLS ignores."""
        src = self.shuffle_sources().to(rows.device)
        return rows[:, src].mean(-1)

    def _runs(self, ids: torch.Tensor) -> list[list[int]]:
        """Per row: the lengths of the contiguous runs of ``<IMG_CONTEXT>`` tokens (one run per image)."""
        img = ids == self.image_token_id
        out = []
        for row in img:
            r = row.long()
            starts = ((r[1:] == 1) & (r[:-1] == 0)).nonzero().flatten() + 1
            if r.numel() and r[0] == 1:
                starts = torch.cat([starts.new_zeros(1), starts])
            ends = ((r[:-1] == 1) & (r[1:] == 0)).nonzero().flatten() + 1
            if r.numel() and r[-1] == 1:
                ends = torch.cat([ends, ends.new_full((1,), r.numel())])
            out.append((ends - starts).tolist())
        return out

    def image_token_counts(self, inputs, encoded: bool = False) -> list[int]:
        runs = self._runs(inputs["input_ids"])
        counts = [n for row in runs for n in row]
        for n in counts:
            if n % self.tokens_per_crop:
                raise ValueError(f"an image has {n} <IMG_CONTEXT> tokens, not a multiple of {self.tokens_per_crop} "
                                 f"per tile")
        pixels = inputs.get("pixel_values")
        if encoded and pixels is not None and sum(counts) != pixels.shape[0] * self.tokens_per_crop:
            total = pixels.shape[0] * self.tokens_per_crop       # generate repeated prompt rows (beams)
            rep = sum(counts) // max(total, 1)
            if rep * total != sum(counts) or len(runs) % rep:
                raise ValueError(f"input_ids hold {sum(counts)} image tokens for {pixels.shape[0]} encoded tiles")
            counts = [n for row in runs[::rep] for n in row]
        return counts

    def features_by_image(self, pooler_output, inputs) -> list[torch.Tensor]:
        """HF returns ``[tiles, tokens_per_tile, D]`` for all tiles of the call: split it per image."""
        flat = pooler_output.reshape(-1, pooler_output.shape[-1])
        return list(flat.split(self.image_token_counts(inputs, encoded=True)))

    def _make_span(self, positions, image_index, inputs) -> ImageSpan:
        n = self.tokens_per_crop
        crops = list(positions.split(n))
        return ImageSpan(positions=positions, image_index=image_index, crops=crops, grid=self.crop_grid)

    def image_pixels(self, inputs, image_index: int):
        tiles = [c // self.tokens_per_crop for c in self.image_token_counts(inputs, encoded=True)]
        start = sum(tiles[:image_index])
        return inputs["pixel_values"][start:start + tiles[image_index]]

    def format_prompt(self, processor, question: str, num_images: int = 1) -> str:
        content = [{"type": "image"}] * num_images + [{"type": "text", "text": question}]
        return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
