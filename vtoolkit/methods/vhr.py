"""VHR: vision-aware head reinforcement (He et al., "Cracking the code of hallucination in LVLMs with vision-aware
head divergence", ACL 2025, arXiv 2412.13949; docs/methods.md section 3).

For each sample, at the prefill (the position that predicts the first answer token), for every head ``i`` of every
reinforced layer ``l``, with ``A_l,i`` that head's slice of the ``o_proj`` input at the last prompt position::

    VHD[l, i] = || A_l,i(image + text) - A_l,i(text only) ||_2          (Euclidean, vision-aware head divergence)
    TA[l, i]  = || A_l,i(text only) ||_2^2
    VHD[l, i] = 0   where  VHD[l, i] > mean_l(VHD) + std_l(VHD)  and  TA[l, i] > mean_l(TA) + std_l(TA)
    H_l       = { i : VHD[l, i] > median_l(VHD) }                       (about half of the heads)
    o_proj input slice of head i in layer l  *=  alpha,   i in H_l, at every position, prefill and decode

- "text only" is the same prompt with every visual token removed from ``input_ids`` (Qwen: the vision start / end
  markers too), positions renumbered as for a prompt that never had an image. It runs as a *side stream*
  (:mod:`vtoolkit.hooks.sidestream`, lockstep mode): its rows go through each decoder layer right after the main
  stream computed that layer's head outputs, so the selection at layer ``l`` compares both streams with layers < l
  already reinforced - layer by layer in ONE pass (its rows never appear in the ``hidden_states`` / ``attentions``
  the user gets: :func:`vtoolkit.hooks.sidestream.side_active`). The chosen heads are scaled in BOTH streams (the paper is silent
  on the text-only stream; scaling both keeps it the paired counterfactual of the reinforced main stream).
- The selection is made once per sample at the prefill and frozen for the rest of the generation (the KV cache of
  earlier positions was computed with it). ``generate(use_cache=False)`` re-runs the whole sequence each step with
  the same frozen heads, so it gives the same tokens.
- mean / std / median are over the heads of one layer of one sample. std is the population std (the heads of a
  layer are the whole set, not a sample of it; with 32 heads the two differ by 1.6 %). The median of an even count
  is the mean of the two middle values, so ``> median`` selects half of the heads when values are distinct.
- Official defaults: ``alpha = 2``; layers: layer 1 and the last 14 of a 32-layer LLM (LLaVA-1.5 / NeXT 7B). For other
  depths ``L``: layer 1 and the last ``round(14 * L / 32)`` (half up). ``layers`` takes an explicit list (negative
  indices count from the end).
- The attention implementation is untouched (SDPA stays SDPA; VHR reads and scales ``o_proj`` inputs). The side
  stream needs masks in SDPA or eager format; flash / flex attention are refused with a clear error.

``h.stats``: ``vhd`` float ``[batch, num_layers, num_heads]`` (0 where a layer is not reinforced, and for outliers),
``selected_heads`` bool, same shape, ``layers`` (the reinforced layers), for the last call, one row per input sample.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from vtoolkit.config import MethodConfig
from vtoolkit.hooks.attention import current_implementation
from vtoolkit.hooks.masks import mask_dtype_for
from vtoolkit.hooks.sidestream import SideStream, in_side_stream, left_pad_rows
from vtoolkit.methods.base import Method
from vtoolkit.registry import register_method


@dataclass(frozen=True)
class VHRConfig(MethodConfig):
    """alpha: scale of the selected heads (> 0; 1 = no change); layers: reinforced decoder layers (None: layer 1 and
    the last round(14 * L / 32); negative indices count from the end)."""

    alpha: float = 2.0
    layers: tuple[int, ...] | None = None

    def validate(self) -> None:
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise ValueError(f"alpha (scale of the selected heads) must be a number > 0, got {self.alpha!r}")
        if self.layers is not None:
            layers = (self.layers,) if isinstance(self.layers, int) else self.layers
            if (not isinstance(layers, (list, tuple)) or not layers
                    or not all(isinstance(x, int) and not isinstance(x, bool) for x in layers)):
                raise ValueError(f"layers must be a non-empty list of layer indices (or None for the default), got "
                                 f"{self.layers!r}")
            object.__setattr__(self, "layers", tuple(layers))


@functools.cache
def _exact_in(value: float, dtype: torch.dtype) -> bool:
    """``value`` is representable in ``dtype`` without rounding."""
    return float(torch.tensor(value, dtype=dtype)) == value


def default_layers(num_layers: int) -> list[int]:
    """Layer 1 plus the last ``round(14 * L / 32)`` layers (the paper's 1 + 18..31 at L = 32)."""
    n = max(1, math.floor(14 * num_layers / 32 + 0.5))
    return sorted({1} | set(range(num_layers - n, num_layers)))


def head_selection(a_main: torch.Tensor, a_text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """VHD and the selected heads of one layer from head outputs ``[B, H, d]`` with and without the image.
    Returns ``(vhd [B, H] float32 with outliers zeroed, selected [B, H] bool)``."""
    vhd = (a_main.float() - a_text.float()).norm(dim=-1)
    ta = a_text.float().pow(2).sum(-1)

    def above(x):
        return x > x.mean(-1, keepdim=True) + x.std(-1, keepdim=True, correction=0)

    vhd = vhd.masked_fill(above(vhd) & above(ta), 0.0)
    median = torch.quantile(vhd, 0.5, dim=-1, keepdim=True)
    return vhd, vhd > median


@register_method("vhr", config=VHRConfig, kind="mitigate", stage="llm",
                 architectures=("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_onevision",
                                "internvl"),
                 requires=("o_proj inputs (any attention implementation)", "a text-only side stream at prefill"),
                 description="Vision-aware head reinforcement: scale the heads whose output depends most on the image")
class VHR(Method):
    def check(self) -> None:
        n = self.adapter.num_layers
        layers = self.config.layers if self.config.layers is not None else default_layers(n)
        bad = [x for x in layers if not -n <= x < n]
        if bad:
            raise ValueError(f"layers {bad} out of range for a {n}-layer LLM (use 0..{n - 1}, or negative indices)")
        self.layers = sorted({x % n for x in layers})
        try:
            mask_dtype_for(current_implementation(self.adapter.text_config), torch.float32)
        except NotImplementedError as e:
            raise NotImplementedError(f"vhr: its text-only side stream needs 'sdpa' or 'eager' attention in the LLM; "
                                      f"{e}") from None

    def install(self, hooks, ctx) -> None:
        self.ctx = ctx
        self.side: SideStream | None = None
        self.selected: dict[int, torch.Tensor] = {}
        self.vhd: dict[int, torch.Tensor] = {}
        self._a_main = None
        ctx.listeners.append(self)
        a = self.adapter
        hooks.forward_pre(a.language_model, self._start_side_stream, with_kwargs=True)
        last = self.layers[-1]
        for i in range(last + 1):
            if i not in self.layers:     # the side rows go through the layers between reinforced ones too
                hooks.forward_pre(a.decoder_layers[i], self._advance_hook(i), with_kwargs=True)
        for i in self.layers:
            hooks.forward_pre(a.o_proj(i), self._o_proj_hook(i), with_kwargs=False)

    # -- per call -------------------------------------------------------------------------------------------------
    def on_prefill(self, ctx) -> None:
        if ctx.new_call:
            self.side, self.selected, self.vhd, self._a_main = None, {}, {}, None
            self._stats = {}
            for i in self.layers:
                ctx.expect(f"vhr:select{i}", self.name, f"the head selection of layer {i} (text-only side stream "
                           f"paired with the prompt) did not run")
        else:      # generate(use_cache=False): later steps re-run the sequence with the frozen heads
            ctx.expect("vhr:scale", self.name, "the reinforced heads were not scaled in this forward")

    def on_step(self, ctx) -> None:
        if self.selected:
            ctx.expect("vhr:scale", self.name, "the reinforced heads were not scaled in this decode step")

    def _start_side_stream(self, module, args, kwargs):
        ctx = self.ctx
        if in_side_stream(self.adapter.model) or not (ctx.is_prefill and ctx.new_call) or self.side is not None:
            return None
        ids = ctx.inputs.get("input_ids")
        if ids is None:
            raise ValueError("vhr needs input_ids at prefill to build the text-only stream; this call passed only "
                             "inputs_embeds")
        emb = kwargs.get("inputs_embeds")
        dev = emb.device if emb is not None else ids.device
        ids = ids.to(dev)
        mask = ctx.inputs.get("attention_mask")
        keep = self.adapter.text_only_keep(ids)
        if mask is not None and mask.dim() == 2:
            keep &= mask.to(dev).bool()
        rows, valid = left_pad_rows([ids[b, keep[b]] for b in range(ids.shape[0])],
                                    pad_value=self._pad_id())
        embeds = self.adapter.model.get_input_embeddings()(rows)
        if emb is not None:
            embeds = embeds.to(emb.dtype)
        self.side = SideStream(self.adapter, self.name)
        self.side.set_rows(embeds, valid)
        self.side.start()
        return None

    def _pad_id(self) -> int:
        pid = getattr(self.adapter.text_config, "pad_token_id", None)
        return 0 if pid is None else int(pid)

    def _advance_hook(self, i: int):
        def hook(module, args, kwargs):
            if self.side is not None and self.side.running and not in_side_stream(self.adapter.model):
                self.side.advance(i)
            return None

        return hook

    def _o_proj_hook(self, i: int):
        H, d = self.adapter.num_heads, self.adapter.head_dim

        def hook(module, args):
            (x,) = args
            B, q, _ = x.shape
            heads = x.view(B, q, H, d)
            if in_side_stream(self.adapter.model):
                if self._a_main is None or self._a_main[0] != i:
                    return None                       # another method's side rows: not ours to touch
                vhd, sel = head_selection(self._a_main[1], heads[:, -1])
                # a row without visual tokens (a text-only prompt batched with image prompts) has no vision-aware
                # head: its two streams are the same prompt, and VHD there is only the rounding of different padding
                seen = (self.ctx.inputs["input_ids"] == self.adapter.image_token_id).any(1).to(vhd.device)
                vhd, sel = vhd * seen[:, None], sel & seen[:, None]
                self.vhd[i], self.selected[i] = vhd, sel
                self.ctx.mark(f"vhr:select{i}")
            else:
                if self.side is not None and self.side.running:       # prefill of a new call: pair the streams
                    self._a_main = (i, heads[:, -1].detach().clone())
                    self.side.advance(i)
                    self._a_main = None
                    if i == self.layers[-1]:
                        self.side.stop()
                        self._record_stats()
                sel = self.selected.get(i)
                if sel is None:
                    return None
                self.ctx.mark("vhr:scale")
            sel = self.selected[i].to(x.device)
            if sel.shape[0] != B:
                raise RuntimeError(f"vhr: heads were selected for {sel.shape[0]} rows, this forward has {B}")
            alpha = self.config.alpha
            if _exact_in(alpha, x.dtype):
                # one pass, one temporary: x * 1 is exact and x * alpha (alpha exact in x's dtype) rounds as
                # heads * alpha does, so this equals the where() below bit for bit
                scale = torch.where(sel, alpha, 1.0).to(x.dtype)[:, None, :, None]
                return ((heads * scale).view(B, q, H * d),)
            scaled = torch.where(sel[:, None, :, None], heads * alpha, heads)
            return (scaled.view(B, q, H * d),)

        return hook

    def _record_stats(self) -> None:
        rows = self.ctx.sample_rows if self.ctx.inputs.get("input_ids") is not None else None
        B, n, H = next(iter(self.selected.values())).shape[0], self.adapter.num_layers, self.adapter.num_heads
        vhd = torch.zeros(B, n, H)
        sel = torch.zeros(B, n, H, dtype=torch.bool)
        for i in self.layers:
            vhd[:, i] = self.vhd[i].cpu()
            sel[:, i] = self.selected[i].cpu()
        if rows is not None:
            vhd, sel = vhd[rows], sel[rows]
        self._stats = {"vhd": vhd, "selected_heads": sel, "layers": list(self.layers), "alpha": self.config.alpha}
