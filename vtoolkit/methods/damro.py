"""DAMRO: contrastive decoding against the ViT's outlier tokens (Gong et al., EMNLP 2024, arXiv 2410.04514;
official code ``coder-gx/DAMRO``; docs/methods.md section 4).

1. Outliers: the ``topk`` patches with the highest [CLS] attention in the vision feature layer (-2), from the hooked
   ``q_proj`` / ``k_proj`` outputs of that layer (:class:`vtoolkit.hooks.vision_scores.VisionScores`, shared with
   FasterVLM). ``cls_score="pooled"`` (default, the released LLaVA-1.5 / LLaVA-NeXT code,
   ``transformers-4.43.0/src/transformers/models/llava/modeling_llava.py`` L442-443 and L466-475,
   ``llava_next/modeling_llava_next.py`` L833-834 and L854-862): ONE softmax over the unsplit q.k of all heads,
   ``s_j = softmax(q_cls . K^T * C ** -0.5)[1 + j]``, C the vision hidden size, CLS column dropped.
   ``cls_score="head_mean"`` (the released InstructBLIP code, ``instructblip/modeling_instructblip.py`` L1588-1610,
   and FasterVLM's score): ``s_j = mean_h softmax(q_cls^h . K^h / sqrt(d))[1 + j]``. The two rank patches
   differently (a logit sum over heads vs a mean of per-head probabilities): on ``ref:shapes`` the top-k sets differ in
   most images, hence the official LLaVA rule by default. Towers without [CLS] (Qwen2-VL / 2.5-VL) have one rule: the
   mean attention each merged token receives in the last full-attention ViT block (FasterVLM's substitute);
   ``cls_score`` does not apply there, and ``"head_mean"`` is refused rather than ignored.
2. Contrast stream: the same prompt whose visual input is only those tokens, with its own KV cache. ``order="score"``
   (default, official: ``torch.topk`` returns them by descending score and the gather keeps that order, L473-475):
   each crop's outliers by descending score; ``order="spatial"``: in their sequence order.
3. Per step ``l = (1 + alpha) * l_full - alpha * l_outliers``; tokens with ``p_full < beta * max p_full`` removed;
   argmax, or sampling from ``softmax(l)`` with generate's shaping processors bypassed (``processors="direct"``,
   the official behaviour, ``sample_method/sample.py`` L191-197; ``"standard"`` applies them after the contrast).
   See :mod:`vtoolkit.methods.contrastive`.

Official defaults (``run_*.py``): ``alpha = 2``, ``beta = 0.1``, ``topk = 10`` on CLIP-L/336's 24 x 24 = 576-token grid.
``topk`` rule for other grids (``topk_rule="scaled"``, default): a crop / image of ``N`` tokens gets
``max(1, floor(topk * N / 576 + 0.5))`` outliers (rounded half up) - the official EVA 16 x 16 grid gets
floor(10 * 256 / 576 + 0.5) = floor(4.94) = 4, the ``k`` the official InstructBLIP runs use; ``topk_rule="fixed"``
takes ``topk`` as it is.

Deviations (named): LLaVA-NeXT: per-crop top-k as official, over the tokens HF's unpadded layout holds (official:
the crop's full grid), crop by crop (base image, then tiles), with the image block's last ``image_newline`` after
them (official: ``#crops x k`` tokens then one newline, ``pack_image_features_damro``, L706-731). Positions of the
contrast prompt: LLaVA contiguous (it is a new, shorter prompt, as official); Qwen (no official port): the kept
tokens' original M-RoPE positions, fed in ``order``. Qwen3-VL (DeepStack): the contrast prompt is the stock
model on "the same prompt seeing only the outlier tokens", so each outlier brings its own DeepStack rows - every
DeepStack tensor is gathered with the outlier indices, in the order the outliers are fed, and added at the contrast
rows' visual positions in the first LLM layers (the adapter's ``side_llm_inputs``). A prompt without an image is refused (there is no outlier
stream to contrast with); in a batch with images, a row without one contrasts with itself (``l = l_full``, with the
plausibility cutoff).

``h.stats``: ``outlier_indices`` (per sample, per image: indices within that image's visual tokens, in the order fed
to the contrast stream - by descending score per crop with ``order="score"``, sorted with ``"spatial"``; LLaVA-NeXT's
kept newline last), ``changed_tokens`` and ``steps`` (see :mod:`vtoolkit.methods.contrastive`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vtoolkit.hooks.sequence import keep_plan
from vtoolkit.hooks.vision_scores import VisionScores
from vtoolkit.kernels import gather_kept
from vtoolkit.methods.contrastive import ContrastiveConfig, ContrastiveDecoding
from vtoolkit.methods.prune_base import ORDERS, select_top
from vtoolkit.registry import register_method

REFERENCE_TOKENS = 576          # CLIP-L/336's grid, where the official topk = 10 applies
TOPK_RULES = ("scaled", "fixed")
CLS_SCORES = ("pooled", "head_mean")


@dataclass(frozen=True)
class DAMROConfig(ContrastiveConfig):
    """alpha: contrast strength; beta: plausibility cutoff (0 = off); topk: outliers per crop / image at a 576-token
    grid (``topk_rule``: scaled to other grids, or fixed); cls_score: pooled (official LLaVA) | head_mean (official
    InstructBLIP; CLS towers only); order: score (official) | spatial, the order outliers are fed in; processors:
    direct (official) | standard; vision_layer: None = the feature layer (CLS) / last full-attention block."""

    alpha: float = 2.0
    beta: float = 0.1
    topk: int = 10
    topk_rule: str = "scaled"
    cls_score: str = "pooled"
    order: str = "score"
    processors: str = "direct"
    vision_layer: int | None = None

    def validate(self) -> None:
        super().validate()
        if isinstance(self.topk, bool) or not isinstance(self.topk, int) or self.topk < 1:
            raise ValueError(f"topk (outlier tokens per crop) must be an integer >= 1, got {self.topk!r}")
        if self.topk_rule not in TOPK_RULES:
            raise ValueError(f"topk_rule must be one of {TOPK_RULES}, got {self.topk_rule!r}")
        if self.cls_score not in CLS_SCORES:
            raise ValueError(f"cls_score must be one of {CLS_SCORES}, got {self.cls_score!r}")
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {self.order!r}")

    def outliers(self, n: int, what: str) -> int:
        k = self.topk if self.topk_rule == "fixed" else max(1, math.floor(self.topk * n / REFERENCE_TOKENS + 0.5))
        if k > n:
            raise ValueError(f"topk={self.topk} asks for {k} outlier tokens but {what} has only {n} visual tokens; "
                             f"use a smaller topk")
        return k


@register_method("damro", config=DAMROConfig, kind="mitigate", stage="decode",
                 architectures=("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_onevision",
                                "internvl"),
                 requires=("vision attention q/k", "a contrast stream batched with the prompt's"),
                 description="Contrastive decoding against a stream that sees only the ViT's outlier tokens (DAMRO)")
class DAMRO(ContrastiveDecoding):
    def check(self) -> None:
        if not self.adapter.has_cls and self.config.cls_score != "pooled":
            raise ValueError(f"damro: cls_score={self.config.cls_score!r} scores the [CLS] row, but this model's "
                             f"vision tower has no [CLS] token; its outliers come from the attention each token "
                             f"receives (leave cls_score at its default)")

    def install(self, hooks, ctx) -> None:
        cls_score = self.config.cls_score if self.adapter.has_cls else None
        self.scores = VisionScores(self.adapter, self.config.vision_layer, cls_score=cls_score)
        self.scores.install(hooks, ctx)
        super().install(hooks, ctx)

    def contrast_rows(self, ctx, kwargs, n):
        if not ctx.has_visual:   # text-only prompts (e.g. image-free benchmark questions): nothing to contrast
            return self.unchanged_rows(ctx, kwargs, n)
        ids = ctx.inputs["input_ids"][:, :n]
        sel = select_top(ctx, self.scores.by_image(ctx), self.config.outliers, per_crop=True, newlines="last",
                         order=self.config.order)
        self._stats["outlier_indices"] = [sel.indices[r] for r in ctx.sample_rows]
        emb = kwargs["inputs_embeds"]
        dev = emb.device
        ids = ids.to(dev)
        vis = ids == self.adapter.image_token_id
        nonpad = _input_nonpad(ctx)[:, :n].to(dev)
        keep_idx, valid = keep_plan(vis, nonpad, sel.keep)      # sorted: the outliers in sequence order
        if self.config.order == "score":                        # their slots, refilled in score order
            slots = valid & vis.gather(1, keep_idx)
            for b, ranked in enumerate(sel.ranked):
                if ranked is not None:
                    keep_idx[b, slots[b]] = ranked.to(dev)
        merged = ctx.merged_embeddings(ids).to(emb.dtype)
        pos = ctx.rope_positions()[..., :n].to(dev) if self.adapter.position_kind == "mrope" else None
        rows, pos, _ = gather_kept(merged, keep_idx, pos, None)
        return rows, valid, pos, (keep_idx, None)      # Qwen3-VL: each outlier brings its own DeepStack rows


def _input_nonpad(ctx) -> torch.Tensor:
    ids, mask = ctx.inputs["input_ids"], ctx.inputs.get("attention_mask")
    return mask.bool() if mask is not None and mask.dim() == 2 else torch.ones_like(ids, dtype=torch.bool)
