"""FasterVLM: [CLS]-attention visual-token pruning before the LLM (Zhang et al., arXiv 2412.01818 v1).

Algorithm (official code, ``Theia-4869/FasterVLM``; see docs/methods.md section 1):

1. Run the vision tower once. In the layer the features come from (``vision_feature_layer``, -2 for LLaVA), take
   the CLS query's post-softmax attention over the patches, ``a[h, j] = A[h, 0, 1 + j]`` (CLS column excluded).
2. Score ``s_j = mean_h a[h, j]`` (mean of probabilities over heads).
3. Keep the top-T patches by ``s``, in their original raster order; project all features, feed only the kept ones.
4. LLaVA: the pruned sequence is renumbered contiguously (``positions="contiguous"``); nothing changes inside the LLM.

Defaults: ``keep_ratio=0.1`` (the paper's headline 90 % reduction: 58 of 576 tokens); ``keep_tokens`` instead gives T
directly (144 / 58 / 29 in the official scripts). Budget rules are those of :mod:`vtoolkit.methods.prune_base`.

Ports and deviations (named):
- LLaVA-NeXT: per-crop top-T as official (``budget_scope="per_crop"``), or one budget per image
  (``"global"``). Unlike the official code (which used the "spatial" merge: no unpad, no newlines), the selection is
  pushed through HF's own unpad/packing and every ``image_newline`` token is kept (recommended HF port, docs 1.4(b)).
- Qwen2-VL / Qwen2.5-VL have no CLS: the score is the mean attention each patch receives in the last
  full-attention ViT block, averaged over the 2x2 merge and un-permuted from Qwen2.5-VL's window order (the
  substitute the FasterVLM/VisPruner authors describe). Kept tokens keep their original M-RoPE positions
  (``positions="original"``), ``rope_deltas`` is fixed. Qwen3-VL: the same score in its last ViT block; the
  kept tokens' DeepStack features are kept with them (the adapter drops the others from every DeepStack tensor).
- LLaVA-OneVision (SigLIP, no CLS): the received-attention substitute in the feature layer, per crop (base crop and
  each tile), pushed through HF's unpad / packing like LLaVA-NeXT; ``image_newline`` tokens are kept.
- InternVL: InternViT has a CLS: its attention in the feature layer (normalised q / k), per tile (the thumbnail is a
  tile); pixel shuffle merges 2x2 patches into one token, whose score is the mean of its four patches' scores.
- Scores come from hooked q/k of that one layer: the vision tower and the LLM keep SDPA / flash attention.
- ``skip_unused_vision_layers=True`` (default): HF runs every CLIP layer although LLaVA reads the features of layer
  -2; the layers after the feature layer are skipped (their output is never read, so outputs are bit-identical).
  This is an engineering speed-up, not part of FasterVLM; ``False`` measures the method alone.
"""
from __future__ import annotations

from dataclasses import dataclass

from vtoolkit.hooks.vision_scores import VisionScores
from vtoolkit.methods.prune_base import PruneConfig, ScorePrune
from vtoolkit.registry import register_method


def _passthrough(inner, hidden_states, *args, **kwargs):
    """Forward of a vision layer whose output is never read (``inner``, the layer's own forward, is not run)."""
    return hidden_states


@dataclass(frozen=True)
class FasterVLMConfig(PruneConfig):
    """keep_ratio xor keep_tokens (default keep_ratio=0.1); budget_scope per_crop|global; positions
    contiguous|original|None (family default); vision_layer None = the feature layer (CLS) / last full-attention
    block (no CLS)."""

    vision_layer: int | None = None
    skip_unused_vision_layers: bool = True


@register_method("fastervlm", config=FasterVLMConfig, kind="prune", stage="pre_llm",
                 architectures=("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_onevision",
                                "internvl"), aliases=("faster_vlm",),
                 requires=("vision attention q/k",),
                 description="[CLS]-attention pruning of visual tokens before the LLM (FasterVLM)")
class FasterVLM(ScorePrune):
    def check(self) -> None:
        super().check()
        strategy = getattr(self.adapter.config, "vision_feature_select_strategy", "default")
        if self.adapter.has_cls and strategy != "default":
            raise ValueError(f"fastervlm scores patches by their [CLS] attention and expects the CLS feature to be "
                             f"dropped (vision_feature_select_strategy='default'); this model uses {strategy!r}")

    def install_scorer(self, hooks, ctx) -> None:
        self.scores = VisionScores(self.adapter, self.config.vision_layer)
        self.scores.install(hooks, ctx)
        unused = self.adapter.unused_vision_layers() if self.config.skip_unused_vision_layers else []
        self.skipped_layers = [i for i in unused if i > self.scores.layer]
        for i in self.skipped_layers:
            hooks.patch(self.adapter.vision_layers[i], "forward", _passthrough)

    def select(self, ctx):
        keep = super().select(ctx)
        self._stats["vision_layers_run"] = len(self.adapter.vision_layers) - len(self.skipped_layers)
        return keep

    def token_scores(self, ctx):
        return self.scores.by_image(ctx)
