"""Scores, budgets and top-K of the pre-LLM pruners (FasterVLM, random), shared by the HF path and the vLLM plugin.

- FasterVLM, encoders with [CLS] (CLIP in LLaVA): ``cls_attention`` - the CLS query's post-softmax attention over
  the patch keys of the feature layer, mean over heads, CLS column excluded.
- DAMRO's released LLaVA rule: ``pooled_cls_attention`` - one softmax over the unsplit q.k of all heads.
- FasterVLM, encoders without CLS (Qwen2-VL): ``received_attention`` - mean over heads and queries of the attention
  each patch receives in a full-attention block, then ``merge_mean`` over the ``merge x merge`` patches of one LLM
  token.
- random: ``random_scores(crop_sizes, image_seed(pixels, seed))`` - i.i.d. uniform scores from a generator seeded by the
  seed and a BLAKE2 fingerprint of the image's processor pixels.
- ``budget``: how many tokens a unit of ``n`` keeps; ``top_k`` / ``top_k_raster``: the chosen tokens.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch

QUERY_BLOCK = 1024


def cls_attention(q_cls: torch.Tensor, k: torch.Tensor, scaling: float) -> torch.Tensor:
    """CLS-row attention probabilities over patches, mean over heads. ``q_cls: [B, H, d]``, ``k: [B, H, T, d]``
    (T = 1 + N with CLS first) -> ``[B, N]``: ``mean_h softmax(q_cls^h . K^h * scaling)[1:]`` in fp32."""
    logits = torch.einsum("bhd,bhtd->bht", q_cls.float(), k.float()) * scaling
    return torch.softmax(logits, dim=-1)[:, :, 1:].mean(1)


def pooled_cls_attention(q_cls: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """CLS-row attention over patches with the heads unsplit (DAMRO's released LLaVA code):
    ``softmax(q_cls . K^T * C ** -0.5)`` without the CLS column, fp32. ``q_cls: [B, C]``, ``k: [B, T, C]``
    (T = 1 + N with CLS first) -> ``[B, N]``."""
    logits = torch.einsum("bc,btc->bt", q_cls.float(), k.float()) * q_cls.shape[-1] ** -0.5
    return torch.softmax(logits, dim=-1)[:, 1:]


def received_attention(q: torch.Tensor, k: torch.Tensor, scaling: float, block: int = QUERY_BLOCK) -> torch.Tensor:
    """Mean over heads and queries of the softmax attention each key receives. ``q, k: [H, N, d]`` -> ``[N]``
    (fp32, streamed over query blocks of ``block`` so no ``H x N x N`` tensor exists)."""
    H, N, _ = q.shape
    acc = torch.zeros(H, N, dtype=torch.float32, device=q.device)
    kt = k.float().transpose(1, 2)
    for s in range(0, N, block):
        p = torch.softmax(torch.matmul(q[:, s:s + block].float(), kt) * scaling, dim=-1)
        acc += p.sum(1)
    return (acc / N).mean(0)


def merge_mean(scores: torch.Tensor, unit: int) -> torch.Tensor:
    """Per-patch scores ``[n * unit]`` (merge groups consecutive, as the ViT orders them) -> one per merged token."""
    return scores.view(-1, unit).mean(-1)


def budget(n: int, keep_ratio: float | None, keep_tokens: int | None, what: str) -> int:
    """Tokens kept out of a unit of ``n``: ``keep_tokens`` exactly (ValueError above ``n``), else
    ``max(1, min(n, floor(keep_ratio * n + 0.5)))`` (half up: 576 * 0.1 -> 58)."""
    if keep_tokens is not None:
        if keep_tokens > n:
            raise ValueError(f"keep_tokens={keep_tokens} exceeds the {n} visual tokens of {what}; "
                             f"use keep_tokens <= {n}, or keep_ratio")
        return keep_tokens
    return max(1, min(n, math.floor(keep_ratio * n + 0.5)))


def top_k(scores: torch.Tensor, t: int, by_score: bool = False) -> torch.Tensor:
    """Indices of the ``t`` highest scores: unordered, or by descending score (``by_score``, ``torch.topk``'s order)."""
    return torch.topk(scores, t, sorted=by_score).indices


def top_k_raster(scores: torch.Tensor, t: int) -> torch.Tensor:
    """Indices of the ``t`` highest scores in raster (ascending) order: the tokens a pruner keeps, in order."""
    return top_k(scores, t).sort().values


def image_seed(pixels: torch.Tensor, seed: int) -> int:
    """A 63-bit generator seed from ``seed`` and the image's processor pixels (BLAKE2b-64 of their fp32 bytes,
    keyed by ``str(seed)``): reproducible, different per image, independent of the rest of the batch."""
    pixels = pixels.detach().to("cpu", torch.float32).contiguous()
    digest = hashlib.blake2b(pixels.numpy().tobytes(), digest_size=8, key=str(seed).encode()).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def random_scores(sizes: Sequence[int], seed: int) -> list[torch.Tensor]:
    """i.i.d. U(0, 1) scores, one tensor per crop of ``sizes[c]`` tokens, drawn in crop order from one CPU generator
    seeded with ``seed`` (an ``image_seed``)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(n, generator=gen) for n in sizes]
