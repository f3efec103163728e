"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL: no CLS token, 2x2 patch merger, M-RoPE positions with ``rope_deltas``."""
from __future__ import annotations

import torch

from vtoolkit.models.base import ImageSpan, ModelAdapter
from vtoolkit.registry import register_adapter


@register_adapter("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
class QwenVLAdapter(ModelAdapter):
    family = "qwen_vl"
    position_kind = "mrope"
    has_cls = False

    @property
    def visual_marker_ids(self) -> tuple[int, ...]:
        return tuple(t for t in (self.config.vision_start_token_id, self.config.vision_end_token_id) if t is not None)

    @property
    def vision_tower(self):
        return self.core.visual

    @property
    def vision_layers(self):
        return self.vision_tower.blocks

    def vision_attention(self, layer: int):
        return self.vision_layers[layer].attn

    @property
    def projector(self):
        return self.vision_tower.merger

    @property
    def merge_size(self) -> int:
        return self.vision_config.spatial_merge_size

    def full_attention_layers(self) -> list[int]:
        """ViT blocks that attend over the whole image (Qwen2.5-VL: ``fullatt_block_indexes``; others: all)."""
        full = getattr(self.vision_config, "fullatt_block_indexes", None)
        return list(full) if full else list(range(len(self.vision_layers)))

    def window_index(self, grid_thw: torch.Tensor) -> torch.Tensor | None:
        """Qwen2.5-VL's merged-token window permutation (ViT order -> raster order is ``argsort`` of it)."""
        vt = self.vision_tower
        if not hasattr(vt, "permute_input_for_window_attn"):   # no window attention (Qwen2-VL, Qwen3-VL)
            return None
        from transformers.vision_utils import get_vision_window_index

        return get_vision_window_index(grid_thw, spatial_merge_size=vt.spatial_merge_size, window_size=vt.window_size,
                                       patch_size=vt.patch_size)[0]

    def vision_feature_layer(self) -> int:
        return len(self.vision_layers) - 1

    def image_token_counts(self, inputs, encoded: bool = False) -> list[int]:
        thw = inputs.get("image_grid_thw")
        if thw is None:
            return []
        return (thw.prod(-1) // self.merge_size**2).tolist()

    def image_pixels(self, inputs, image_index: int):
        counts = inputs["image_grid_thw"].prod(-1).tolist()          # patches per image, flattened over the batch
        start = sum(counts[:image_index])
        return inputs["pixel_values"][start:start + counts[image_index]]

    def image_frames(self, inputs, image_index: int):
        """A still image is repeated into ``temporal_patch_size`` frames by the processor; each row of
        ``pixel_values`` is one patch flattened as ``[channel, time, patch, patch]``: view ``[T, N, C, p, p]``."""
        rows = self.image_pixels(inputs, image_index)
        vc = self.vision_config
        t, p = vc.temporal_patch_size, vc.patch_size
        return rows.view(rows.shape[0], -1, t, p, p).permute(2, 0, 1, 3, 4)

    def image_spans(self, inputs):
        self._thw = inputs.get("image_grid_thw")
        try:
            return super().image_spans(inputs)
        finally:
            del self._thw

    def _make_span(self, positions, image_index, inputs) -> ImageSpan:
        t, h, w = self._thw[image_index].tolist()
        return ImageSpan(positions=positions, image_index=image_index, crops=[positions],
                         grid=(t * h // self.merge_size, w // self.merge_size))

    def rope_index(self, inputs, attention_mask=None):
        """M-RoPE positions ``[3, B, L]`` and ``rope_deltas [B, 1]`` of the (unpruned) input, as HF computes them."""
        kw = {k: inputs[k] for k in ("image_grid_thw", "video_grid_thw") if inputs.get(k) is not None}
        if inputs.get("mm_token_type_ids") is not None:
            kw["mm_token_type_ids"] = inputs["mm_token_type_ids"]
        return self.core.get_rope_index(inputs["input_ids"], attention_mask=attention_mask, **kw)

    @property
    def num_deepstack(self) -> int:
        """Qwen3-VL: how many LLM layers get DeepStack features (one per ``deepstack_visual_indexes`` entry)."""
        return len(getattr(self.vision_config, "deepstack_visual_indexes", None) or [])

    def install_llm_extras(self, hooks, ctx) -> None:
        """Qwen3-VL DeepStack under sequence rewriting. HF adds ``deepstack_visual_embeds[i]`` (features of an
        intermediate ViT layer, one row per visual token of the input) to the output of LLM layer ``i`` at the rows
        ``visual_pos_masks`` marks, both at the input's length. Once a pruner drops rows (before the LLM, or at a
        layer <= the last DeepStack layer), those no longer line up. So while a rewriter is active, vtoolkit does the
        same addition itself: a language-model pre-hook takes both inputs away from HF, and a pre-hook on layer
        ``i + 1`` (the final norm after the last layer) adds to each row that holds visual token ``t`` of the input
        (``ctx.layout`` at layer ``i`` says which) the row ``t`` of ``deepstack_visual_embeds[i]``: dropped tokens'
        features are dropped in every DeepStack tensor; with nothing dropped this is HF's computation exactly."""
        n = self.num_deepstack
        if not n or getattr(ctx, "_deepstack_installed", False):
            return
        ctx._deepstack_installed = True
        from vtoolkit.hooks.sidestream import in_side_stream

        state = {"embeds": None, "mask": None}
        model = self.model

        def take(module, args, kwargs):
            if in_side_stream(model):
                return None
            embeds = kwargs.get("deepstack_visual_embeds")
            state["embeds"], state["mask"] = embeds, kwargs.get("visual_pos_masks")
            if embeds is None:
                return None
            return args, dict(kwargs, deepstack_visual_embeds=None, visual_pos_masks=None)

        def add(i):
            def hook(module, args, kwargs):
                embeds, mask = state["embeds"], state["mask"]
                if embeds is None or i >= len(embeds) or in_side_stream(model):
                    return None
                hidden = args[0] if args else kwargs["hidden_states"]
                mask = mask.to(hidden.device)
                B, L = mask.shape
                rank = (mask.flatten().long().cumsum(0) - 1).view(B, L)   # row of each visual token in embeds
                lay = ctx.layout.at(i)
                if lay is None:
                    src = torch.arange(L, device=hidden.device).expand(B, L)
                    valid = torch.ones(B, L, dtype=torch.bool, device=hidden.device)
                else:
                    src, valid = lay[0].to(hidden.device), lay[1].to(hidden.device)
                if src.shape != hidden.shape[:2]:
                    raise RuntimeError(f"DeepStack: layer {i} holds {tuple(hidden.shape[:2])} rows but the layout "
                                       f"says {tuple(src.shape)}")
                vis = torch.gather(mask, 1, src) & valid
                rows = torch.gather(rank, 1, src)[vis]
                hidden = hidden.clone()
                hidden[vis] = hidden[vis] + embeds[i].to(hidden.device, hidden.dtype)[rows]
                if args:
                    return (hidden, *args[1:]), kwargs
                return args, dict(kwargs, hidden_states=hidden)
            return hook

        hooks.forward_pre(self.language_model, take, with_kwargs=True, prepend=True)
        for i in range(n):
            nxt = self.decoder_layers[i + 1] if i + 1 < self.num_layers else self.language_model.norm
            hooks.forward_pre(nxt, add(i), with_kwargs=True, prepend=True)

    def side_llm_inputs(self, ctx, columns, valid, encoder_output=None) -> dict:
        """Qwen3-VL: DeepStack for side-stream rows (contrastive decoding's contrast prompt). Rule: a side row that
        holds visual token ``t`` of this call's input gets the DeepStack rows of token ``t`` of the encoding it was
        embedded from - ``encoder_output`` (VCD: the noised image's DeepStack features, entries per encoded image,
        placed by the call's image spans as its embeddings are) or this call's own encoding (DAMRO: the outlier
        tokens' own rows, i.e. every DeepStack tensor gathered with the outlier indices, in the order they are fed).
        So the side stream is the stock model on the side prompt: HF's ``visual_pos_masks`` are the side rows'
        visual positions and ``deepstack_visual_embeds[i]`` their features, row-major, as HF builds them."""
        if not self.num_deepstack:
            return {}
        ids = ctx.inputs["input_ids"]
        dev = columns.device
        vis_in = (ids == self.image_token_id).to(dev)
        if encoder_output is None:
            enc = ctx.encoder_output()
            blocks = [list(layer) for layer in enc.deepstack_features]   # per layer: one entry per placeholder block
        else:
            blocks = [[list(layer)[span.image_index] for row in ctx.spans for span in row]
                      for layer in encoder_output.deepstack_features]
        flat = [torch.cat([b.reshape(-1, b.shape[-1]) for b in layer]).to(dev) for layer in blocks]
        if any(f.shape[0] != int(vis_in.sum()) for f in flat):
            raise RuntimeError(f"DeepStack: {int(vis_in.sum())} visual placeholders for "
                               f"{[f.shape[0] for f in flat]} DeepStack rows")
        B, L = vis_in.shape
        rank = (vis_in.flatten().long().cumsum(0) - 1).view(B, L)      # row of each visual token in the DeepStack
        vis = torch.gather(vis_in, 1, columns) & valid.to(dev)
        rows = torch.gather(rank, 1, columns)[vis]
        return {"visual_pos_masks": vis, "deepstack_visual_embeds": [f[rows] for f in flat]}

    def widen_llm_inputs(self, main_kwargs, side_inputs) -> dict | None:
        """Qwen3-VL: main + side DeepStack inputs for one batched prefill (masks stacked over the ``2B`` rows, each
        DeepStack tensor the main rows' then the side rows' - row-major over the stacked mask, as HF reads it). None
        when the main call's DeepStack inputs are not in ``main_kwargs`` (a sequence rewriter took them: the adapter
        adds them itself, on the main rows only)."""
        if not side_inputs:
            return {}
        mask, deep = main_kwargs.get("visual_pos_masks"), main_kwargs.get("deepstack_visual_embeds")
        side_mask, side_deep = side_inputs["visual_pos_masks"], side_inputs["deepstack_visual_embeds"]
        if mask is None or deep is None or len(deep) != len(side_deep) or mask.shape != side_mask.shape:
            return None
        return {"visual_pos_masks": torch.cat([mask, side_mask.to(mask.device)], 0),
                "deepstack_visual_embeds": [torch.cat([a, b.to(a.device, a.dtype)], 0) for a, b in zip(deep, side_deep)]}

    def format_prompt(self, processor, question: str, num_images: int = 1) -> str:
        content = [{"type": "image"}] * num_images + [{"type": "text", "text": question}]
        return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
