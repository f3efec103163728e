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
- DART (an in-LLM pruner; the rule is pure torch too): ``key_l1_norms``, ``dart_per_pivot``, ``dart_select``.
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


# -- DART (Wen et al., EMNLP 2025): duplication-aware selection in the LLM -------------------------------------------
def key_l1_norms(key: torch.Tensor) -> torch.Tensor:
    """``[B, L]``: the L1 norm of every token's key over all heads (heads concatenated, as DART ranks its pivots).
    ``key: [B, H_kv, L, d]`` (post-RoPE). Repeating the KV heads for GQA (the official LLaVA code does, the Qwen ports
    do not) multiplies every norm by the same ``n_rep``, so the ranking is the same either way."""
    return key.abs().sum(dim=(1, 3))


def dart_per_pivot(n: int, pivots: int, keep_ratio: float | None = None, keep_tokens: int | None = None,
                   image_pivots: int = 0, what: str = "the image") -> int | None:
    """Tokens each pivot picks (official ``TOKEN_TOPK``) for an image of ``n`` tokens and ``pivots`` = P_img + P_txt
    pivots; None = keep every token (``keep_ratio >= 1``, the neutral setting; the official code would raise).

    - ``keep_tokens`` T (official ``max_num_trunction`` on LLaVA-1.5, ``retain_token_num_for_llava_next`` on NeXT):
      ``min(T, n - image_pivots) // pivots`` (T = 128 -> 16 per pivot -> 4 + 8 * 16 = 132 kept); T > n raises;
    - ``keep_ratio`` rho (``1 - reduction_ratio``): ``floor(n * rho // pivots)`` (576 * 0.222 -> 15, not 16)."""
    if pivots < 1:
        raise ValueError("DART needs at least one pivot (image_pivots + text_pivots >= 1)")
    if keep_tokens is not None:
        if keep_tokens > n:
            raise ValueError(f"keep_tokens={keep_tokens} exceeds the {n} visual tokens of {what}; use keep_tokens <= "
                             f"{n}, or keep_ratio")
        return int(min(keep_tokens, n - image_pivots) // pivots)
    if keep_ratio is None:
        raise ValueError("give keep_ratio or keep_tokens")
    if keep_ratio >= 1:
        return None
    return int(n * keep_ratio // pivots)


def dart_select(key_norms: torch.Tensor, hidden: torch.Tensor, image_pos: Sequence[int], text_pos: Sequence[int],
                image_pivots: int, text_pivots: int, per_pivot: int | None) -> tuple[list[int], list[int], list[int]]:
    """DART's selection for one image of one sequence, as the released code does it.

    ``key_norms [L]``: :func:`key_l1_norms` of layer K-1's keys; ``hidden [L, D]``: layer K-1's output after the
    LLM's final norm; ``image_pos``: the image's token positions; ``text_pos``: the candidate text pivots (the tokens
    after the image). Positions are sequence positions counted from the sequence's first real token: they are the
    values put in a Python ``set``, whose iteration order (the pivots' order) depends on them, as in the official
    batch-size-1 code.

    1. Pivots: the ``image_pivots`` image tokens and the ``text_pivots`` text tokens of highest key L1 norm.
    2. Pool = the image tokens that are not image pivots. For each pivot in the iteration order of
       ``set(image pivots + text pivots)``: take from the pool the ``per_pivot`` tokens LEAST cosine-similar to the
       pivot's hidden state, keep them and remove them from the pool (a pool that runs out gives what is left; the
       official ``topk`` would raise).
    3. Kept = image pivots + every pick (text pivots are not image tokens): ``P_img + (P_img + P_txt) * per_pivot``.

    Returns ``(kept positions ascending, image pivots, text pivots)`` (pivots by descending norm); ``per_pivot`` None
    keeps every image token."""
    image_pos, text_pos = list(image_pos), list(text_pos)
    if per_pivot is None:
        return sorted(image_pos), [], []
    dev = key_norms.device
    img_idx = torch.as_tensor(image_pos, dtype=torch.long, device=dev)
    txt_idx = torch.as_tensor(text_pos, dtype=torch.long, device=dev)
    if image_pivots > len(image_pos):
        raise ValueError(f"image_pivots={image_pivots} exceeds the {len(image_pos)} tokens of the image")
    img_piv = img_idx[torch.topk(key_norms[img_idx], image_pivots).indices].tolist()
    txt_piv = txt_idx[torch.topk(key_norms[txt_idx], min(text_pivots, len(text_pos))).indices].tolist()
    chosen = set(img_piv + txt_piv)
    pool = set(image_pos) - set(img_piv)
    pool_list = list(pool)
    for item in list(chosen):
        take = min(per_pivot, len(pool_list))
        if take == 0:
            break
        cand = hidden[torch.as_tensor(pool_list, dtype=torch.long, device=hidden.device)]
        sim = -torch.nn.functional.cosine_similarity(hidden[item], cand, dim=-1)
        picks = [pool_list[i] for i in torch.topk(sim, take).indices.tolist()]
        chosen.update(picks)
        pool.difference_update(picks)
        pool_list = list(pool)
    chosen.difference_update(txt_piv)
    return sorted(chosen), img_piv, txt_piv
