"""Qwen2-VL and Qwen2.5-VL with pre-LLM pruning; kept tokens keep their original M-RoPE positions (vtoolkit's Qwen
policy). One set of mixins (placeholder budget, scores, positions) over vLLM's classes of both families.

- Placeholders: ``T = budget(N)`` per image (``N = t * h * w / merge^2``) in the processor's prompt update and in
  ``get_num_image_tokens`` (the encoder budget), before the model runs.
- Scores (fastervlm): a forward pre-hook on the attention kernel of the last full-attention ViT block (Qwen2-VL: the
  last block; Qwen2.5-VL: ``fullatt_block_indexes[-1]``) sees the post-RoPE q/k and the per-image ``cu_seqlens``;
  ``vtoolkit_core.received_attention`` per image, ``merge_mean`` over the 2x2 merge. Qwen2.5-VL's ViT runs in
  window order (merge units permuted by ``window_index``, which the encoder's metadata holds): the scores are put
  back in raster order (``scores[window_index] = scores_in_window_order``) before the top-T, as vtoolkit's HF
  adapter does, so the kept indices are raster indices of the merged tokens in both engines.
- M-RoPE positions: ``get_mrope_input_positions`` (called when the request is added, before the encoder) gives
  text its unpruned positions (text after an image starts at the image's start + max(t, h, w), as if the image
  were whole) and every placeholder the image's start position. The model sets ``supports_multimodal_pruning``, so
  vLLM's runner calls ``recompute_mrope_positions`` with the encoder output of each prefill chunk (the hook vLLM
  made for EVS video pruning): the encoder returns each kept token's (t, h, w) within the image in 3 extra
  channels, and the hook adds them to the image's start, strips them, and returns the delta
  ``max_pos + 1 - L'`` (as vtoolkit's ``rope_deltas``). vLLM's runner calls that hook only when its
  ``is_multimodal_pruning_enabled`` is set (GPU runner: video_pruning_rate > 0; the CPU runner never sets it), so
  ``vtoolkit_vllm.runner`` sets it after the model is loaded when the model is this class with a vtoolkit entry.
- random: the seed is a fingerprint of the processor's normalised pixels, so the engine must leave normalisation
  to the processor (``mm_device_do_normalize=False``; vLLM's default normalises uint8 pixels in the model).
- Videos are not pruned and not served together with pruning (``limit_mm_per_prompt={"video": 0}`` is required).
"""
from __future__ import annotations

from functools import partial

import torch
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.model_executor.models.qwen2_vl import (
    Qwen2VLDummyInputsBuilder,
    Qwen2VLForConditionalGeneration,
    Qwen2VLMultiModalProcessor,
    Qwen2VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import PromptReplacement

import vtoolkit_core
from vtoolkit_vllm import config, trace

POS = 3   # extra channels of the encoder output: (t, h, w) of each kept token within its image


class _BudgetInfo:
    """Processing-info mixin: ``T = budget(N)`` image tokens per image (the encoder budget vLLM plans with)."""

    def get_num_image_tokens(self, *, image_width, image_height, image_processor, mm_kwargs) -> int:
        n = super().get_num_image_tokens(image_width=image_width, image_height=image_height,
                                         image_processor=image_processor, mm_kwargs=mm_kwargs)
        spec = config.spec_from(self.get_hf_config())
        return n if spec is None else spec.budget(n, f"a {image_width}x{image_height} image")


class _BudgetProcessor:
    """Multimodal-processor mixin: ``T = budget(N)`` placeholders per image in the prompt update."""

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        spec = config.spec_from(self.info.get_hf_config())
        if spec is None:
            return updates
        merge = self.info.get_hf_config().vision_config.spatial_merge_size ** 2
        image_token = self.info.get_hf_config().image_token_id

        def pruned(item_idx: int):
            thw = out_mm_kwargs["image"][item_idx]["image_grid_thw"].data
            n = int(thw.prod()) // merge
            return [image_token] * spec.budget(n, f"image {item_idx} ({n} tokens)")

        return [PromptReplacement(modality="image", target=[image_token], replacement=partial(pruned))
                if u.modality == "image" else u for u in updates]


class _QwenPruning:
    """Model mixin (before vLLM's Qwen2-VL / Qwen2.5-VL class in the bases): scores, kept rows, positions."""

    _family = "Qwen2-VL"

    supports_multimodal_pruning = True      # per instance below: False without a vtoolkit entry

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        spec = config.spec_from(vllm_config.model_config.hf_config)
        mm = vllm_config.model_config.multimodal_config
        if spec is not None:
            if vllm_config.parallel_config.tensor_parallel_size > 1:
                raise ValueError("vtoolkit pruning with tensor_parallel_size > 1 is not supported: each rank holds "
                                 "a share of the ViT heads, so its attention scores would differ per rank")
            if mm.get_limit_per_prompt("video") != 0:
                raise ValueError(f"vtoolkit pruning on {self._family} serves images only: pass "
                                 "limit_mm_per_prompt={'image': N, 'video': 0}")
            if mm.is_multimodal_pruning_enabled():
                raise ValueError("vtoolkit pruning and video_pruning_rate cannot be combined")
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        if spec is not None and spec.method == "random" and type(self.visual.input_norm).__name__ != "IdentityInputNorm":
            raise ValueError("vtoolkit random pruning seeds each image from the processor's normalised pixels (as "
                             "vtoolkit's HF path); vLLM normalises Qwen2-VL pixels inside the model by default, with "
                             "other float bits: pass mm_device_do_normalize=False (--mm-device-do-normalize false)")
        self._vtk = spec
        self.supports_multimodal_pruning = spec is not None
        self.vtoolkit_mrope_pruning = spec is not None     # read by the runner patch in vtoolkit_vllm.runner
        self._chunks: list[torch.Tensor] = []
        if spec is not None and spec.method == "fastervlm":
            full = getattr(self.visual, "fullatt_block_indexes", None)      # Qwen2.5-VL: windowed blocks between
            block = self.visual.blocks[list(full)[-1] if full else -1]
            block.attn.attn.register_forward_pre_hook(self._received, with_kwargs=True)

    # -- scores -----------------------------------------------------------------------------------------------
    def _received(self, module, args, kwargs):
        q, k = kwargs["query"], kwargs["key"]                       # [1, S, H, d] post-RoPE
        cu = kwargs["cu_seqlens"].tolist()
        scaling = q.shape[-1] ** -0.5
        for s, e in zip(cu[:-1], cu[1:]):
            if e > s:
                self._chunks.append(vtoolkit_core.received_attention(q[0, s:e].transpose(0, 1),
                                                                     k[0, s:e].transpose(0, 1), scaling))
        return None

    def _process_image_input(self, image_input):
        if self._vtk is None or image_input["type"] != "pixel_values":
            return super()._process_image_input(image_input)
        spec = self._vtk
        grid_thw = image_input["image_grid_thw"]
        pixel_values = image_input["pixel_values"]
        self._chunks = []
        embeds, window_index = self._encode(pixel_values, grid_thw)
        merge = self.visual.spatial_merge_size
        patches = grid_thw.prod(-1).tolist()
        sizes = [p // merge // merge for p in patches]
        if spec.method == "fastervlm" and len(self._chunks) != len(sizes):
            raise RuntimeError(f"vtoolkit fastervlm: {len(self._chunks)} attention scores for {len(sizes)} images")
        if spec.method == "fastervlm":
            merged = [vtoolkit_core.merge_mean(c, merge * merge) for c in self._chunks]
            if window_index is not None:       # window order -> raster order (merge units of all images)
                flat = torch.cat(merged)
                raster = torch.empty_like(flat)
                raster[window_index.to(flat.device)] = flat
                merged = list(raster.split(sizes))
        out, start = [], 0
        for i, (emb, n) in enumerate(zip(embeds.split(sizes), sizes)):
            pixels = pixel_values[start:start + patches[i]]
            start += patches[i]
            if spec.method == "random":
                s = vtoolkit_core.random_scores([n], vtoolkit_core.image_seed(pixels, spec.seed))[0]
            else:
                s = merged[i]
            kept = vtoolkit_core.top_k_raster(s.to(emb.device), spec.budget(n, f"image {i}"))
            trace.record(pixels, kept.tolist(), n)
            t, h, w = grid_thw[i].tolist()
            h, w = h // merge, w // merge
            rel = torch.stack([kept // (h * w), (kept // w) % h, kept % w], -1).to(emb.dtype)
            out.append(torch.cat([emb[kept], rel.to(emb.device)], -1))
        self._chunks = []
        return tuple(out)

    def _encode(self, pixel_values, grid_thw):
        """``(embeds in raster order, window_index or None)``: Qwen2.5-VL's encoder metadata is built here (as its
        forward would build it) so that the window permutation its blocks ran in is known."""
        prepare = getattr(self.visual, "prepare_encoder_metadata", None)
        if prepare is None or not getattr(self.visual, "fullatt_block_indexes", None):
            return self.visual(pixel_values, grid_thw=grid_thw), None
        thw = grid_thw.tolist()
        meta = prepare(thw)
        return self.visual(pixel_values, grid_thw=thw, encoder_metadata=meta), meta["window_index"]

    # -- M-RoPE positions -------------------------------------------------------------------------------------
    def get_mrope_input_positions(self, input_tokens, mm_features):
        if self._vtk is None:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        merge = self.config.vision_config.spatial_merge_size
        pieces, st, nxt = [], 0, 0      # nxt: the next free position
        for f in sorted(mm_features, key=lambda f: f.mm_position.offset):
            if f.modality != "image":
                raise ValueError(f"vtoolkit pruning on {self._family} serves images only")
            offset, length = f.mm_position.offset, f.mm_position.length
            t, h, w = f.data["image_grid_thw"].data.tolist()
            text = offset - st
            pieces.append(torch.arange(text).expand(3, text) + nxt)
            base = nxt + text
            pieces.append(torch.full((3, length), base))            # filled in by recompute_mrope_positions
            nxt = base + max(t, h // merge, w // merge)
            st = offset + length
        if st < len(input_tokens):
            text = len(input_tokens) - st
            pieces.append(torch.arange(text).expand(3, text) + nxt)
        pos = torch.cat(pieces, 1) if pieces else torch.zeros(3, 0, dtype=torch.long)
        delta = int(pos.max()) + 1 - len(input_tokens) if pos.numel() else 0
        return pos.long(), delta

    def recompute_mrope_positions(self, input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens):
        ids = torch.as_tensor(input_ids, device="cpu")
        pos = mrope_positions.clone()
        stripped = [e[:, :-POS] for e in multimodal_embeddings]
        if multimodal_embeddings:
            rel = torch.cat([e[:, -POS:] for e in multimodal_embeddings]).round().long().cpu()
            img = ids == self.config.image_token_id
            idx = img.nonzero()[:, 0]
            first = int((idx < num_computed_tokens).sum())
            tok = idx[first:first + rel.shape[0]]
            prev = torch.cat([torch.zeros(1, dtype=torch.bool), img[:-1]])
            starts = (img & ~prev).nonzero()[:, 0]
            run = starts[torch.searchsorted(starts, tok, right=True) - 1]
            base = torch.where(run > 0, pos[0, (run - 1).clamp(min=0)].cpu() + 1, torch.zeros_like(run))
            pos[:, tok.to(pos.device)] = (base[None] + rel.T).to(pos.device, pos.dtype)
        delta = int(pos.max()) + 1 - ids.numel() if pos.numel() else 0
        if multimodal_embeddings:
            trace.record_positions(pos, delta)
        return stripped, pos, delta


class VtoolkitQwen2VLInfo(_BudgetInfo, Qwen2VLProcessingInfo):
    pass


class VtoolkitQwen2VLProcessor(_BudgetProcessor, Qwen2VLMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(VtoolkitQwen2VLProcessor, info=VtoolkitQwen2VLInfo,
                                        dummy_inputs=Qwen2VLDummyInputsBuilder)
class VtoolkitQwen2VL(_QwenPruning, Qwen2VLForConditionalGeneration):
    supports_multimodal_pruning = True      # per instance in __init__: False without a vtoolkit entry


class VtoolkitQwen2_5VLInfo(_BudgetInfo, Qwen2_5_VLProcessingInfo):
    pass


class VtoolkitQwen2_5VLProcessor(_BudgetProcessor, Qwen2_5_VLMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(VtoolkitQwen2_5VLProcessor, info=VtoolkitQwen2_5VLInfo,
                                        dummy_inputs=Qwen2_5_VLDummyInputsBuilder)
class VtoolkitQwen2_5VL(_QwenPruning, Qwen2_5_VLForConditionalGeneration):
    supports_multimodal_pruning = True
    _family = "Qwen2.5-VL"
