"""FastV: drop the least-attended visual tokens after LLM layer K (Chen et al., ECCV 2024, ``pkunlp-icler/FastV``).

Algorithm (official code, docs/methods.md section 7): at prefill, take the attention of decoder layer ``K - 1``
(0-based), the row of the **last** prompt token, averaged over heads: ``s_j = mean_h A_{K-1}[h, last, j]`` for the
visual tokens ``j``. Keep the top ``(1 - R)`` fraction of each image's visual tokens (``R`` = ``ratio`` dropped) and run
layers ``K..L-1`` on the shorter sequence; kept tokens keep their original positions. Defaults ``K=2``, ``R=0.5``.

Deviations: the score row is computed from the layer's post-RoPE q/k for that one query only (the layer itself keeps
SDPA; the official code switches the layer to eager ``output_attentions``). Budgets are per image:
``round((1 - R) * N)`` tokens, half up. Batched with padding: each sample ranks its own tokens.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vtoolkit.config import MethodConfig
from vtoolkit.hooks.attention import current_implementation, intercept
from vtoolkit.hooks.midstack import MidStackPruner
from vtoolkit.methods.base import Method
from vtoolkit.registry import register_method


@dataclass(frozen=True)
class FastVConfig(MethodConfig):
    """K: first layer that sees the pruned sequence (scores from layer K-1); ratio: fraction of visual tokens
    dropped."""

    K: int = 2
    ratio: float = 0.5

    def validate(self) -> None:
        if not isinstance(self.K, int) or self.K < 1:
            raise ValueError(f"K must be an integer >= 1 (scores come from layer K-1), got {self.K!r}")
        if not 0 <= float(self.ratio) < 1:
            raise ValueError(f"ratio (fraction dropped) must be in [0, 1), got {self.ratio}")


def last_query_scores(query, key, attention_mask, scaling) -> torch.Tensor:
    """Head-averaged attention probabilities of the last query over all keys: ``[B, Lk]``."""
    n_rep = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(n_rep, dim=1) if n_rep > 1 else key
    logits = torch.einsum("bhd,bhkd->bhk", query[:, :, -1].float(), k.float()) * scaling
    if attention_mask is not None:
        row = attention_mask[:, :, -1, : k.shape[2]]
        if row.dtype == torch.bool:
            logits = logits.masked_fill(~row, float("-inf"))
        else:
            logits = logits + row.float()
    return torch.softmax(logits, dim=-1).mean(1)


@register_method("fastv", config=FastVConfig, kind="prune", stage="llm",
                 architectures=("llava", "llava_next", "qwen2_vl", "qwen2_5_vl"),
                 requires=("LLM attention q/k at layer K-1",),
                 description="Drop low-attention visual tokens after LLM layer K (FastV baseline)")
class FastV(Method):
    def check(self) -> None:
        if self.config.K >= self.adapter.num_layers:
            raise ValueError(f"K={self.config.K} must be < the {self.adapter.num_layers} LLM layers")
        impl = current_implementation(self.adapter.text_config)
        if "flash" in impl or "flex" in impl:
            raise ValueError(f"fastv rewrites the causal mask of layers >= K, which needs 'sdpa' or 'eager' attention in "
                             f"the LLM; this model uses {impl!r}: model.set_attn_implementation"
                             f"({{'text_config': 'sdpa'}}) first")

    def install(self, hooks, ctx) -> None:
        self.ctx = ctx
        self._scores = None
        ctx.listeners.append(self)
        attn = self.adapter.attention(self.config.K - 1)
        intercept(hooks, self.adapter.text_config, [attn], self._observe)
        MidStackPruner(self.adapter, ctx, self.config.K, self._select, owner=self.name).install(hooks)

    def on_prefill(self, ctx) -> None:
        super().on_prefill(ctx)
        self._scores = None

    def _observe(self, module, query, key, value, attention_mask, kwargs):
        if self.ctx.step == 0 and query.shape[2] > 1:
            scaling = kwargs.get("scaling") or module.scaling
            self._scores = last_query_scores(query, key, attention_mask, scaling)
        return None

    def _select(self, ctx):
        if self._scores is None:
            raise RuntimeError("FastV: no attention scores were recorded at layer K-1 in this prefill")
        keep, kept_idx, before, after = [], [], [], []
        for b, sample in enumerate(ctx.spans):
            kb, ib = [], []
            for span in sample:
                s = self._scores[b, span.positions.to(self._scores.device)]
                t = max(1, math.floor((1 - self.config.ratio) * span.num_tokens + 0.5))
                sel = torch.topk(s, t, sorted=False).indices.sort().values.to(span.positions.device)
                kb.append(span.positions[sel])
                ib.append(sel.cpu())
            keep.append(torch.cat(kb) if kb else torch.zeros(0, dtype=torch.long))
            kept_idx.append(ib)
            before.append(sum(s.num_tokens for s in sample))
            after.append(sum(k.numel() for k in kb))
        self._stats = {"kept_indices": kept_idx, "visual_tokens_before": before, "visual_tokens_after": after,
                       "layer": self.config.K}
        return keep
