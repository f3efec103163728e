"""Pre-LLM sequence rewriting: drop visual tokens from the LLM input, per sample, under stock ``generate``.

A forward pre-hook on the language model sees ``inputs_embeds``, ``attention_mask``, ``position_ids`` and the KV
cache. At prefill (empty cache) it asks the method which visual positions each sample keeps, gathers the kept rows
(text tokens are always kept) into a left-padded rectangular batch, and remembers the plan. At decode steps it drops
the pruned columns from the mask that ``generate`` keeps at the unpruned length, and shifts positions.

Position policies (``positions=``):
- ``"contiguous"`` (official FasterVLM on LLaVA): the pruned sequence is numbered 0..L'-1 as if it had been the input;
  decode positions continue from L'.
- ``"original"``: kept tokens keep their unpruned positions (gaps where tokens were dropped); decode positions
  continue after the unpruned length. M-RoPE models (Qwen2-VL / 2.5-VL) support only this policy: the kept tokens
  keep their (t, h, w) from ``get_rope_index`` on the unpruned input, row 0 of generate's 4-row ids (used only for
  mask construction) is renumbered contiguously, and ``rope_deltas`` is set to ``max_pos + 1 - L'`` per sample so a
  cache-length-based decode step continues correctly.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from vtoolkit.compat import cache_length, get_cache
from vtoolkit.hooks.sidestream import in_side_stream
from vtoolkit.kernels import gather_kept

POLICIES = ("contiguous", "original")
_FORCE_REWRITE = False


@contextlib.contextmanager
def force_rewrite():
    """Tests: rewrite the sequence even when a plan keeps every position, so that "keep everything == baseline"
    checks the gather / mask / position path, not the do-nothing shortcut."""
    global _FORCE_REWRITE
    old, _FORCE_REWRITE = _FORCE_REWRITE, True
    try:
        yield
    finally:
        _FORCE_REWRITE = old


@dataclass
class PrunePlan:
    length: int                 # unpruned prompt length L
    keep_idx: torch.Tensor      # [B, K] source positions (left pad slots point at leading positions)
    valid: torch.Tensor         # [B, K] bool, False at pad slots
    shift: torch.Tensor         # [B] tokens dropped per sample (non-pad L_b - kept_b)


def keep_plan(vis: torch.Tensor, nonpad: torch.Tensor, keep_visual) -> tuple[torch.Tensor, torch.Tensor]:
    """Which source positions each sample keeps, as a left-padded rectangle.

    ``vis``/``nonpad``: ``[B, L]`` bool; ``keep_visual[b]``: the visual positions sample ``b`` keeps (``None``: all).
    Every non-pad text token is kept. Returns ``keep_idx [B, K]`` (sorted; the ``K - n_b`` leading pad slots point at
    positions ``0..K-n_b-1``, which are the original pads when nothing is dropped) and ``valid [B, K]``.
    """
    B, L = vis.shape
    rows = []
    for b in range(B):
        keep = nonpad[b] & ~vis[b]
        if keep_visual[b] is None:
            keep = keep | (vis[b] & nonpad[b])
        else:
            keep[keep_visual[b].to(keep.device)] = True
        rows.append(keep.nonzero().flatten())
    K = max(r.numel() for r in rows)
    keep_idx = torch.empty(B, K, dtype=torch.long, device=vis.device)
    valid = torch.zeros(B, K, dtype=torch.bool, device=vis.device)
    for b, r in enumerate(rows):
        pad = K - r.numel()
        keep_idx[b, :pad] = torch.arange(pad, device=vis.device)
        keep_idx[b, pad:] = r
        valid[b, pad:] = True
    return keep_idx, valid


def is_identity(keep_idx: torch.Tensor, length: int) -> bool:
    """True when the plan keeps every position of every sample (nothing to rewrite; see :func:`force_rewrite`)."""
    if _FORCE_REWRITE:
        return False
    return keep_idx.shape[1] == length and bool((keep_idx == torch.arange(length, device=keep_idx.device)).all())


class SequencePruner:
    """Installs the language-model pre-hook. ``select(ctx) -> list[Tensor]``: per sample, sorted sequence
    positions of the *visual* tokens to keep (or ``None`` to keep that sample's visual tokens). While ``select`` runs,
    ``ctx.llm_input_embeds`` holds the prefill's ``inputs_embeds`` ``[B, L, D]`` (the projected visual rows as the LLM
    would see them, unpruned); it is ``None`` otherwise."""

    def __init__(self, adapter, ctx, select: Callable, positions: str, owner: str = "pruning"):
        if positions not in POLICIES:
            raise ValueError(f"positions must be one of {POLICIES}, got {positions!r}")
        if adapter.position_kind == "mrope" and positions != "original":
            raise ValueError("positions='contiguous' is defined for 1-D RoPE only; M-RoPE models (Qwen2-VL, "
                             "Qwen2.5-VL) keep the kept tokens' original 3-D positions: use positions='original'")
        self.adapter = adapter
        self.ctx = ctx
        self.select = select
        self.positions = positions
        self.owner = owner
        self.plan: PrunePlan | None = None

    def install(self, hooks) -> None:
        hooks.forward_pre(self.adapter.language_model, self._pre, with_kwargs=True)
        self.adapter.install_llm_extras(hooks, self.ctx)   # e.g. Qwen3-VL DeepStack follows the kept rows
        self.ctx.listeners.append(self)

    def on_prefill(self, ctx) -> None:
        self.plan = None
        if ctx.has_visual:
            ctx.expect(f"{self.owner}:prefill", self.owner, "the language-model pre-hook did not see this call's "
                       "prefill, so no visual token was pruned")

    def on_step(self, ctx) -> None:
        if self.plan is not None:
            ctx.expect(f"{self.owner}:decode", self.owner, "the language-model pre-hook did not see this decode "
                       "step, so the pruned sequence's attention mask and positions were not applied")

    # ------------------------------------------------------------------------------------------------------------
    def _pre(self, module, args, kwargs):
        if in_side_stream(self.adapter.model):
            return None                      # another method's side rows (e.g. a contrast stream): not ours
        if args:
            raise TypeError("vtoolkit expects the language model to be called with keyword arguments")
        emb = kwargs.get("inputs_embeds")
        if emb is None:
            return None
        cache = get_cache(kwargs)
        if cache_length(cache) == 0:
            self.ctx.mark(f"{self.owner}:prefill")
            return self._prefill(kwargs, emb)
        if self.plan is not None:
            self.ctx.mark(f"{self.owner}:decode")
            return self._decode(kwargs, cache_length(cache) + emb.shape[1], emb.device)
        return None

    def _prefill(self, kwargs, emb):
        self.plan = None
        ids = self.ctx.inputs.get("input_ids")
        if ids is None:
            if self.ctx.inputs.get("pixel_values") is not None:
                raise ValueError("visual-token pruning needs input_ids at prefill to find the visual tokens; this "
                                 "call passed only inputs_embeds")
            return None
        if ids.shape[1] != emb.shape[1]:
            raise RuntimeError(f"the language model received {emb.shape[1]} positions for {ids.shape[1]} input ids: "
                               f"another hook already rewrote the sequence")
        vis = ids == self.adapter.image_token_id
        if not bool(vis.any()):
            return None
        self.ctx.llm_input_embeds = emb   # what the LLM would see: feature-based pruners (DivPrune) read it
        try:
            keep_visual = self.select(self.ctx)
        finally:
            self.ctx.llm_input_embeds = None
        B, L = ids.shape
        mask = kwargs.get("attention_mask")
        mask2d = mask if (mask is not None and mask.dim() == 2) else None
        if mask is not None and mask2d is None:
            raise ValueError("vtoolkit pruning needs a 2-D attention_mask (or none), got a "
                             f"{mask.dim()}-D mask")
        dev = emb.device   # plan where the LLM's first layer lives (input_ids may sit elsewhere with device_map)
        nonpad = mask2d.bool().to(dev) if mask2d is not None else torch.ones(B, L, dtype=torch.bool, device=dev)
        keep_idx, valid = keep_plan(vis.to(dev), nonpad, keep_visual)
        K = keep_idx.shape[1]
        shift = nonpad.sum(1) - valid.sum(1)
        self.plan = PrunePlan(L, keep_idx, valid, shift)
        if is_identity(keep_idx, L):
            return None  # nothing dropped anywhere: the batch is already what the LLM should see
        self.ctx.layout.add(0, keep_idx, valid)

        pos = kwargs.get("position_ids")
        if pos is None and self.positions == "original":
            pos = torch.arange(L, device=dev).expand(B, L)
        elif pos is not None:
            pos = pos.to(dev)
        new_emb, new_pos, _ = gather_kept(emb, keep_idx, pos, None)
        new_mask = valid.to(mask2d.dtype if mask2d is not None else torch.long)   # kept tokens are never pads
        if new_pos is not None:
            contiguous = (valid.long().cumsum(-1) - 1).masked_fill(~valid, 0)
            if self.positions == "contiguous":
                new_pos = contiguous.view(*([1] * (new_pos.dim() - 2)), B, K).expand_as(new_pos).clone()
            elif new_pos.dim() == 3 and new_pos.shape[0] == 4:   # generate's row 0: text positions for masks
                new_pos = new_pos.clone()
                new_pos[0] = contiguous
        self._fix_rope_deltas(new_pos, valid, K)
        kwargs = dict(kwargs)
        kwargs.update(inputs_embeds=new_emb, attention_mask=new_mask)
        if new_pos is not None:
            kwargs["position_ids"] = new_pos
        return (), kwargs

    def _fix_rope_deltas(self, pos, valid, K):
        core = self.adapter.core
        if self.adapter.position_kind != "mrope" or pos is None or getattr(core, "rope_deltas", None) is None:
            return
        rope = pos[1:] if pos.shape[0] == 4 else pos
        max_pos = rope.masked_fill(~valid[None], -1).amax(dim=(0, 2))
        core.rope_deltas = (max_pos + 1 - K).view(-1, 1).to(core.rope_deltas.device, core.rope_deltas.dtype)

    def _decode(self, kwargs, total: int, dev):
        """``total``: key length of this step in the pruned coordinates (cache + new tokens); ``dev``: the device of
        the language model's input (the mask is built there, wherever generate keeps its own)."""
        plan = self.plan
        kwargs = dict(kwargs)
        mask = kwargs.get("attention_mask")
        K = plan.keep_idx.shape[1]
        keep_idx, valid = plan.keep_idx.to(dev), plan.valid.to(dev)
        if mask is not None and mask.dim() == 2 and mask.shape[1] > plan.length:
            # generate keeps the mask at the unpruned length: drop the pruned columns
            mask = mask.to(dev)
            head = torch.gather(mask[:, : plan.length], 1, keep_idx) * valid.to(mask.dtype)
            kwargs["attention_mask"] = torch.cat([head, mask[:, plan.length:]], dim=1)
        elif mask is None and not bool(plan.valid.all()):
            # generate drops an all-ones mask; a sample that kept fewer tokens than another has pad slots to mask
            tail = torch.ones(valid.shape[0], total - K, dtype=torch.long, device=dev)
            kwargs["attention_mask"] = torch.cat([valid.long(), tail], dim=1)
        pos = kwargs.get("position_ids")
        if pos is not None:
            pos = pos.to(dev)
            shift = plan.shift.to(dev, pos.dtype)
            if self.positions == "contiguous":
                kwargs["position_ids"] = pos - shift.view(*([1] * (pos.dim() - 2)), -1, 1)
            elif pos.dim() == 3 and pos.shape[0] == 4:
                pos = pos.clone()
                pos[0] = pos[0] - shift.view(-1, 1)
                kwargs["position_ids"] = pos
        return (), kwargs
