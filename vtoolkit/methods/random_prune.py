"""Random visual-token pruning: the control every pruning paper compares with (FasterVLM Table 1 "random").

Scores are i.i.d. uniform. Each image draws from its own generator, seeded with ``seed`` and a fingerprint of the
image's pixels (BLAKE2 of the processor's tensor), so the selection is reproducible, differs from image to image, and
does not depend on which other samples share the batch (a padded batch selects exactly what single runs select).
Same budget rules as FasterVLM (:mod:`vtoolkit.methods.prune_base`).
"""
from __future__ import annotations

from dataclasses import dataclass

from vtoolkit.methods.prune_base import PruneConfig, ScorePrune
from vtoolkit.registry import register_method
from vtoolkit_core.selection import image_seed, random_scores


@dataclass(frozen=True)
class RandomPruneConfig(PruneConfig):
    seed: int = 0


@register_method("random", config=RandomPruneConfig, kind="prune", stage="pre_llm",
                 architectures=("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_onevision",
                                "internvl"), aliases=("random_prune",),
                 description="Seeded random pruning of visual tokens before the LLM (baseline)")
class RandomPrune(ScorePrune):
    def token_scores(self, ctx):
        out = {}
        for span in (s for sample in ctx.spans for s in sample):
            seed = self._image_seed(ctx, span.image_index)
            full = [int(p.max().item()) + 1 if p.numel() else 0 for p in span.crop_patches]
            if self.adapter.has_cls:
                full = [max(f, self.adapter.tokens_per_crop) for f in full]
            out[span.image_index] = random_scores(full, seed)
        return [out[i] for i in sorted(out)]

    def _image_seed(self, ctx, image_index: int) -> int:
        return image_seed(self.adapter.image_pixels(ctx.inputs, image_index), self.config.seed)
