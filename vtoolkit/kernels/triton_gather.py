"""Triton kernels: padded-batch row gather (hidden states + position ids + mask in one launch) and KV compaction.

Designed for few, large programs: one program per (sample, block of ``BLOCK_K`` kept rows), looping over the hidden
dimension in ``BLOCK_D`` chunks; the KV kernel handles one (sample, head) and gathers K and V together. Set
``TRITON_INTERPRET=1`` *before importing this module* to run on CPU tensors (tests); on CUDA it compiles normally.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from vtoolkit.kernels.reference import _expand_pos


@triton.jit
def _gather_rows_kernel(h_ptr, idx_ptr, out_ptr, pos_ptr, pos_out_ptr, m_ptr, m_out_ptr,
                        K, D, R,
                        s_hb, s_hl, s_hd, s_ob, s_ol, s_od,
                        s_pr, s_pb, s_pl, s_qr, s_qb, s_ql,
                        s_mb, s_ml, s_nb, s_nl,
                        HAS_POS: tl.constexpr, HAS_MASK: tl.constexpr,
                        BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = offs_k < K
    src = tl.load(idx_ptr + b * K + offs_k, mask=kmask, other=0)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        m2 = kmask[:, None] & (offs_d < D)[None, :]
        vals = tl.load(h_ptr + b * s_hb + src[:, None] * s_hl + offs_d[None, :] * s_hd, mask=m2)
        tl.store(out_ptr + b * s_ob + offs_k[:, None] * s_ol + offs_d[None, :] * s_od, vals, mask=m2)
    if HAS_POS:
        for r in range(R):
            p = tl.load(pos_ptr + r * s_pr + b * s_pb + src * s_pl, mask=kmask)
            tl.store(pos_out_ptr + r * s_qr + b * s_qb + offs_k * s_ql, p, mask=kmask)
    if HAS_MASK:
        mv = tl.load(m_ptr + b * s_mb + src * s_ml, mask=kmask)
        tl.store(m_out_ptr + b * s_nb + offs_k * s_nl, mv, mask=kmask)


@triton.jit
def _compact_kv_kernel(k_ptr, v_ptr, idx_ptr, ko_ptr, vo_ptr, H, K, D,
                       s_b, s_h, s_l, s_d, o_b, o_h, o_l, o_d,
                       BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = offs_k < K
    src = tl.load(idx_ptr + b * K + offs_k, mask=kmask, other=0)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        m2 = kmask[:, None] & (offs_d < D)[None, :]
        src_off = b * s_b + h * s_h + src[:, None] * s_l + offs_d[None, :] * s_d
        dst_off = b * o_b + h * o_h + offs_k[:, None] * o_l + offs_d[None, :] * o_d
        tl.store(ko_ptr + dst_off, tl.load(k_ptr + src_off, mask=m2), mask=m2)
        tl.store(vo_ptr + dst_off, tl.load(v_ptr + src_off, mask=m2), mask=m2)


def _blocks(K: int, D: int) -> tuple[int, int]:
    block_k = min(128, triton.next_power_of_2(max(K, 1)))
    block_d = min(256, triton.next_power_of_2(max(D, 1)))
    return block_k, block_d


def gather_kept_triton(hidden, keep_idx, position_ids=None, attention_mask=None):
    B, L, D = hidden.shape
    K = keep_idx.shape[1]
    idx = keep_idx.contiguous()
    out = torch.empty(B, K, D, dtype=hidden.dtype, device=hidden.device)
    pos = pos_out = None
    R = 1
    if position_ids is not None:
        pos = _expand_pos(position_ids, B)
        R = pos.shape[0]
        pos_out = torch.empty(R, B, K, dtype=pos.dtype, device=pos.device)
    mask_out = None
    if attention_mask is not None:
        mask_out = torch.empty(B, K, dtype=attention_mask.dtype, device=attention_mask.device)
    dummy = out
    block_k, block_d = _blocks(K, D)
    ps = pos.stride() if pos is not None else (0, 0, 0)
    qs = pos_out.stride() if pos_out is not None else (0, 0, 0)
    ms = attention_mask.stride() if attention_mask is not None else (0, 0)
    ns = mask_out.stride() if mask_out is not None else (0, 0)
    grid = (B, triton.cdiv(K, block_k))
    _gather_rows_kernel[grid](hidden, idx, out, pos if pos is not None else dummy,
                              pos_out if pos_out is not None else dummy,
                              attention_mask if attention_mask is not None else dummy,
                              mask_out if mask_out is not None else dummy,
                              K, D, R, *hidden.stride(), *out.stride(), *ps, *qs, *ms, *ns,
                              HAS_POS=pos is not None, HAS_MASK=attention_mask is not None,
                              BLOCK_K=block_k, BLOCK_D=block_d)
    if pos_out is not None and position_ids.dim() == 2:
        pos_out = pos_out[0]
    return out, pos_out, mask_out


def compact_kv_triton(key, value, keep_idx):
    if key.shape != value.shape or key.stride() != value.stride():
        raise ValueError("key and value must have the same shape and strides")
    B, H, L, D = key.shape
    K = keep_idx.shape[1]
    ko = torch.empty(B, H, K, D, dtype=key.dtype, device=key.device)
    vo = torch.empty_like(ko)
    block_k, block_d = _blocks(K, D)
    grid = (B * H, triton.cdiv(K, block_k))
    _compact_kv_kernel[grid](key, value, keep_idx.contiguous(), ko, vo, H, K, D, *key.stride(), *ko.stride(),
                             BLOCK_K=block_k, BLOCK_D=block_d)
    return ko, vo
