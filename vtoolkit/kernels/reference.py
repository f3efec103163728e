"""Torch reference implementations of the kernels (the CPU path, and the oracle the Triton kernels are tested against),
and the argument checks both backends share (the Triton kernels index raw pointers, so a wrong shape would read out of
bounds instead of raising)."""
from __future__ import annotations

import torch


def check_gather_args(hidden, keep_idx, position_ids=None, attention_mask=None):
    """Validate :func:`gather_kept_torch` arguments; returns ``(position_ids, attention_mask)`` with a size-1 batch dim
    broadcast to ``B`` (views). Indices are not range-checked (that would synchronise a GPU): they must lie in [0, L)."""
    if hidden.dim() != 3 or not hidden.dtype.is_floating_point:
        raise ValueError(f"hidden must be a float [B, L, D] tensor, got {hidden.dtype} {tuple(hidden.shape)}")
    B, L, _ = hidden.shape
    if keep_idx.dim() != 2 or keep_idx.shape[0] != B or keep_idx.dtype != torch.int64:
        raise ValueError(f"keep_idx must be int64 [B={B}, K], got {keep_idx.dtype} {tuple(keep_idx.shape)}")
    for name, t in (("keep_idx", keep_idx), ("position_ids", position_ids), ("attention_mask", attention_mask)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device}, hidden on {hidden.device}")
    if position_ids is not None:
        if position_ids.dim() not in (2, 3) or position_ids.shape[-1] != L or position_ids.shape[-2] not in (1, B):
            raise ValueError(f"position_ids must be [B={B}, L={L}] or [R, B, L] (M-RoPE), got "
                             f"{tuple(position_ids.shape)}")
        position_ids = position_ids.expand(*position_ids.shape[:-2], B, L)
    if attention_mask is not None:
        if attention_mask.dim() != 2 or attention_mask.shape[-1] != L or attention_mask.shape[0] not in (1, B):
            raise ValueError(f"attention_mask must be [B={B}, L={L}], got {tuple(attention_mask.shape)}")
        attention_mask = attention_mask.expand(B, L)
    return position_ids, attention_mask


def check_kv_args(key, value, keep_idx) -> None:
    """Validate :func:`compact_kv_torch` arguments (indices must lie in [0, L); not checked, see above)."""
    if key.dim() != 4 or value.dim() != 4 or key.shape[:3] != value.shape[:3]:
        raise ValueError(f"key and value must be [B, H, L, d] with the same B, H, L; got {tuple(key.shape)} and "
                         f"{tuple(value.shape)}")
    B = key.shape[0]
    if keep_idx.dim() != 2 or keep_idx.shape[0] != B or keep_idx.dtype != torch.int64:
        raise ValueError(f"keep_idx must be int64 [B={B}, K], got {keep_idx.dtype} {tuple(keep_idx.shape)}")
    if not (key.device == value.device == keep_idx.device):
        raise ValueError(f"key, value and keep_idx must share a device: {key.device}, {value.device}, "
                         f"{keep_idx.device}")


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
    """Keep ``keep_idx [B, K]`` positions of a KV cache layer: ``key [B, H, L, dk], value [B, H, L, dv]`` ->
    ``[B, H, K, dk], [B, H, K, dv]`` (the same positions for every head)."""
    B, H, _, _ = key.shape
    idx = keep_idx[:, None, :, None]
    K = keep_idx.shape[1]
    return (torch.gather(key, 2, idx.expand(B, H, K, key.shape[-1])),
            torch.gather(value, 2, idx.expand(B, H, K, value.shape[-1])))
