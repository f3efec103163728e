"""Attention masks that hooks hand to decoder layers they call or rewrite, in the format the layer's attention
implementation expects (transformers builds its own only for the rows it knows about).

- SDPA (and ``None`` masks, which SDPA treats as causal): boolean ``[B, 1, q, Lk]``, True = may attend;
- eager: additive float ``[B, 1, q, Lk]`` (0 / dtype min);
- flash / flex attention take other mask forms and are refused by the methods that need these masks.
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
