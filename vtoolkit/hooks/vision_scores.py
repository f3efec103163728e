"""Token-importance scores from one vision-encoder layer, computed from hooked q/k (the tower keeps SDPA/flash).

- Encoders with a [CLS] token (CLIP in LLaVA / LLaVA-NeXT): the CLS query's attention over the patch keys in layer
  ``l``, one row of ``[n_crops, N]`` (CLS column excluded), computed from the ``q_proj`` / ``k_proj`` outputs of that
  layer (cost O(N C) per crop). Two rules (``cls_score=``):

  - ``"head_mean"`` (FasterVLM's score; the released DAMRO InstructBLIP code's): the mean over heads of the per-head
    probabilities, ``a[c, j] = mean_h softmax(q_cls^h . K^h / sqrt(d))[1 + j]``, ``d`` the head dim (the module's
    own scale).
  - ``"pooled"`` (the released DAMRO LLaVA / LLaVA-NeXT code's): ONE softmax over the unsplit q.k of all heads,
    ``a[c, j] = softmax(q_cls . K / sqrt(C))[1 + j]``, ``C`` the full q/k width (= the vision hidden size). It ranks
    patches by the sum over heads of the per-head logits (a sharper softmax of their mean), not by the mean of the
    per-head probabilities, so its top-k set differs from ``"head_mean"``'s in most images.
- Encoders without CLS (Qwen2-VL / Qwen2.5-VL): the mean attention each patch *receives* in a full-attention block,
  ``r_j = mean_h mean_i softmax(q_i^h . K^h / sqrt(d))[j]``, per image (block-diagonal ``cu_seqlens``), streamed over
  query blocks so no ``H x N x N`` tensor exists; then averaged over the ``merge x merge`` patches that form one LLM
  token, and un-permuted from Qwen2.5-VL's window order to raster order. Computed in an attention interceptor
  (post-RoPE q/k), the base attention still runs unchanged.

Besides the scores, ``record=`` keeps what methods need beyond the [CLS] row (VisionZip, VisPruner), from the same
hooks, per crop / per image like the scores:

- ``"keys"``: the layer's head-mean keys ``mean_h k^h`` (CLS towers: the ``k_proj`` output, bias included, ``[1+N, d]``
  per crop with the CLS row first; towers without CLS: the post-RoPE keys of the scored block, ``[N_tokens, d]`` per
  image, averaged over each ``merge x merge`` unit and in raster order).
- ``"hidden"``: the layer's output hidden states (CLS towers only: ``[1+N, C]`` per crop, CLS first; it is
  ``hidden_states[layer]`` of the tower, what LLaVA projects). Towers without CLS merge patches after the ViT, so a
  method there reads the merged LLM-input rows (``ctx.llm_input_embeds``) instead.

Raw per patch: adapters that merge patches into LLM tokens after the feature layer (InternVL's pixel shuffle) do
not merge these rows; ``merge_patch_scores`` applies to the scores only.

Scores are reset at each vision-tower call and read by the method at the LLM prefill (``by_image()``). Vision-tower
calls made by a side stream (e.g. VCD's noised image) are not scored and reset nothing.
"""
from __future__ import annotations

import torch

from vtoolkit.hooks.attention import intercept
from vtoolkit.hooks.sidestream import in_side_stream
from vtoolkit_core.selection import QUERY_BLOCK, cls_attention, merge_mean, pooled_cls_attention, received_attention

# The score rules themselves live in vtoolkit_core (one definition, shared with the vLLM plugin).
__all__ = ["CLS_SCORES", "QUERY_BLOCK", "VisionScores", "cls_attention", "pooled_cls_attention", "received_attention"]

CLS_SCORES = ("head_mean", "pooled")


class VisionScores:
    """Scores of one vision layer. ``layer``: None = the feature layer (CLS towers) / the last full-attention block
    (no CLS). ``cls_score``: ``"head_mean"`` | ``"pooled"`` for CLS towers (None = ``"head_mean"``); towers without
    CLS have one rule (received attention) and refuse any ``cls_score``."""

    RECORDS = ("keys", "hidden")

    def __init__(self, adapter, layer: int | None = None, cls_score: str | None = None, record: tuple = ()):
        self.adapter = adapter
        record = tuple(record)
        for r in record:
            if r not in self.RECORDS:
                raise ValueError(f"record entries must be among {self.RECORDS}, got {r!r}")
        if "hidden" in record and not adapter.has_cls:
            raise ValueError("record='hidden' keeps the feature layer's per-crop rows of a [CLS] tower; this tower "
                             "merges patches after the ViT: read the merged LLM-input rows (ctx.llm_input_embeds)")
        self.record = record
        if adapter.has_cls:
            cls_score = "head_mean" if cls_score is None else cls_score
            if cls_score not in CLS_SCORES:
                raise ValueError(f"cls_score must be one of {CLS_SCORES}, got {cls_score!r}")
        elif cls_score is not None:
            raise ValueError(f"cls_score={cls_score!r} scores the [CLS] row, but this vision tower has no [CLS] "
                             f"token: its score is the attention each patch receives (no cls_score)")
        self.cls_score = cls_score
        if adapter.has_cls:
            self.layer = adapter.vision_feature_layer() if layer is None else layer
        else:
            self.layer = adapter.full_attention_layers()[-1] if layer is None else layer
        n = len(adapter.vision_layers)
        if not -n <= self.layer < n:
            raise ValueError(f"vision layer {self.layer} out of range for a {n}-layer vision tower")
        self.layer %= n
        if not adapter.has_cls and self.layer not in adapter.full_attention_layers():
            raise ValueError(f"vision layer {self.layer} uses window attention; received-attention scores need a "
                             f"full-attention block: one of {adapter.full_attention_layers()}")
        self._chunks: list[torch.Tensor] = []
        self._keys: list[torch.Tensor] = []
        self._hidden: list[torch.Tensor] = []
        self._q = self._k = None
        self._grid = None

    def install(self, hooks, ctx) -> None:
        self.ctx = ctx
        self._tag = None
        a = self.adapter
        hooks.forward_pre(a.vision_tower, self._reset, with_kwargs=True)
        attn = a.vision_attention(self.layer)
        if a.has_cls:
            q_mod, k_mod = a.vision_qk(self.layer)
            hooks.forward(q_mod, lambda m, args, out: setattr(self, "_q", out))
            hooks.forward(k_mod, lambda m, args, out: setattr(self, "_k", out))
            hooks.forward(attn, self._cls_done)
            if "hidden" in self.record:
                hooks.forward(a.vision_layers[self.layer], self._layer_done)
        else:
            intercept(hooks, a.vision_config, [attn], self._received)

    # -- hooks --------------------------------------------------------------------------------------------------
    def _reset(self, module, args, kwargs):
        if in_side_stream(self.adapter.model):
            return None
        self._tag = self.ctx.encoder_calls   # which encoder call these scores belong to
        self._chunks, self._keys, self._hidden = [], [], []
        self._q = self._k = None
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        self._grid = grid
        return None

    def _cls_done(self, module, args, out):
        if in_side_stream(self.adapter.model):
            return None
        q, k = self._q, self._k
        self._q = self._k = None
        if "keys" in self.record:
            H = module.num_heads
            self._keys.append(k.view(k.shape[0], k.shape[1], H, -1).mean(2))
        if self.cls_score == "pooled":
            self._chunks.append(pooled_cls_attention(q[:, 0], k))
            return None
        B, T, _ = q.shape
        H = module.num_heads
        d = q.shape[-1] // H
        q_cls = q[:, 0].view(B, H, d)
        kh = k.view(B, T, H, d).transpose(1, 2)
        scaling = getattr(module, "scale", None) or getattr(module, "scaling", None) or d**-0.5
        self._chunks.append(cls_attention(q_cls, kh, scaling))
        return None

    def _layer_done(self, module, args, out):
        if not in_side_stream(self.adapter.model):
            self._hidden.append(out[0] if isinstance(out, tuple) else out)
        return None

    def _received(self, module, query, key, value, attention_mask, kwargs):
        if in_side_stream(self.adapter.model):
            return None
        if "keys" in self.record:                   # [H, N, d] -> [N, d] per crop / image
            self._keys.append(key.mean(1) if self.adapter.scores_per_crop else key[0].mean(0))
        scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
        cu = kwargs.get("cu_seq_lens_q")
        if self.adapter.scores_per_crop:            # crops batched (SigLIP in LLaVA-OneVision): one row per crop
            self._chunks.append(torch.stack([received_attention(q, k, scaling) for q, k in zip(query, key)]))
            return None
        q, k = query[0], key[0]                     # [H, N, d] (vision attention runs with batch 1)
        if cu is None:
            self._chunks.append(received_attention(q, k, scaling))
        else:
            for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
                self._chunks.append(received_attention(q[:, s:e], k[:, s:e], scaling))
        return None

    # -- read-out -----------------------------------------------------------------------------------------------
    def _check_fresh(self) -> None:
        if not self._chunks or self._tag != self.ctx.encoder_calls or not self.ctx.features_from_hooked_encoder:
            raise RuntimeError("no vision scores were recorded for this call's images: the vision tower did not run "
                               "under this handle (precomputed image features are not supported by this method)")

    def per_crop(self) -> list[torch.Tensor]:
        """CLS encoders: one ``[N]`` score row per crop, in the order the crops went through the tower."""
        self._check_fresh()
        return list(self.adapter.merge_patch_scores(torch.cat(self._chunks, 0)))

    def by_image(self, ctx) -> list[list[torch.Tensor]]:
        """Per image of the call (encoder order): one score tensor per crop (LLaVA-NeXT: base image, then tiles),
        each over the crop's full raster; what :func:`vtoolkit.methods.prune_base.select_top` takes."""
        if not self.adapter.scores_per_crop:
            return [[s] for s in self.per_image()]
        return self._split_crops(ctx, self.per_crop())

    def _recorded(self, name: str) -> list[torch.Tensor]:
        if name not in self.record:
            raise RuntimeError(f"VisionScores was built without record={name!r}")
        self._check_fresh()
        return self._keys if name == "keys" else self._hidden

    def rows_by_image(self, ctx, name: str) -> list[list[torch.Tensor]]:
        """Recorded ``"keys"`` / ``"hidden"`` rows, per image of the call (encoder order), one tensor per crop (towers
        without CLS: one per image, over the merged tokens in raster order), as :meth:`by_image` gives scores."""
        chunks = self._recorded(name)
        if not self.adapter.scores_per_crop:
            return [[r] for r in self._per_image_rows(torch.cat(chunks))]
        return self._split_crops(ctx, list(torch.cat(chunks, 0)))

    def _split_crops(self, ctx, rows: list) -> list[list]:
        out, cursor = [], 0
        images = {s.image_index: s for sample in ctx.spans for s in sample}   # rows repeat images (beams)
        for span in (images[i] for i in sorted(images)):
            n = len(span.crops)
            out.append(rows[cursor:cursor + n])
            cursor += n
        if cursor != len(rows):
            raise RuntimeError(f"the vision tower scored {len(rows)} crops but the prompt holds {cursor}")
        return out

    def _per_image_rows(self, per_patch: torch.Tensor) -> list[torch.Tensor]:
        """Per-patch rows ``[n_patches, ...]`` in the ViT's order -> per image, one per merged token, raster order."""
        unit = self.adapter.merge_size**2
        merged = (merge_mean(per_patch, unit) if per_patch.dim() == 1
                  else per_patch.view(-1, unit, *per_patch.shape[1:]).mean(1))
        grid = self._grid
        widx = self.adapter.window_index(grid) if grid is not None else None
        if widx is not None:
            merged = merged[torch.argsort(widx.to(merged.device))]
        counts = (grid.prod(-1) // unit).tolist()
        return list(torch.split(merged, counts))

    def per_image(self) -> list[torch.Tensor]:
        """No-CLS encoders: one score per LLM visual token (merged), raster order, per image."""
        self._check_fresh()
        return self._per_image_rows(torch.cat(self._chunks))
