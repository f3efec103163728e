"""Kernels with one dispatch point: Triton on CUDA tensors, the torch reference elsewhere.

``VTOOLKIT_KERNELS`` overrides the choice: ``auto`` (default), ``torch``, or ``triton`` (also on CPU tensors when
``TRITON_INTERPRET=1`` was set before the kernels were first used; an error names the fix when Triton is missing).
Triton is optional (extra ``triton``): importing this package never imports it. The Triton kernels are inference-only:
under ``auto`` a tensor that needs a gradient takes the torch path. Both backends share one argument check, so a shape
mistake raises the same error everywhere instead of letting a kernel read out of bounds.
"""
from __future__ import annotations

import importlib.util
import os
import sys

import torch

from vtoolkit.kernels.reference import check_gather_args, check_kv_args, compact_kv_torch, gather_kept_torch

BACKENDS = ("auto", "torch", "triton")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def backend_for(t: torch.Tensor) -> str:
    """Which implementation runs for tensors like ``t``: ``"triton"`` or ``"torch"``."""
    choice = os.environ.get("VTOOLKIT_KERNELS", "auto").strip().lower()
    if choice not in BACKENDS:
        raise ValueError(f"VTOOLKIT_KERNELS must be one of {BACKENDS}, got {choice!r}")
    if choice == "torch":
        return "torch"
    if choice == "triton":
        if not triton_available():
            raise RuntimeError("VTOOLKIT_KERNELS=triton but triton is not installed: pip install 'vtoolkit[triton]'")
        if not t.is_cuda:
            loaded = sys.modules.get("vtoolkit.kernels.triton_gather")
            interpret = loaded.INTERPRET if loaded is not None else os.environ.get("TRITON_INTERPRET") == "1"
            if not interpret:
                raise RuntimeError("Triton kernels on CPU tensors need the Triton interpreter: set TRITON_INTERPRET=1 "
                                   "in the environment before vtoolkit.kernels.triton_gather is first imported; or "
                                   "use VTOOLKIT_KERNELS=torch")
        if t.requires_grad and torch.is_grad_enabled():
            raise RuntimeError("the Triton kernels are inference-only (no backward): run under torch.no_grad() / "
                               "inference_mode, or use VTOOLKIT_KERNELS=auto to fall back to torch when autograd "
                               "needs the gather")
        return "triton"
    if t.requires_grad and torch.is_grad_enabled():
        return "torch"
    return "triton" if (t.is_cuda and triton_available()) else "torch"


def gather_kept(hidden, keep_idx, position_ids=None, attention_mask=None):
    """Gather the kept rows of a padded batch: hidden states, position ids (``[B, L]`` or ``[R, B, L]``) and mask
    in one pass. ``keep_idx [B, K]`` int64, same K per sample, sorted per row so kept tokens stay in order (pad slots
    point anywhere in [0, L); mask them afterwards). A size-1 batch dim of position ids / mask broadcasts.
    Returns ``(hidden [B, K, D], position_ids [B, K] | [R, B, K] | None, mask [B, K] | None)``, new contiguous tensors.
    """
    position_ids, attention_mask = check_gather_args(hidden, keep_idx, position_ids, attention_mask)
    if backend_for(hidden) == "triton":
        from vtoolkit.kernels.triton_gather import gather_kept_triton

        return gather_kept_triton(hidden, keep_idx, position_ids, attention_mask)
    return gather_kept_torch(hidden, keep_idx, position_ids, attention_mask)


def compact_kv(key, value, keep_idx):
    """KV-cache compaction: keep positions ``keep_idx [B, K]`` of ``key [B, H, L, dk]`` and ``value [B, H, L, dv]``
    (both in one launch, any strides) -> ``([B, H, K, dk], [B, H, K, dv])``."""
    check_kv_args(key, value, keep_idx)
    if backend_for(key) == "triton":
        from vtoolkit.kernels.triton_gather import compact_kv_triton

        return compact_kv_triton(key, value, keep_idx)
    return compact_kv_torch(key, value, keep_idx)


__all__ = ["gather_kept", "compact_kv", "backend_for", "gather_kept_torch", "compact_kv_torch", "triton_available"]
