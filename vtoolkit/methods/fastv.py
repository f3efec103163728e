"""FastV: drop the least-attended visual tokens after LLM layer K (Chen et al., ECCV 2024, ``pkunlp-icler/FastV``).

Algorithm (official code, docs/methods.md section 7.1): at prefill, take the attention of decoder layer ``K - 1``
(0-based), the row of the **last** prompt token, averaged over heads: ``s_j = mean_h A_{K-1}[h, last, j]`` for the
visual tokens ``j``. Drop the lowest ``R`` fraction of each image's visual tokens and run layers ``K..L-1`` on the
shorter sequence; kept tokens keep their original positions. Official defaults ``K=2``, ``R=0.5``.

Options use the budget vocabulary every vtoolkit pruner shares: ``keep_ratio`` is the share KEPT (``1 - R``; default
0.5) xor ``keep_tokens`` per image; ``ratio`` is accepted as an alias in the paper's sense (the share DROPPED, R), so
``ratio=0.5`` == ``keep_ratio=0.5`` and ``ratio=0.75`` == ``keep_ratio=0.25``. Budgets are per image:
``max(1, round(keep_ratio * N))`` tokens, half up.

Deviations: the score row is computed from the layer's post-RoPE q/k for that one query only (the layer itself keeps
SDPA; the official code switches the layer to eager ``output_attentions``). Batched with padding: each sample ranks
its own tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vtoolkit.hooks.attention import current_implementation, intercept
from vtoolkit.hooks.midstack import MidStackPruner
from vtoolkit.methods.base import Method
from vtoolkit.methods.prune_base import BudgetConfig
from vtoolkit.registry import register_method


@dataclass(frozen=True)
class FastVConfig(BudgetConfig):
    """K: first layer that sees the pruned sequence (scores from layer K-1); keep_ratio (share KEPT, default 0.5)
    xor keep_tokens (per image); ratio: alias, the share DROPPED (the paper's R = 1 - keep_ratio)."""

    K: int = 2
    ratio: float | None = None

    default_keep_ratio = 0.5

    def validate(self) -> None:
        if self.ratio is not None:
            if self.keep_ratio is not None or self.keep_tokens is not None:
                raise ValueError("give keep_ratio (share kept), keep_tokens, or ratio (share dropped, the paper's R), "
                                 "not several")
            if not 0 <= float(self.ratio) < 1:
                raise ValueError(f"ratio (share of visual tokens DROPPED) must be in [0, 1), got {self.ratio}")
            object.__setattr__(self, "keep_ratio", 1.0 - float(self.ratio))
            object.__setattr__(self, "ratio", None)        # one spelling after validation: keep_ratio
        super().validate()
        if not isinstance(self.K, int) or isinstance(self.K, bool) or self.K < 1:
            raise ValueError(f"K must be an integer >= 1 (scores come from layer K-1), got {self.K!r}")

    def check_model(self, adapter, spans=None) -> None:
        """K < the LLM's layer count (layers K..L-1 see the pruned sequence); the budget against ``spans``."""
        if self.K >= adapter.num_layers:
            raise ValueError(f"K={self.K} must be < the {adapter.num_layers} LLM layers")
        super().check_model(adapter, spans)


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
                 architectures=("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_onevision",
                                "internvl"),
                 requires=("LLM attention q/k at layer K-1",),
                 description="Drop low-attention visual tokens after LLM layer K (FastV baseline)")
class FastV(Method):
    rewrites_sequence = True

    def check(self) -> None:
        super().check()
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
                t = self.config.budget(span.num_tokens, f"image {span.image_index} (sample {b})")
                sel = torch.topk(s, t, sorted=False).indices.sort().values.to(span.positions.device)
                kb.append(span.positions[sel])
                ib.append(sel.cpu())
            keep.append(torch.cat(kb) if kb else torch.zeros(0, dtype=torch.long))
            kept_idx.append(ib)
            before.append(sum(s.num_tokens for s in sample))
            after.append(sum(k.numel() for k in kb))
        rows = ctx.sample_rows
        self._stats = {"kept_indices": [kept_idx[r] for r in rows], "visual_tokens_before": [before[r] for r in rows],
                       "visual_tokens_after": [after[r] for r in rows], "layer": self.config.K}
        return keep
