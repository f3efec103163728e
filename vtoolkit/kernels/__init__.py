"""Kernels with one dispatch point: Triton on CUDA tensors, the torch reference elsewhere.

``VTOOLKIT_KERNELS`` overrides the choice: ``auto`` (default), ``torch``, or ``triton`` (also on CPU tensors when
``TRITON_INTERPRET=1`` was set before the kernels were first used; an error names the fix when Triton is missing).
Triton is optional (extra ``triton``): importing this package never imports it.
"""
from __future__ import annotations

import importlib.util
import os

import torch

from vtoolkit.kernels.reference import compact_kv_torch, gather_kept_torch

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
        if not t.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("Triton kernels on CPU tensors need TRITON_INTERPRET=1 set before the first kernel "
                               "use (the interpreter); or use VTOOLKIT_KERNELS=torch")
        return "triton"
    return "triton" if (t.is_cuda and triton_available()) else "torch"


def gather_kept(hidden, keep_idx, position_ids=None, attention_mask=None):
    """Gather the kept rows of a padded batch: hidden states, position ids (``[B, L]`` or ``[R, B, L]``) and mask
    in one pass. ``keep_idx [B, K]`` int64, same K per sample (pad slots point anywhere; mask them afterwards)."""
    if backend_for(hidden) == "triton":
        from vtoolkit.kernels.triton_gather import gather_kept_triton

        return gather_kept_triton(hidden, keep_idx, position_ids, attention_mask)
    return gather_kept_torch(hidden, keep_idx, position_ids, attention_mask)


def compact_kv(key, value, keep_idx):
    """KV-cache compaction: keep positions ``keep_idx [B, K]`` of ``key, value [B, H, L, d]`` in one launch."""
    if backend_for(key) == "triton":
        from vtoolkit.kernels.triton_gather import compact_kv_triton

        return compact_kv_triton(key, value, keep_idx)
    return compact_kv_torch(key, value, keep_idx)


__all__ = ["gather_kept", "compact_kv", "backend_for", "gather_kept_torch", "compact_kv_torch", "triton_available"]
