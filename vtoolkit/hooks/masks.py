"""Attention masks that hooks hand to decoder layers they call or rewrite, in the format the layer's attention
implementation expects (transformers builds its own only for the rows it knows about).

- SDPA (and ``None`` masks, which SDPA treats as causal): boolean ``[B, 1, q, Lk]``, True = may attend;
- eager: additive float ``[B, 1, q, Lk]`` (0 / dtype min);
- flash / flex attention take other mask forms and are refused by the methods that need these masks, except where
  :func:`install_flash_masks` turns a mid-stack pruner's masks into flash's 2-D padding mask (DART).
"""
from __future__ import annotations

import torch


def causal_mask(valid_keys: torch.Tensor, q_len: int, like: torch.Tensor | None = None,
                dtype: torch.dtype | None = None) -> torch.Tensor:
    """Mask for the last ``q_len`` of ``Lk = valid_keys.shape[1]`` key positions (queries at the end of the sequence,
    as in a prefill (``q_len == Lk``) or a decode step): query ``i`` sees the valid keys at positions ``<= i``.
    Pad slots (``valid_keys`` False) are seen by nobody but themselves, so no attention row is empty.

    The format follows ``like`` (a mask the layer would have received: bool -> bool, float -> additive of its dtype)
    or, without one, ``dtype`` (None -> bool for SDPA, a float dtype -> additive for eager)."""
    B, Lk = valid_keys.shape
    dev = valid_keys.device
    q_pos = torch.arange(Lk - q_len, Lk, device=dev)
    k_pos = torch.arange(Lk, device=dev)
    allowed = (k_pos[None, :] <= q_pos[:, None])[None] & valid_keys[:, None, :]
    allowed = (allowed | (k_pos[None, :] == q_pos[:, None])[None])[:, None]
    if like is not None:
        dtype = None if like.dtype == torch.bool else like.dtype
    if dtype is None:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=dev).masked_fill(~allowed, torch.finfo(dtype).min)


def mask_dtype_for(implementation: str, hidden_dtype: torch.dtype) -> torch.dtype | None:
    """The mask format :func:`causal_mask` should produce for an attention implementation (``None`` = bool)."""
    if implementation == "sdpa":
        return None
    if implementation == "eager":
        return hidden_dtype
    raise NotImplementedError(f"vtoolkit builds attention masks for 'sdpa' and 'eager' only, not {implementation!r}: "
                              f"model.set_attn_implementation({{'text_config': 'sdpa'}}) first")


def install_flash_masks(hooks, adapter, layers) -> None:
    """Let a mask-rewriting mid-stack pruner (:class:`~vtoolkit.hooks.midstack.MidStackPruner`) run on flash
    attention, which takes no 4-D mask but a 2-D padding mask ``[B, Lk]`` (True = a real key) or None.

    Install after the pruner: on each decoder layer in ``layers`` a first pre-hook puts the 2-D mask transformers
    built aside (so the pruner builds a boolean 4-D one, as for SDPA), and a last one turns the pruner's mask back into
    the flash form (the key row of the last query: the valid keys of each row, causal order is flash's own), or gives
    the layer its own mask back when the pruner did not rewrite it. The pruned rows are left-padded, so every row's
    real keys are one contiguous run at its end, which is what flash's un-padding expects."""
    state: dict[int, object] = {}

    def before(i):
        def hook(module, args, kwargs):
            mask = kwargs.get("attention_mask")
            state[i] = mask
            if mask is not None and mask.dim() == 2:
                return args, dict(kwargs, attention_mask=None)
            return None
        return hook

    def after(i):
        def hook(module, args, kwargs):
            mask, original = kwargs.get("attention_mask"), state.pop(i, None)
            if mask is None:
                return args, dict(kwargs, attention_mask=original)
            if mask.dim() == 4:
                keys = mask[:, 0, -1, :] if mask.dtype == torch.bool else mask[:, 0, -1, :] == 0
                return args, dict(kwargs, attention_mask=None if bool(keys.all()) else keys)
            return None
        return hook

    for i in layers:
        layer = adapter.decoder_layers[i]
        hooks.forward_pre(layer, before(i), with_kwargs=True, prepend=True)
        hooks.forward_pre(layer, after(i), with_kwargs=True)
