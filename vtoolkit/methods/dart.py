"""DART: Duplication-Aware Reduction of Tokens (Wen et al., EMNLP 2025, arXiv 2502.11494, ``ZichenWen1/DART``).

Algorithm (official code, docs/methods.md section 7.5): at prefill, before decoder layer ``K`` runs
(default 2), take from layer ``K - 1``

- its post-RoPE keys: the L1 norm of each token's key over all heads picks the **pivots**, the ``image_pivots`` image
  tokens and the ``text_pivots`` text tokens *after the image* of highest norm;
- its output after the LLM's **final norm**: for each pivot, in the iteration order of the Python
  ``set(image pivots + text pivots)`` as the released code iterates it, the ``per_pivot`` image tokens LEAST
  cosine-similar to the pivot are kept and leave the pool of candidates (the non-pivot image tokens).

Kept: the image pivots and every pick, ``P_img + (P_img + P_txt) * per_pivot`` tokens per image; layers ``K..L-1``
run on them with their **original positions** (:class:`~vtoolkit.hooks.midstack.MidStackPruner`). The rule itself is
:func:`vtoolkit_core.selection.dart_select` (pure torch, shared with the vLLM plugin).

Budget (per image, ``vtoolkit_core.selection.dart_per_pivot``), one of:

- ``keep_ratio`` rho (default 0.222, the official ``reduction_ratio`` 0.778): ``per_pivot = floor(N * rho // P)``
  with ``P = image_pivots + text_pivots`` (the official Qwen ports and LLaVA without ``max_num_trunction``: 576
  tokens -> 15 per pivot -> 124 kept); ``keep_ratio=1.0`` keeps every token (the neutral setting; the official code
  would raise);
- ``keep_tokens`` T (the official LLaVA ``max_num_trunction``; ``retain_token_num_for_llava_next``, 320, on NeXT):
  ``per_pivot = min(T, N - image_pivots) // P``, so ``keep_tokens=128`` keeps **132** (4 + 8 * 16), 64 keeps 68;
- ``ratio`` r: the official ``reduction_ratio`` (share DROPPED), ``keep_ratio = 1 - r``, as in ``fastv``.

Defaults: ``K=2, keep_ratio=0.222, image_pivots=4, text_pivots=4`` (the LLaVA-1.5 scripts; the paper's 88.9 %
reduction is ``keep_tokens=64``).

Attention backends: nothing needs attention probabilities (the keys are intercepted, the similarity is on hidden
states), so the scoring runs under SDPA, eager or flash attention. The layers after ``K`` get masks over the pruned
sequence in the format of the LLM's implementation: 4-D for SDPA / eager (as ``MidStackPruner`` builds them), and on
flash attention the 2-D padding mask flash takes (:func:`vtoolkit.hooks.masks.install_flash_masks`).

Deviations and choices (named):

- Batched with left padding (the official code asserts batch size 1): every row selects its own tokens; the
  positions put in the pivot ``set`` are counted from the row's first real token, which equals the official absolute
  positions of the same prompt alone. Post-RoPE L1 norms depend on absolute positions: ``generate`` (pad-aware
  positions) gives every row its single-run pivots; a plain ``model(**batch)`` of a left-padded LLaVA batch uses
  positions that count the padding (transformers' own behaviour), so its pivots can differ from the single run's.
- Several images in a row: each image runs the rule on its own tokens and budget; its text pivots come from the
  non-visual tokens after it (the official code handles one image).
- A pool that runs out, or fewer text tokens than ``text_pivots``, give what there is (the official ``topk`` raises).
- LLaVA-NeXT: the image's tokens include its ``image_newline`` rows, as in the official code (``image_token_length``
  = the whole block); the official NeXT budget is ``keep_tokens=320``.
- Qwen3-VL: the hidden state compared is what layer ``K`` receives (layer ``K-1``'s output plus its DeepStack
  features when ``K-1`` is a DeepStack layer); removal before the last DeepStack layer is handled by the adapter.
- ``generate(use_cache=False)`` re-runs the prompt at every step: the selection of the call's first prefill is
  reused (decisions are the prompt's, frozen for decode), so cache == no cache.
- Composition: one pruner per model (a pre-LLM pruner and DART are refused with the reason); contrastive decoding
  (``vcd``, ``damro``) is refused; ``var`` / ``vhr`` compose through the layout DART publishes.

``h.stats`` (per input sample): ``layer`` (= K), ``kept_indices[row][image]`` (ascending LongTensor into the image's
tokens), ``pivots[row]`` = ``{"image": [[...] per image], "text": [[...] per image]}`` (image pivots relative to the
image's first token, text pivots to the first token after the image, by descending norm), ``per_pivot[row][image]``,
``visual_tokens_before`` / ``visual_tokens_after``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vtoolkit.hooks.attention import current_implementation, intercept
from vtoolkit.hooks.masks import install_flash_masks
from vtoolkit.hooks.midstack import MidStackPruner
from vtoolkit.hooks.sidestream import in_side_stream
from vtoolkit.methods.base import Method
from vtoolkit.methods.prune_base import BudgetConfig
from vtoolkit.registry import register_method
from vtoolkit_core.selection import dart_per_pivot, dart_select, key_l1_norms


@dataclass(frozen=True)
class DARTConfig(BudgetConfig):
    """K: first layer that sees the pruned sequence (keys and hidden states of layer K-1); keep_ratio (share KEPT,
    default 0.222) xor keep_tokens (official max_num_trunction: per pivot T // (P_img + P_txt)) xor ratio (official
    reduction_ratio = 1 - keep_ratio); image_pivots / text_pivots: P_img / P_txt."""

    K: int = 2
    ratio: float | None = None
    image_pivots: int = 4
    text_pivots: int = 4

    default_keep_ratio = 0.222

    def validate(self) -> None:
        if self.ratio is not None:
            if self.keep_ratio is not None or self.keep_tokens is not None:
                raise ValueError("give keep_ratio (share kept), keep_tokens (official max_num_trunction), or ratio "
                                 "(the official reduction_ratio, share dropped), not several")
            if not 0 <= float(self.ratio) < 1:
                raise ValueError(f"ratio (the official reduction_ratio, share of visual tokens DROPPED) must be in "
                                 f"[0, 1), got {self.ratio}")
            object.__setattr__(self, "keep_ratio", 1.0 - float(self.ratio))
            object.__setattr__(self, "ratio", None)        # one spelling after validation: keep_ratio
        super().validate()
        if not isinstance(self.K, int) or isinstance(self.K, bool) or self.K < 1:
            raise ValueError(f"K must be an integer >= 1 (keys and hidden states come from layer K-1), got {self.K!r}")
        for name in ("image_pivots", "text_pivots"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {v!r}")
        if self.image_pivots + self.text_pivots < 1:
            raise ValueError("image_pivots + text_pivots must be >= 1 (the budget is split over the pivots)")

    def per_pivot(self, n: int, what: str) -> int | None:
        """Tokens each pivot keeps for an image of ``n`` tokens (None: keep all)."""
        if self.image_pivots > n:
            raise ValueError(f"image_pivots={self.image_pivots} exceeds the {n} visual tokens of {what}")
        return dart_per_pivot(n, self.image_pivots + self.text_pivots, self.keep_ratio, self.keep_tokens,
                              self.image_pivots, what)

    def check_model(self, adapter, spans=None) -> None:
        """K < the LLM's layer count; ``keep_tokens`` and ``image_pivots`` within every image of ``spans``."""
        if self.K >= adapter.num_layers:
            raise ValueError(f"K={self.K} must be < the {adapter.num_layers} LLM layers (layers K..L-1 run on the "
                             f"kept tokens)")
        for b, sample in enumerate(spans or []):
            for span in sample:
                self.per_pivot(span.num_tokens, f"image {span.image_index} (sample {b})")


@register_method("dart", config=DARTConfig, kind="prune", stage="llm",
                 architectures=("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_onevision",
                                "internvl"),
                 requires=("LLM post-RoPE keys + hidden states at layer K-1 (no attention maps: sdpa, eager or "
                           "flash attention)",),
                 description="Keep the visual tokens least duplicated by a few key-norm pivots, from LLM layer K "
                             "(DART)")
class DART(Method):
    rewrites_sequence = True

    def check(self) -> None:
        super().check()
        impl = current_implementation(self.adapter.text_config)
        if "flex" in impl or "paged" in impl:
            raise ValueError(f"dart rewrites the attention masks of layers >= K, which needs 'sdpa', 'eager' or "
                             f"flash attention in the LLM; this model uses {impl!r}: "
                             f"model.set_attn_implementation({{'text_config': 'sdpa'}}) first")

    def install(self, hooks, ctx) -> None:
        self.ctx = ctx
        self._norms = self._hidden = self._frozen = None
        ctx.listeners.append(self)
        K = self.config.K
        intercept(hooks, self.adapter.text_config, [self.adapter.attention(K - 1)], self._observe_keys)
        # registered before the pruner's own pre-hook on layer K, so it sees layer K's full input first
        hooks.forward_pre(self.adapter.decoder_layers[K], self._observe_hidden, with_kwargs=True)
        MidStackPruner(self.adapter, ctx, K, self._select, owner=self.name).install(hooks)
        if "flash" in current_implementation(self.adapter.text_config):
            install_flash_masks(hooks, self.adapter, range(K, self.adapter.num_layers))

    def on_prefill(self, ctx) -> None:
        if ctx.new_call:
            super().on_prefill(ctx)
            self._frozen = None
        self._norms = self._hidden = None

    # -- what layer K-1 computed ------------------------------------------------------------------------------------
    def _full_prompt(self, length: int) -> bool:
        ids = self.ctx.inputs.get("input_ids")
        return (self.ctx.is_prefill and ids is not None and length == ids.shape[1]
                and not in_side_stream(self.adapter.model))

    def _observe_keys(self, module, query, key, value, attention_mask, kwargs):
        if query.shape[2] > 1 and self._full_prompt(key.shape[2]):
            self._norms = key_l1_norms(key)
        return None

    def _observe_hidden(self, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if self._full_prompt(hidden.shape[1]):
            self._hidden = self.adapter.final_norm.forward(hidden)   # .forward: the norm's own hooks stay out
        return None

    # -- the selection ----------------------------------------------------------------------------------------------
    def _select(self, ctx):
        if self._frozen is not None:         # generate(use_cache=False): this call's prompt was already decided
            return self._frozen
        if self._norms is None or self._hidden is None:
            raise RuntimeError(f"DART: layer {self.config.K - 1}'s keys or output were not recorded in this prefill")
        cfg = self.config
        ids = ctx.inputs["input_ids"]
        B, L = ids.shape
        m2 = ctx.inputs.get("attention_mask")
        nonpad = m2.bool() if m2 is not None and m2.dim() == 2 else torch.ones(B, L, dtype=torch.bool)
        plen = ctx.prompt_length or L
        spans = ctx.spans
        visual = torch.zeros(B, L, dtype=torch.bool)
        for b, sample in enumerate(spans):
            for span in sample:
                visual[b, span.positions.cpu()] = True
        nonpad = nonpad.cpu()
        keep, kept_idx, pivots, per, before, after = [], [], [], [], [], []
        for b, sample in enumerate(spans):
            start = int((~nonpad[b]).long().cumprod(0).sum())       # first real token of the (left-padded) row
            norms, hidden = self._norms[b, start:], self._hidden[b, start:]
            kb, ib, pb, nb = [], [], {"image": [], "text": []}, []
            for span in sample:
                pos = span.positions.cpu()
                what = f"image {span.image_index} (sample {b})"
                n_pp = cfg.per_pivot(span.num_tokens, what)
                after_img = torch.arange(int(pos[-1]) + 1, plen)
                text = after_img[nonpad[b, after_img] & ~visual[b, after_img]]
                kept, ip, tp = dart_select(norms, hidden, (pos - start).tolist(), (text - start).tolist(),
                                           cfg.image_pivots, cfg.text_pivots, n_pp)
                kept_pos = torch.as_tensor(kept, dtype=torch.long) + start
                kb.append(kept_pos.to(span.positions.device))
                ib.append(torch.searchsorted(pos, kept_pos))
                first = int(pos[0]) - start
                after_first = int(pos[-1]) + 1 - start
                pb["image"].append([p - first for p in ip])
                pb["text"].append([p - after_first for p in tp])
                nb.append(n_pp)
            keep.append(torch.cat(kb) if kb else torch.zeros(0, dtype=torch.long))
            kept_idx.append(ib)
            pivots.append(pb)
            per.append(nb)
            before.append(sum(s.num_tokens for s in sample))
            after.append(sum(k.numel() for k in kb))
        rows = ctx.sample_rows
        self._stats = {"layer": cfg.K, "kept_indices": [kept_idx[r] for r in rows], "pivots": [pivots[r] for r in rows],
                       "per_pivot": [per[r] for r in rows], "visual_tokens_before": [before[r] for r in rows],
                       "visual_tokens_after": [after[r] for r in rows]}
        self._frozen = keep
        return keep
