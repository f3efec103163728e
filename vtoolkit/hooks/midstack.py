"""Mid-stack visual-token removal: from decoder layer ``k`` on, the LLM runs on a shorter sequence.

Pre-hooks on decoder layers ``k..L-1``. At prefill, layer ``k`` receives the full hidden states; the method chooses
per sample which visual positions stay; the kept rows of ``hidden_states``, ``position_embeddings`` (cos, sin) and
``position_ids`` are gathered into a left-padded batch (kept tokens keep their original RoPE positions) and every
later layer gets a causal mask for the pruned length. The KV cache therefore holds full-length K/V in layers < k and
pruned K/V in layers >= k (``DynamicCache`` allows per-layer lengths); at decode steps layers >= k get a mask over
their own cache (kept prompt slots + generated tokens) instead of the layer-0-length mask HF builds.

Masks are produced in the format the incoming one has: boolean (SDPA; ``None`` counts as SDPA) or additive float
(eager). Pad slots attend to themselves only, so no attention row is empty.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from vtoolkit.compat import cache_length, get_cache
from vtoolkit.hooks.masks import causal_mask
from vtoolkit.hooks.sequence import is_identity, keep_plan
from vtoolkit.hooks.sidestream import in_side_stream
from vtoolkit.kernels import gather_kept


class MidStackPruner:
    def __init__(self, adapter, ctx, layer: int, select: Callable, owner: str = "pruning"):
        n = adapter.num_layers
        if not 1 <= layer < n:
            raise ValueError(f"layer must be in [1, {n - 1}] for a {n}-layer LLM, got {layer}")
        self.adapter, self.ctx, self.layer, self.select = adapter, ctx, layer, select
        self.owner = owner
        self.plan = None

    def install(self, hooks) -> None:
        for i in range(self.layer, self.adapter.num_layers):
            hooks.forward_pre(self.adapter.decoder_layers[i], self._make_hook(i), with_kwargs=True)
        self.ctx.listeners.append(self)

    def on_prefill(self, ctx) -> None:
        self.plan = None
        if ctx.has_visual:
            ctx.expect(f"{self.owner}:layer{self.layer}", self.owner, f"the pre-hook of decoder layer {self.layer} did "
                       f"not see this call's prefill, so no visual token was removed")

    def on_step(self, ctx) -> None:
        if self.plan is not None:
            ctx.expect(f"{self.owner}:decode", self.owner, f"the pre-hooks of decoder layers >= {self.layer} did not "
                       f"see this decode step, so their masks over the pruned cache were not applied")

    def _make_hook(self, i: int):
        def hook(module, args, kwargs):
            if in_side_stream(self.adapter.model):
                return None                  # another method's side rows run this layer with their own masks
            hidden = args[0] if args else kwargs["hidden_states"]
            # the context saw this forward start with an empty cache (layer 0's cache is already filled by now)
            if i == self.layer and self.ctx.is_prefill and self._is_full_prompt(hidden):
                self.ctx.mark(f"{self.owner}:layer{self.layer}")
                self._plan(hidden, kwargs)
            if self.plan is None:
                return None
            return self._rewrite(i, args, kwargs, hidden)

        return hook

    def _is_full_prompt(self, hidden) -> bool:
        ids = self.ctx.inputs.get("input_ids")
        return ids is not None and hidden.shape[1] == ids.shape[1]

    # ------------------------------------------------------------------------------------------------------------
    def _plan(self, hidden, kwargs):
        """Called at prefill when ``hidden`` covers the whole prompt (``_is_full_prompt``)."""
        self.plan = None
        ids = self.ctx.inputs["input_ids"]
        vis = ids == self.adapter.image_token_id
        if not bool(vis.any()):
            return
        keep_visual = self.select(self.ctx)
        B, L = ids.shape
        m2 = self.ctx.inputs.get("attention_mask")
        dev = hidden.device   # this layer's device (device_map may split the model)
        nonpad = m2.bool().to(dev) if m2 is not None else torch.ones(B, L, dtype=torch.bool, device=dev)
        keep_idx, valid = keep_plan(vis.to(dev), nonpad, keep_visual)
        if is_identity(keep_idx, L):
            return  # nothing dropped: the layers run unchanged
        self.plan = {"L": L, "keep_idx": keep_idx, "valid": valid, "per_device": {}}
        self.ctx.layout.add(self.layer, keep_idx, valid)

    def _rewrite(self, i, args, kwargs, hidden):
        p = self.plan
        kwargs = dict(kwargs)
        keep_idx, valid = p["keep_idx"], p["valid"]
        B, K = keep_idx.shape
        dev = hidden.device    # each layer gets its inputs on its own device (device_map may split the stack)
        if hidden.shape[1] == p["L"] and i == self.layer:          # prefill: shrink the sequence
            keep_idx, valid = keep_idx.to(dev), valid.to(dev)
            new_hidden, _, _ = gather_kept(hidden, keep_idx, None, None)
            pe = kwargs.get("position_embeddings")
            if pe is not None:
                kwargs["position_embeddings"] = tuple(
                    torch.gather(t.to(dev).expand(B, -1, -1), 1, keep_idx[..., None].expand(B, K, t.shape[-1]))
                    for t in pe)
            pos = kwargs.get("position_ids")
            if pos is not None and pos.dim() == 2 and pos.shape[-1] == p["L"]:
                kwargs["position_ids"] = torch.gather(pos.to(dev).expand(B, -1), 1, keep_idx)
            kwargs["attention_mask"] = causal_mask(valid, K, like=kwargs.get("attention_mask"))
            p["per_device"] = {dev: (kwargs["attention_mask"], kwargs.get("position_embeddings"),
                                     kwargs.get("position_ids"))}
            if args:
                args = (new_hidden,) + tuple(args[1:])
            else:
                kwargs["hidden_states"] = new_hidden
            return args, kwargs
        if hidden.shape[1] == K and self.ctx.is_prefill:            # prefill, layers after k
            if dev not in p["per_device"]:
                p["per_device"][dev] = _to(next(iter(p["per_device"].values())), dev)
            kwargs["attention_mask"], kwargs["position_embeddings"], kwargs["position_ids"] = p["per_device"][dev]
            return args, kwargs
        # decode: this layer's cache holds K prompt slots + the generated tokens so far
        self.ctx.mark(f"{self.owner}:decode")
        cache = get_cache(kwargs)
        past = cache_length(cache, i) if cache is not None else K
        q = hidden.shape[1]
        valid = valid.to(dev)
        keys = torch.cat([valid, torch.ones(B, past + q - K, dtype=torch.bool, device=dev)], 1)
        like = kwargs.get("attention_mask")
        kwargs["attention_mask"] = causal_mask(keys, q, like=like)
        return args, kwargs


def _to(obj, device):
    """Tensors (in tuples) moved to ``device``; None stays None."""
    if obj is None:
        return None
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    return type(obj)(_to(o, device) for o in obj)
