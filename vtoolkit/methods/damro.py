"""DAMRO: contrastive decoding against the ViT's outlier tokens (Gong et al., EMNLP 2024, arXiv 2410.04514;
official code ``coder-gx/DAMRO``; docs/methods.md section 4).

1. Outliers: the ``topk`` patches with the highest [CLS] attention in the vision feature layer (-2):
   ``s_j = mean_h softmax(q_cls^h . K^h / sqrt(d))[1 + j]`` - the same score FasterVLM prunes with, from the same
   hooked q/k (:class:`vtoolkit.hooks.vision_scores.VisionScores`). Qwen2-VL / 2.5-VL have no [CLS]: the mean
   attention each merged token receives in the last full-attention ViT block (FasterVLM's substitute).
2. Contrast stream: the same prompt whose visual input is only those tokens, with its own KV cache.
3. Per step ``l = (1 + alpha) * l_full - alpha * l_outliers``; tokens with ``p_full < beta * max p_full`` removed;
   argmax, or sampling from ``softmax(l)`` with generate's shaping processors bypassed (``processors="direct"``,
   the official behaviour; ``"standard"`` applies them after the contrast). See :mod:`vtoolkit.methods.contrastive`.

Official defaults (``run_*.py``): ``alpha = 2``, ``beta = 0.1``, ``topk = 10`` on CLIP-L/336's 24 x 24 = 576-token grid.
``topk`` rule for other grids (``topk_rule="scaled"``, default): a crop / image of ``N`` tokens gets
``max(1, round(topk * N / 576))`` outliers - the official EVA 16 x 16 grid gets round(10 * 256 / 576) = 4, the ``k`` the
official InstructBLIP runs use; ``topk_rule="fixed"`` takes ``topk`` as it is.

Deviations (named): the [CLS] score is the head mean of per-head probabilities (the released LLaVA code uses one
softmax of the unsplit 1024-d q.k, the released InstructBLIP code the head mean; methods.md 4.6 recommends the head
mean, which also matches FasterVLM); outliers are fed in spatial order (official: score order). LLaVA-NeXT: per-crop
top-k as official, fed in the packed order of HF's (unpadded) layout, with the image block's last ``image_newline``
after them (official: ``#crops x k`` tokens then one newline). Positions of the contrast prompt: LLaVA contiguous
(it is a new, shorter prompt, as official); Qwen: the kept tokens' original M-RoPE positions.

``h.stats``: ``outlier_indices`` (per sample, per image: indices within that image's visual tokens, sorted),
``changed_tokens`` and ``steps`` (see :mod:`vtoolkit.methods.contrastive`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vtoolkit.hooks.sequence import keep_plan
from vtoolkit.hooks.vision_scores import VisionScores
from vtoolkit.kernels import gather_kept
from vtoolkit.methods.contrastive import ContrastiveConfig, ContrastiveDecoding
from vtoolkit.methods.prune_base import select_top
from vtoolkit.registry import register_method

REFERENCE_TOKENS = 576          # CLIP-L/336's grid, where the official topk = 10 applies
TOPK_RULES = ("scaled", "fixed")


@dataclass(frozen=True)
class DAMROConfig(ContrastiveConfig):
    """alpha: contrast strength; beta: plausibility cutoff (0 = off); topk: outliers per crop / image at a 576-token
    grid (``topk_rule``: scaled to other grids, or fixed); processors: direct (official) | standard."""

    alpha: float = 2.0
    beta: float = 0.1
    topk: int = 10
    topk_rule: str = "scaled"
    processors: str = "direct"
    vision_layer: int | None = None

    def validate(self) -> None:
        super().validate()
        if isinstance(self.topk, bool) or not isinstance(self.topk, int) or self.topk < 1:
            raise ValueError(f"topk (outlier tokens per crop) must be an integer >= 1, got {self.topk!r}")
        if self.topk_rule not in TOPK_RULES:
            raise ValueError(f"topk_rule must be one of {TOPK_RULES}, got {self.topk_rule!r}")

    def outliers(self, n: int, what: str) -> int:
        k = self.topk if self.topk_rule == "fixed" else max(1, math.floor(self.topk * n / REFERENCE_TOKENS + 0.5))
        if k > n:
            raise ValueError(f"topk={self.topk} asks for {k} outlier tokens but {what} has only {n} visual tokens; "
                             f"use a smaller topk")
        return k


@register_method("damro", config=DAMROConfig, kind="mitigate", stage="decode",
                 # not qwen3_vl: the contrast rows carry no DeepStack features yet (README, model families)
                 architectures=("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "llava_onevision", "internvl"),
                 requires=("vision attention q/k", "a contrast stream batched with the prompt's"),
                 description="Contrastive decoding against a stream that sees only the ViT's outlier tokens (DAMRO)")
class DAMRO(ContrastiveDecoding):
    def install(self, hooks, ctx) -> None:
        self.scores = VisionScores(self.adapter, self.config.vision_layer)
        self.scores.install(hooks, ctx)
        super().install(hooks, ctx)

    def contrast_rows(self, ctx, kwargs, n):
        ids = ctx.inputs["input_ids"][:, :n]
        sel = select_top(ctx, self.scores.by_image(ctx), self.config.outliers, per_crop=True, newlines="last")
        self._stats["outlier_indices"] = [sel.indices[r] for r in ctx.sample_rows]
        emb = kwargs["inputs_embeds"]
        dev = emb.device
        ids = ids.to(dev)
        vis = ids == self.adapter.image_token_id
        nonpad = _input_nonpad(ctx)[:, :n].to(dev)
        keep_idx, valid = keep_plan(vis, nonpad, sel.keep)
        merged = ctx.merged_embeddings(ids).to(emb.dtype)
        pos = ctx.rope_positions()[..., :n].to(dev) if self.adapter.position_kind == "mrope" else None
        rows, pos, _ = gather_kept(merged, keep_idx, pos, None)
        return rows, valid, pos


def _input_nonpad(ctx) -> torch.Tensor:
    ids, mask = ctx.inputs["input_ids"], ctx.inputs.get("attention_mask")
    return mask.bool() if mask is not None and mask.dim() == 2 else torch.ones_like(ids, dtype=torch.bool)
