"""Random visual-token pruning: the control every pruning paper compares with (FasterVLM Table 1 "random").

Scores are i.i.d. uniform from a generator seeded with ``seed`` at every call, so a run is reproducible and two calls
on the same shapes drop the same positions. Same budget rules as FasterVLM (:mod:`vtoolkit.methods.prune_base`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vtoolkit.methods.prune_base import PruneConfig, ScorePrune
from vtoolkit.registry import register_method


@dataclass(frozen=True)
class RandomPruneConfig(PruneConfig):
    seed: int = 0


@register_method("random", config=RandomPruneConfig, kind="prune", stage="pre_llm",
                 architectures=("llava", "llava_next", "qwen2_vl", "qwen2_5_vl"), aliases=("random_prune",),
                 description="Seeded random pruning of visual tokens before the LLM (baseline)")
class RandomPrune(ScorePrune):
    def token_scores(self, ctx):
        gen = torch.Generator().manual_seed(self.config.seed)
        out = {}
        for span in (s for sample in ctx.spans for s in sample):
            full = [int(p.max().item()) + 1 if p.numel() else 0 for p in span.crop_patches]
            if self.adapter.has_cls:
                full = [max(f, self.adapter.tokens_per_crop) for f in full]
            out[span.image_index] = [torch.rand(f, generator=gen) for f in full]
        return [out[i] for i in sorted(out)]
