"""Torch reference implementations of the kernels (the CPU path, and the oracle the Triton kernels are tested against)."""
from __future__ import annotations

import torch


def _expand_pos(position_ids: torch.Tensor, B: int) -> torch.Tensor:
    """``[B, L]`` / ``[1, L]`` / ``[R, B, L]`` -> ``[R, B, L]`` (a view)."""
    if position_ids.dim() == 2:
        return position_ids.expand(B, -1)[None]
    if position_ids.dim() == 3:
        return position_ids.expand(-1, B, -1)
    raise ValueError(f"position_ids must be [B, L] or [R, B, L], got shape {tuple(position_ids.shape)}")


def gather_kept_torch(hidden, keep_idx, position_ids=None, attention_mask=None):
    """Gather kept rows per sample. ``hidden [B, L, D]``, ``keep_idx [B, K]`` (int64), ``position_ids [B, L]`` or
    ``[R, B, L]``, ``attention_mask [B, L]`` -> ``(hidden [B, K, D], position_ids [..., B, K], mask [B, K])``."""
    B, K = keep_idx.shape
    out_h = torch.gather(hidden, 1, keep_idx[..., None].expand(B, K, hidden.shape[-1]))
    out_p = None
    if position_ids is not None:
        p = _expand_pos(position_ids, B)
        out_p = torch.gather(p, 2, keep_idx[None].expand(p.shape[0], B, K))
        if position_ids.dim() == 2:
            out_p = out_p[0]
    out_m = None if attention_mask is None else torch.gather(attention_mask, 1, keep_idx)
    return out_h, out_p, out_m


def compact_kv_torch(key, value, keep_idx):
    """Keep ``keep_idx [B, K]`` positions of a KV cache layer: ``key, value [B, H, L, d]`` -> ``[B, H, K, d]``."""
    B, H, _, d = key.shape
    idx = keep_idx[:, None, :, None].expand(B, H, keep_idx.shape[1], d)
    return torch.gather(key, 2, idx), torch.gather(value, 2, idx)
