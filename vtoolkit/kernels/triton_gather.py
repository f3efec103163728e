"""Triton kernels: padded-batch row gather (hidden states + position ids + mask in one launch) and KV compaction.

Designed for few, large programs: one program per (sample, block of ``BLOCK_K`` kept rows), looping over the hidden
dimension in ``BLOCK_D`` chunks; the KV kernel handles one (sample, head) and gathers K and V together. Set
``TRITON_INTERPRET=1`` *before importing this module* to run on CPU tensors (tests); on CUDA it compiles normally.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from vtoolkit.kernels.reference import _expand_pos

# TRITON_INTERPRET is read when @triton.jit decorates, i.e. at this module's import: remember what the kernels became.
INTERPRET = bool(triton.knobs.runtime.interpret)


@triton.jit
def _gather_rows_kernel(h_ptr, idx_ptr, out_ptr, pos_ptr, pos_out_ptr, m_ptr, m_out_ptr,
                        K, D, R,
                        s_hb, s_hl, s_hd, s_ob, s_ol, s_od,
                        s_pr, s_pb, s_pl, s_qr, s_qb, s_ql,
                        s_mb, s_ml, s_nb, s_nl,
                        HAS_POS: tl.constexpr, HAS_MASK: tl.constexpr,
                        BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)      # 64-bit offsets: b * stride can pass 2**31 on large batches
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = offs_k < K
    src = tl.load(idx_ptr + b * K + offs_k, mask=kmask, other=0)
    offs_k = offs_k.to(tl.int64)
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
def _gather_tile(src_ptr, dst_ptr, src, offs_k, kmask, D, s_l, s_d, o_l, o_d, BLOCK_D: tl.constexpr):
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        m2 = kmask[:, None] & (offs_d < D)[None, :]
        vals = tl.load(src_ptr + src[:, None] * s_l + offs_d[None, :] * s_d, mask=m2)
        tl.store(dst_ptr + offs_k[:, None] * o_l + offs_d[None, :] * o_d, vals, mask=m2)


@triton.jit
def _compact_kv_kernel(k_ptr, v_ptr, idx_ptr, ko_ptr, vo_ptr, H, K, DK, DV,
                       sk_b, sk_h, sk_l, sk_d, sv_b, sv_h, sv_l, sv_d,
                       ok_b, ok_h, ok_l, ok_d, ov_b, ov_h, ov_l, ov_d,
                       BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)     # 64-bit offsets: b * stride passes 2**31 on long caches
    b = pid // H
    h = pid % H
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = offs_k < K
    src = tl.load(idx_ptr + b * K + offs_k, mask=kmask, other=0)
    offs_k = offs_k.to(tl.int64)
    _gather_tile(k_ptr + b * sk_b + h * sk_h, ko_ptr + b * ok_b + h * ok_h, src, offs_k, kmask, DK,
                 sk_l, sk_d, ok_l, ok_d, BLOCK_D)
    _gather_tile(v_ptr + b * sv_b + h * sv_h, vo_ptr + b * ov_b + h * ov_h, src, offs_k, kmask, DV,
                 sv_l, sv_d, ov_l, ov_d, BLOCK_D)


def _on_device(t: torch.Tensor):
    """Launch on the tensor's GPU, not the current one (``device_map`` puts layers on several GPUs)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _blocks(K: int, D: int) -> tuple[int, int]:
    """Tile sizes. GPU: 16 x <=256 elements per load (32 per thread at 4 warps: no register spills, and enough
    programs to fill the SMs). Interpreter: few, large programs (each costs ~ms whatever its size)."""
    if INTERPRET:
        return min(128, triton.next_power_of_2(max(K, 1))), min(1024, triton.next_power_of_2(max(D, 1)))
    return min(16, triton.next_power_of_2(max(K, 1))), min(256, triton.next_power_of_2(max(D, 1)))


def gather_kept_triton(hidden, keep_idx, position_ids=None, attention_mask=None):
    """``hidden [B, L, D]`` (any strides, any float dtype), ``keep_idx [B, K]`` int64, ``position_ids [B, L] |
    [R, B, L] | None``, ``attention_mask [B, L] | None`` -> contiguous ``([B, K, D], [B, K] | [R, B, K] | None,
    [B, K] | None)``; everything in one launch, grid ``(B, cdiv(K, BLOCK_K))``. Arguments are checked by the caller
    (:func:`vtoolkit.kernels.gather_kept`)."""
    B, _, D = hidden.shape
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
    if B * K == 0:
        return out, (pos_out[0] if pos_out is not None and position_ids.dim() == 2 else pos_out), mask_out
    # bool masks travel as bytes (same size, same bits): no reliance on i1 pointer loads/stores
    m_in = attention_mask.view(torch.uint8) if mask_out is not None and mask_out.dtype == torch.bool else attention_mask
    m_out = mask_out.view(torch.uint8) if mask_out is not None and mask_out.dtype == torch.bool else mask_out
    grid = (B, triton.cdiv(K, block_k))
    with _on_device(hidden):
        _gather_rows_kernel[grid](hidden, idx, out, pos if pos is not None else dummy,
                                  pos_out if pos_out is not None else dummy,
                                  m_in if m_in is not None else dummy,
                                  m_out if m_out is not None else dummy,
                                  K, D, R, *hidden.stride(), *out.stride(), *ps, *qs, *ms, *ns,
                                  HAS_POS=pos is not None, HAS_MASK=attention_mask is not None,
                                  BLOCK_K=block_k, BLOCK_D=block_d)
    if pos_out is not None and position_ids.dim() == 2:
        pos_out = pos_out[0]
    return out, pos_out, mask_out


def compact_kv_triton(key, value, keep_idx):
    """``key [B, H, L, dk]``, ``value [B, H, L, dv]`` (any strides), ``keep_idx [B, K]`` int64 ->
    ``([B, H, K, dk], [B, H, K, dv])`` contiguous; one launch, grid ``(B * H, cdiv(K, BLOCK_K))``."""
    B, H, _, DK = key.shape
    DV = value.shape[-1]
    K = keep_idx.shape[1]
    ko = torch.empty(B, H, K, DK, dtype=key.dtype, device=key.device)
    vo = torch.empty(B, H, K, DV, dtype=value.dtype, device=value.device)
    if ko.numel() == 0 and vo.numel() == 0:
        return ko, vo
    block_k, block_d = _blocks(K, max(DK, DV))
    grid = (B * H, triton.cdiv(K, block_k))
    with _on_device(key):
        _compact_kv_kernel[grid](key, value, keep_idx.contiguous(), ko, vo, H, K, DK, DV, *key.stride(),
                                 *value.stride(), *ko.stride(), *vo.stride(), BLOCK_K=block_k, BLOCK_D=block_d)
    return ko, vo
