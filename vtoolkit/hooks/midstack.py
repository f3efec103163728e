"""Mid-stack visual-token removal: from decoder layer ``k`` on, the LLM runs on a shorter sequence.

Pre-hooks on decoder layers ``k..L-1``. At prefill, layer ``k`` receives the full hidden states; the method chooses
per sample which visual positions stay; the kept rows of ``hidden_states``, ``position_embeddings`` (cos, sin) and
``position_ids`` are gathered into a left-padded batch (kept tokens keep their original RoPE positions) and every
later layer gets a causal mask for the pruned length. The KV cache therefore holds full-length K/V in layers < k and
pruned K/V in layers >= k (``DynamicCache`` allows per-layer lengths); at decode steps layers >= k get a mask over
their own cache (kept prompt slots + generated tokens) instead of the layer-0-length mask HF builds.

**A removal layer chosen during the prefill** (DyVTE). With ``decide``, ``layer`` is only the first layer at which the
removal may start. At prefill the pre-hook of each layer ``i >= layer``, until the removal has started, calls
``decide(ctx, i, hidden)`` on that layer's input (the previous layer's output); it returns a ``[B]`` bool, True for the
rows whose selection applies from layer ``i`` on (a row that decided stays decided; ``None`` = no row decided yet).
``select`` is called once, when the first row decides. When every row has decided, the batch is rewritten as with a
fixed layer: the removal starts there (the speed-up comes from the first layer where all rows agree). Until then, a
row that decided keeps its length but the positions its selection drops are masked as keys in every later layer
(prefill and decode), so every row sees exactly what its own removal layer gives (a masked key gets weight 0, like a
removed one; the masked positions' own rows still run, but nothing reads them any more): a padded batch gives the
results of single runs.

KV cache of such masked layers: they cached the dropped positions of the rows that decided early, which every
decode mask hides. At the first decode step a masked layer's cache is compacted with
:func:`vtoolkit.kernels.compact_kv` to the positions each row still attends (left-padded), when that makes it
shorter (the rectangle is as wide as the longest row that still holds its tokens, so this pays when the rows that
decided early are the long ones); a cache whose layers are not plain growing tensors is left as it is (masked).
``ctx.layout`` describes the rows at prefill: masked layers keep the input's rows.

Masks are produced in the format the incoming one has: boolean (SDPA; ``None`` counts as SDPA) or additive float
(eager). Pad slots attend to themselves only, so no attention row is empty.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from vtoolkit.compat import cache_layer_kv, cache_length, get_cache, set_cache_layer_tensors
from vtoolkit.hooks.masks import causal_mask
from vtoolkit.hooks.sequence import is_identity, keep_plan
from vtoolkit.hooks.sidestream import in_side_stream
from vtoolkit.kernels import compact_kv, gather_kept


class MidStackPruner:
    def __init__(self, adapter, ctx, layer: int, select: Callable, owner: str = "pruning",
                 decide: Callable | None = None):
        n = adapter.num_layers
        if not 1 <= layer < n:
            raise ValueError(f"layer must be in [1, {n - 1}] for a {n}-layer LLM, got {layer}")
        self.adapter, self.ctx, self.layer, self.select = adapter, ctx, layer, select
        self.owner = owner
        self.decide = decide
        self.plan = None
        self.removal_layer = layer   # the layer the current plan removes from (= layer unless `decide` chose later)
        self.masked: dict[int, dict] = {}   # layer -> its key layout while rows are masked instead of removed
        self.cache_layout: dict[int, dict] = {}   # masked layer -> the layout of its cache at decode (compacted)
        self._rows = None            # this prefill's visual / non-pad masks and selection

    def install(self, hooks) -> None:
        for i in range(self.layer, self.adapter.num_layers):
            hooks.forward_pre(self.adapter.decoder_layers[i], self._make_hook(i), with_kwargs=True)
        self.adapter.install_llm_extras(hooks, self.ctx)   # e.g. Qwen3-VL DeepStack follows the kept rows
        self.ctx.listeners.append(self)

    def on_prefill(self, ctx) -> None:
        self._reset()
        if ctx.has_visual:
            ctx.expect(f"{self.owner}:layer{self.layer}", self.owner, f"the pre-hook of decoder layer {self.layer} did "
                       f"not see this call's prefill, so no visual token was removed")

    def on_step(self, ctx) -> None:
        if self.plan is not None or self.masked:
            ctx.expect(f"{self.owner}:decode", self.owner, f"the pre-hooks of decoder layers >= {self.layer} did not "
                       f"see this decode step, so their masks over the pruned cache were not applied")

    def _make_hook(self, i: int):
        def hook(module, args, kwargs):
            if in_side_stream(self.adapter.model):
                return None                  # another method's side rows run this layer with their own masks
            hidden = args[0] if args else kwargs["hidden_states"]
            # the context saw this forward start with an empty cache (layer 0's cache is already filled by now)
            if self.ctx.is_prefill and self.plan is None and self._is_full_prompt(hidden):
                if i == self.layer:
                    self.ctx.mark(f"{self.owner}:layer{self.layer}")
                    self._start(hidden)
                if self._rows is not None:
                    if self.decide is None:
                        if i == self.layer:
                            self._plan(i, hidden.device)
                    else:
                        self._decide(i, hidden)
            if self.plan is not None and i >= self.removal_layer:
                return self._rewrite(i, args, kwargs, hidden)
            if i in self.masked:
                return self._masked(i, args, kwargs, hidden)
            return None

        return hook

    def _reset(self) -> None:
        self.plan, self.masked, self.cache_layout, self._rows, self.removal_layer = None, {}, {}, None, self.layer

    def _is_full_prompt(self, hidden) -> bool:
        ids = self.ctx.inputs.get("input_ids")
        return ids is not None and hidden.shape[1] == ids.shape[1]

    # ------------------------------------------------------------------------------------------------------------
    def _start(self, hidden) -> None:
        """Called at prefill when ``hidden`` covers the whole prompt (``_is_full_prompt``), in layer ``self.layer``."""
        self._reset()
        ids = self.ctx.inputs["input_ids"]
        vis = ids == self.adapter.image_token_id
        if not bool(vis.any()):
            return
        B, L = ids.shape
        m2 = self.ctx.inputs.get("attention_mask")
        dev = hidden.device   # this layer's device (device_map may split the model)
        nonpad = m2.bool().to(dev) if m2 is not None else torch.ones(B, L, dtype=torch.bool, device=dev)
        self._rows = {"vis": vis.to(dev), "nonpad": nonpad, "keep_visual": None, "gone": None}

    def _selection(self):
        r = self._rows
        if r["keep_visual"] is None:
            r["keep_visual"] = self.select(self.ctx)
        return r["keep_visual"]

    def _plan(self, i: int, dev) -> None:
        r = self._rows
        keep_idx, valid = keep_plan(r["vis"].to(dev), r["nonpad"].to(dev), self._selection())
        if is_identity(keep_idx, r["vis"].shape[1]):
            return  # nothing dropped: the layers run unchanged
        self.plan = {"L": r["vis"].shape[1], "keep_idx": keep_idx, "valid": valid, "per_device": {}}
        self.removal_layer = i
        self.ctx.layout.add(i, keep_idx, valid)

    def _decide(self, i: int, hidden) -> None:
        """Ask ``decide`` which rows are done at layer ``i``; remove (all done) or mask (some done) from here on."""
        r = self._rows
        gone = self.decide(self.ctx, i, hidden)
        if gone is None or not bool(gone.any()):
            return
        dev = hidden.device
        gone = gone.to(dev, torch.bool).clone()      # the caller may keep updating its own tensor
        if bool(gone.all()):
            self._plan(i, dev)
            return
        prev = r["gone"]
        if prev is not None and torch.equal(prev["gone"], gone):       # nothing new: same keys as the layer before
            self.masked[i] = prev["entry"]
            return
        keep_visual = self._selection()
        vis, nonpad = r["vis"].to(dev), r["nonpad"].to(dev)
        kept = torch.zeros_like(vis)
        for b, kv in enumerate(keep_visual):
            if kv is None:
                kept[b] = vis[b]
            else:
                kept[b, kv.to(dev)] = True
        dropped = vis & nonpad & ~kept & gone[:, None]
        entry = {"valid": nonpad & ~dropped, "masks": {},
                 "keep_visual": [kv if bool(g) else None for kv, g in zip(keep_visual, gone.tolist())]}
        r["gone"] = {"gone": gone, "entry": entry}
        self.masked[i] = entry

    def _masked(self, i, args, kwargs, hidden):
        """A layer before the removal in which some rows mask the positions they dropped."""
        entry = self.masked[i]
        kwargs = dict(kwargs)
        dev = hidden.device
        like = kwargs.get("attention_mask")
        like = like.to(dev) if like is not None else None
        if self.ctx.is_prefill and hidden.shape[1] == entry["valid"].shape[1]:
            key = (dev, like.dtype if like is not None else torch.bool)
            if key not in entry["masks"]:
                entry["masks"][key] = causal_mask(entry["valid"].to(dev), hidden.shape[1], like=like)
            kwargs["attention_mask"] = entry["masks"][key]
            return args, kwargs
        self.ctx.mark(f"{self.owner}:decode")
        cache = get_cache(kwargs)
        if i not in self.cache_layout:      # first decode step of this call: compact the cache where it pays
            self.cache_layout[i] = self._compact(i, entry, cache) or entry
        valid = self.cache_layout[i]["valid"].to(dev)
        kwargs["attention_mask"] = self._decode_mask(i, cache, valid, hidden, like)
        return args, kwargs

    def _compact(self, i, entry, cache) -> dict | None:
        """Shrink layer ``i``'s cache to the positions its rows still attend when that is shorter; returns the new
        layout (``valid``, ``keep_idx`` over the compacted prompt slots), or None when the cache stays as it is."""
        r = self._rows
        L = entry["valid"].shape[1]
        kv = cache_layer_kv(cache, i) if cache is not None else None
        if kv is None or kv[0].shape[-2] != L:
            return None
        dev = kv[0].device
        keep_idx, valid = keep_plan(r["vis"].to(dev), r["nonpad"].to(dev), entry["keep_visual"])
        if keep_idx.shape[1] >= L:
            return None
        keys, values = compact_kv(kv[0], kv[1], keep_idx)
        set_cache_layer_tensors(cache, i, keys, values)
        return {"valid": valid, "keep_idx": keep_idx}

    def _decode_mask(self, i, cache, valid, hidden, like):
        """Mask for a decode step of layer ``i``, whose cache holds ``valid.shape[1]`` prompt slots + generated."""
        B, P = valid.shape
        past = cache_length(cache, i) if cache is not None else P
        q = hidden.shape[1]
        keys = torch.cat([valid, torch.ones(B, past + q - P, dtype=torch.bool, device=valid.device)], 1)
        return causal_mask(keys, q, like=like)

    def _rewrite(self, i, args, kwargs, hidden):
        p = self.plan
        kwargs = dict(kwargs)
        keep_idx, valid = p["keep_idx"], p["valid"]
        B, K = keep_idx.shape
        dev = hidden.device    # each layer gets its inputs on its own device (device_map may split the stack)
        if hidden.shape[1] == p["L"] and i == self.removal_layer:    # prefill: shrink the sequence
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
        like = kwargs.get("attention_mask")
        kwargs["attention_mask"] = self._decode_mask(i, get_cache(kwargs), valid.to(dev), hidden,
                                                     like.to(dev) if like is not None else None)
        return args, kwargs


def _to(obj, device):
    """Tensors (in tuples) moved to ``device``; None stays None."""
    if obj is None:
        return None
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    return type(obj)(_to(o, device) for o in obj)
