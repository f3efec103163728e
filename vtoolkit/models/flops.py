"""Analytic FLOPs (multiply-add = 2 FLOPs) from actual token counts.

Shared by the methods that report what they saved (DyVTE's ``flops_saved``) and by ``vtoolkit bench`` (its analytic
bounds), so it lives beside the model adapters it reads shapes from, below both: a method never imports
``vtoolkit.bench`` (``vtoolkit/bench/flops.py`` re-exports this module for the benchmark code and old imports).

Per transformer layer over ``n`` tokens with hidden ``d``, KV width ``d_kv`` (GQA: heads_kv * head_dim), MLP width
``m``, attending over ``c`` keys (``c = n`` at prefill, causal halving ignored as is customary):

- projections: q and o ``2 * 2 n d^2``; k and v ``2 * 2 n d d_kv``
- attention scores and weighted sum: ``2 * 2 n c d``
- MLP: SwiGLU ``3 * 2 n d m`` (LLM), GELU ``2 * 2 n d m`` (CLIP)

So a Llama layer at prefill is ``4nd^2 + 4nd d_kv + 4n^2 d + 6ndm`` (the usual ``4nd^2 + 2n^2d + 3ndm`` counted in
multiply-adds, with MHA). The vision tower runs all its layers (HF computes the last one too, although LLaVA reads
layer -2) on every token incl. CLS; the projector is a 2-layer MLP on the patch tokens;
``lm_head`` is applied to the last position only (``generate`` keeps one logit row).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    vision_layers: int          # layers that actually run
    vision_hidden: int
    vision_mlp: int
    vision_tokens: int          # per crop, incl. CLS
    crops: int
    llm_layers: int
    hidden: int
    kv_hidden: int
    mlp: int
    vocab: int

    @classmethod
    def from_model(cls, model, crops: int = 1) -> Shape:
        from vtoolkit.models import get_adapter

        a = get_adapter(model)
        vc, tc = a.vision_config, a.text_config
        n_vis = (vc.image_size // vc.patch_size) ** 2 + 1
        return cls(len(a.vision_layers), vc.hidden_size, vc.intermediate_size, n_vis, crops, a.num_layers,
                   tc.hidden_size, a.num_kv_heads * a.head_dim, tc.intermediate_size, tc.vocab_size)


def llm_layer_flops(n: int, c: int, d: int, d_kv: int, m: int) -> float:
    return 4 * n * d * d + 4 * n * d * d_kv + 4 * n * c * d + 6 * n * d * m


def vision_flops(s: Shape) -> float:
    n, d = s.vision_tokens, s.vision_hidden
    per_layer = 8 * n * d * d + 4 * n * n * d + 4 * n * d * s.vision_mlp
    return s.crops * s.vision_layers * per_layer


def projector_flops(s: Shape) -> float:
    n = (s.vision_tokens - 1) * s.crops
    return 2 * n * (s.vision_hidden * s.hidden + s.hidden * s.hidden)


def _split(s: Shape, from_layer: int) -> tuple[int, int]:
    if not 0 <= from_layer <= s.llm_layers:
        raise ValueError(f"from_layer must be in [0, {s.llm_layers}], got {from_layer}")
    return from_layer, s.llm_layers - from_layer


def prefill_flops(s: Shape, llm_tokens: int, kept_tokens: int | None = None, from_layer: int = 0) -> float:
    """Vision + projector + LLM prefill + one lm_head row, for one sample.

    Without ``kept_tokens`` every LLM layer runs over ``llm_tokens``. With it, layers ``< from_layer`` run over
    ``llm_tokens`` and the others over ``kept_tokens`` (pre-LLM pruning such as FasterVLM: ``llm_tokens`` already
    pruned, or equivalently ``from_layer=0``; mid-stack pruning such as FastV: ``from_layer=K``)."""
    full, pruned = _split(s, from_layer) if kept_tokens is not None else (s.llm_layers, 0)
    kept = llm_tokens if kept_tokens is None else kept_tokens
    llm = (full * llm_layer_flops(llm_tokens, llm_tokens, s.hidden, s.kv_hidden, s.mlp)
           + pruned * llm_layer_flops(kept, kept, s.hidden, s.kv_hidden, s.mlp))
    return vision_flops(s) + projector_flops(s) + llm + 2 * s.hidden * s.vocab


def decode_flops(s: Shape, context: int, kept_context: int | None = None, from_layer: int = 0) -> float:
    """One decode step attending over ``context`` cached tokens (layers ``>= from_layer`` over ``kept_context``
    when given: their caches hold only the kept tokens)."""
    full, pruned = _split(s, from_layer) if kept_context is not None else (s.llm_layers, 0)
    kept = context if kept_context is None else kept_context
    return (full * llm_layer_flops(1, context + 1, s.hidden, s.kv_hidden, s.mlp)
            + pruned * llm_layer_flops(1, kept + 1, s.hidden, s.kv_hidden, s.mlp) + 2 * s.hidden * s.vocab)


def prefill_ratio(s: Shape, full_tokens: int, kept_tokens: int, from_layer: int = 0) -> float:
    """The analytic bound on prefill time pruned / baseline: FLOPs with ``kept_tokens`` in the LLM from layer
    ``from_layer`` on, over FLOPs with ``full_tokens`` everywhere. The vision tower is never pruned, so this stays
    well above ``kept_tokens / full_tokens``."""
    return prefill_flops(s, full_tokens, kept_tokens, from_layer) / prefill_flops(s, full_tokens)
