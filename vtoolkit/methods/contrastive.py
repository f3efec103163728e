"""Contrastive decoding inside the stock ``generate``: the machinery DAMRO and VCD share (one file per method on top).

Per decoding step, with ``l_full`` the next-token logits of the user's prompt and ``l_contrast`` those of a contrast
stream (DAMRO: the same prompt seeing only a few ViT outlier tokens; VCD: seeing a noised image)::

    l = (1 + alpha) * l_full - alpha * l_contrast
    l[y] = -inf   where   p_full(y) < beta * max_y' p_full(y')       (adaptive plausibility, on the FULL stream;
                                                                       beta = 0 switches it off)

then the token is the argmax of ``l`` (greedy) or drawn from ``softmax(l)`` (sampling). ``alpha = 0, beta = 0`` is the
baseline. Beams run on ``l`` as on any logits.

Logits processors (``processors=``):

- ``"direct"``: the contrasted distribution is used as it is - generate's shaping processors are neutralised for the
  call (temperature 1, top-k 0, top-p 1, min-p / typical-p / epsilon / eta / top-h off, repetition and
  encoder-repetition penalty 1, no-repeat-ngram 0, sequence bias and guidance off); length and format constraints
  (``min_new_tokens``, bad words, forced / suppressed tokens) still apply. This is what DAMRO's released code does
  (its replacement sampler comments every processor out); each non-neutral value bypassed is named in a warning,
  once per handle, with where it came from: the ``generate()`` call, the ``generation_config`` passed to it, or the
  model's own ``generation_config`` (e.g. Qwen's ``top_k=1, temperature=0.01``, which direct mode turns into sampling
  at T = 1 when ``do_sample=True``).
- ``"standard"``: generate applies its processors after the contrast, as the VCD release does.

How it runs (:mod:`vtoolkit.hooks.sidestream`): at the prefill a language-model pre-hook builds the contrast rows from
the call's inputs (:meth:`ContrastiveDecoding.contrast_rows`). When they have the main prompt's shape (VCD: the same
prompt with a noised image) both streams are prefilled as ONE forward of ``2B`` rows that writes the joined cache
itself; otherwise (DAMRO's short outlier prompt, a pruned main stream) the contrast rows are prefilled in one nested
call with their own cache, which is appended to the main cache when the main prefill is done. Either way every
decode step runs both streams as one batch of ``2B`` rows; a forward hook on
the LM head combines the two halves and hands ``generate`` the ``B`` contrasted rows. Every other field the user gets
(hidden states, attentions, the returned cache) holds the user's ``B`` rows too: the joined cache is cut back once
when ``generate`` returns (see :mod:`vtoolkit.hooks.sidestream`). ``generate(use_cache=False)``
re-runs the contrast prompt plus the tokens generated so far at every step (same tokens as the cached run).

Composition: a pre-LLM pruner (FasterVLM, random) may run first - the full stream is pruned, the contrast stream is
built from the call's own inputs; mid-stack pruners (FastV, DyVTE) and methods at the same stage are refused.
``h.stats``: ``changed_tokens`` (per sample: steps where the contrasted argmax differs from the full stream's, until
the sample's first EOS) and ``steps``.
"""
from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass

import torch

from vtoolkit.compat import get_cache, output_cache
from vtoolkit.config import MethodConfig
from vtoolkit.hooks.sidestream import (
    SideStream,
    contiguous_positions,
    continue_positions,
    in_side_stream,
    return_main_rows,
    side_active,
)
from vtoolkit.methods.base import Method

PROCESSOR_MODES = ("direct", "standard")
# generate's sampling-shaping settings, each with the values that mean "off" ("direct" mode sets them to None)
NEUTRAL = {"temperature": (1.0,), "top_k": (0,), "top_p": (1.0,), "min_p": (), "typical_p": (1.0,),
           "epsilon_cutoff": (0.0,), "eta_cutoff": (0.0,), "top_h": (), "repetition_penalty": (1.0,),
           "encoder_repetition_penalty": (1.0,), "no_repeat_ngram_size": (0,), "sequence_bias": (),
           "guidance_scale": (1.0,)}


def contrast_logits(full: torch.Tensor, contrast: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """``(1 + alpha) * full - alpha * contrast``, with ``-inf`` where ``p_full < beta * max p_full`` (last dim)."""
    out = (1 + alpha) * full - alpha * contrast
    if beta > 0:
        cutoff = math.log(beta) + full.max(dim=-1, keepdim=True).values
        out = out.masked_fill(full < cutoff, float("-inf"))
    return out


@dataclass(frozen=True)
class ContrastiveConfig(MethodConfig):
    alpha: float = 1.0
    beta: float = 0.1
    processors: str = "standard"

    def validate(self) -> None:
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or self.alpha < 0:
            raise ValueError(f"alpha (contrast strength) must be a number >= 0, got {self.alpha!r}")
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)) or not 0 <= self.beta < 1:
            raise ValueError(f"beta (plausibility cutoff) must be in [0, 1), got {self.beta!r}")
        if self.processors not in PROCESSOR_MODES:
            raise ValueError(f"processors must be one of {PROCESSOR_MODES}, got {self.processors!r}")


class ContrastiveDecoding(Method):
    """Base of contrastive-decoding methods; subclasses build the contrast rows (:meth:`contrast_rows`)."""

    def install(self, hooks, ctx) -> None:
        self.ctx = ctx
        ctx.listeners.append(self)
        a = self.adapter
        self.side: SideStream | None = None
        self._side_logits = None
        self._batched_prefill = False
        hooks.forward_pre(a.language_model, self._lm_pre, with_kwargs=True)
        hooks.forward(a.language_model, self._lm_post)
        hooks.forward(a.lm_head, self._combine)
        hooks.patch(a.model, "generate", self._generate)
        return_main_rows(hooks, a.model, lambda: self.side)      # the cache the user gets: B rows

    # -- generate: processors ---------------------------------------------------------------------------------------
    def _generate(self, inner, *args, **kwargs):
        if self.config.processors == "direct":
            self._neutralise_processors(kwargs)
        return inner(*args, **kwargs)

    def _neutralise_processors(self, kwargs) -> None:
        """processors='direct': every shaping setting of :data:`NEUTRAL` set to its neutral value for this call, with
        generate's own priority for where a value comes from (the call's keyword arguments, else the
        ``generation_config`` passed to the call, else the model's ``generation_config``; HF's global defaults, e.g.
        top_k = 50, are not the user's and go unnamed). Each non-neutral value bypassed is named with its source in
        one warning, once per handle (a setting warned about before, same value and source, is not repeated)."""
        given = kwargs.get("generation_config")
        own = getattr(self.adapter.model, "generation_config", None)
        target = copy.deepcopy(given) if given is not None else None
        sources = [(kwargs, "generate() call"), (given, "the generation_config passed to generate()"),
                   (own, "the model's generation_config")]

        def effective(key):
            for where, label in sources:
                value = where.get(key) if isinstance(where, dict) else getattr(where, key, None)
                if value is not None:
                    return value, label
            return None, None

        bypassed = []
        for key, off in NEUTRAL.items():
            value, source = effective(key)
            kwargs.pop(key, None)
            if value is not None and value not in off:
                bypassed.append((key, value, source))
            neutral = off[0] if off else None
            if target is None:                    # kwargs override the model's and the global defaults
                kwargs[key] = neutral
            else:                                 # the user's config, neutralised (no kwargs next to it) ...
                setattr(target, key, neutral)
                if neutral is None and getattr(own, key, None) is not None:
                    kwargs[key] = None            # ... except where generate would refill None from the model's
        if target is not None:
            kwargs["generation_config"] = target
        warned = self.__dict__.setdefault("_direct_warned", set())
        new = [(k, v, src) for k, v, src in bypassed if (k, repr(v), src) not in warned]
        if new:
            warned.update((k, repr(v), src) for k, v, src in new)
            sample, sample_src = effective("do_sample")
            note = (f"; do_sample=True ({sample_src}) now draws from softmax(l) itself" if sample else "")
            named = ", ".join(f"{k}={v!r} ({src})" for k, v, src in new)
            warnings.warn(f"{self.name}: processors='direct' uses the contrasted distribution as the official code "
                          f"does, so these generation settings are bypassed: {named}{note}; apply them with "
                          f"processors='standard' (warned once per handle)", UserWarning, stacklevel=4)

    # -- per call ---------------------------------------------------------------------------------------------------
    def on_prefill(self, ctx) -> None:
        if ctx.new_call:
            self._stats = {"changed_tokens": [0] * len(ctx.sample_rows if ctx.inputs.get("input_ids") is not None
                                                         else []), "steps": 0}
            self._done = None
        else:                      # generate(use_cache=False): this prefill re-runs the sequence after one more token
            self._note_chosen(ctx)
        self.side, self._side_logits = None, None
        ctx.expect(f"{self.name}:contrast", self.name, "the contrast stream was not prefilled in this forward")
        ctx.expect(f"{self.name}:combine", self.name, "the LM head did not combine the two streams' logits")

    def on_step(self, ctx) -> None:
        ctx.expect(f"{self.name}:widen", self.name, "the decode step did not run the contrast rows")
        ctx.expect(f"{self.name}:combine", self.name, "the LM head did not combine the two streams' logits")
        self._note_chosen(ctx)

    def _note_chosen(self, ctx) -> None:
        """A row whose last input token (the token chosen at the previous step) is EOS has finished."""
        if self._done is not None and ctx.step_input_ids is not None:
            eos = self._eos_ids()
            for j, r in enumerate(ctx.sample_rows):
                self._done[j] |= int(ctx.step_input_ids[r, -1]) in eos

    def contrast_rows(self, ctx, kwargs, n: int) -> tuple:
        """``(embeds [B, Ls, D], valid [B, Ls], positions [B, Ls] | [3, B, Ls] | None[, sources])`` of the contrast
        prompt, left-padded, for the call's rows: built from the first ``n`` positions of ``ctx.inputs`` (the prompt;
        with ``use_cache=False`` later prefills also hold the generated tokens). ``kwargs``: the language model's
        prefill arguments. ``sources = (columns [B, Ls], encoder_output | None)``, required when the rows hold visual
        tokens: the ``input_ids`` column each row holds and the encoding its visual tokens were embedded from (None:
        the call's own), from which the adapter gives them the model's other per-token inputs
        (:meth:`~vtoolkit.models.ModelAdapter.side_llm_inputs`; Qwen3-VL: their DeepStack features)."""
        raise NotImplementedError

    def unchanged_rows(self, ctx, kwargs, n: int):
        """The contrast rows of a call whose prompts hold no image: the prompt itself. A row without visual tokens
        has nothing to contrast, so its contrast row equals its main row (as for a text-only row in a batch with
        image rows); the result is the stock greedy token (``(1 + a) l - a l = l``, and the cutoff keeps the
        argmax)."""
        emb = kwargs["inputs_embeds"][:, :n]
        mask = ctx.inputs.get("attention_mask")
        valid = (mask[:, :n].bool().to(emb.device) if mask is not None and mask.dim() == 2
                 else torch.ones(emb.shape[:2], dtype=torch.bool, device=emb.device))
        pos = ctx.rope_positions()[..., :n].to(emb.device) if self.adapter.position_kind == "mrope" else None
        return emb, valid, pos

    def _lm_pre(self, module, args, kwargs):
        ctx = self.ctx
        if in_side_stream(self.adapter.model):
            return None
        if ctx.is_prefill:
            if ctx.inputs.get("input_ids") is None:
                raise ValueError(f"{self.name} needs input_ids at prefill to build its contrast stream; this call "
                                 f"passed only inputs_embeds")
            rows = self.contrast_rows(ctx, kwargs, ctx.prompt_length)
            embeds, valid, positions = self._with_generated(ctx, *rows[:3])
            self.side = SideStream(self.adapter, self.name)
            self.side.set_rows(embeds, valid, positions, self._llm_inputs(ctx, rows[3] if len(rows) > 3 else None,
                                                                          valid))
            ctx.mark(f"{self.name}:contrast")
            widened = self.side.widen_prefill(kwargs, get_cache(kwargs))
            self._batched_prefill = widened is not None
            if self._batched_prefill:      # same shape as the main prompt (VCD): one batched forward of 2B rows
                return (), widened
            self._side_logits = self._head(self.side.prefill())   # else a nested call with its own cache
            return None
        side = self.side
        if side is None:
            return None
        side.check_continuable()
        if side.parked:                    # a decode step by hand after a plain forward: join the rows again
            side.rejoin(get_cache(kwargs))
        if not side.joined:
            return None
        ctx.mark(f"{self.name}:widen")
        return (), self.side.widen(kwargs, get_cache(kwargs))

    def _with_generated(self, ctx, embeds, valid, positions):
        """generate(use_cache=False): every step re-runs the prompt plus the tokens generated so far; append those
        to the contrast prompt (same tokens, positions continuing the contrast prompt's)."""
        ids = ctx.inputs["input_ids"]
        extra = ids.shape[1] - ctx.prompt_length
        if ctx.new_call or extra <= 0:
            return embeds, valid, positions
        gen = ids[:, ctx.prompt_length:].to(embeds.device)
        g_emb = self.adapter.model.get_input_embeddings()(gen).to(embeds.dtype)
        if positions is None:
            positions = contiguous_positions(valid)
        positions = torch.cat([positions, continue_positions(positions, valid, 0, extra)], -1)
        return torch.cat([embeds, g_emb], 1), torch.cat([valid, torch.ones_like(gen, dtype=torch.bool)], 1), positions

    def _llm_inputs(self, ctx, sources, valid) -> dict:
        """The contrast rows' other per-token language-model inputs (adapter; Qwen3-VL DeepStack), with the tokens
        generated so far (``use_cache=False``) as the input columns after the prompt."""
        if sources is None:
            return {}
        columns, encoding = sources
        extra = valid.shape[1] - columns.shape[1]
        if extra > 0:
            gen = ctx.prompt_length + torch.arange(extra, device=columns.device)
            columns = torch.cat([columns, gen.expand(columns.shape[0], -1)], 1)
        return self.adapter.side_llm_inputs(ctx, columns, valid, encoding)

    def _lm_post(self, module, args, output):
        if in_side_stream(self.adapter.model) or self.side is None:
            return None
        if not self.ctx.is_prefill:        # hidden states / attentions of a decode step: the user's rows only
            if self.side.joined:
                self.side.keep_main_rows(output)
            return None
        if self._batched_prefill:
            self._side_logits = self._head(self.side.split_prefill(output))
            return output
        cache = output_cache(output)
        if cache is not None:
            self.side.join(cache)
        return None

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        with side_active(self.adapter.model):
            return self.adapter.lm_head(hidden)

    def _combine(self, module, args, out):
        if in_side_stream(self.adapter.model) or self.side is None:
            return None
        ctx = self.ctx
        if ctx.is_prefill:
            full, contrast = out, self._side_logits[:, None].to(out.dtype)
            main = out
        else:
            main, side = self.side.split(out)
            full, contrast = main, side
        last = contrast_logits(full[:, -1:], contrast[:, -1:], self.config.alpha, self.config.beta)
        self._count_changes(ctx, full[:, -1], last[:, -1])
        ctx.mark(f"{self.name}:combine")
        if main.shape[1] == 1:
            return last
        return torch.cat([main[:, :-1], last], 1)

    def _count_changes(self, ctx, full: torch.Tensor, combined: torch.Tensor) -> None:
        changed = (full.argmax(-1) != combined.argmax(-1)).tolist()
        if self._done is None:
            self._done = [False] * len(ctx.sample_rows)
        for j, r in enumerate(ctx.sample_rows):
            if not self._done[j]:
                self._stats["changed_tokens"][j] += int(changed[r])
        self._stats["steps"] += 1

    def _eos_ids(self) -> set[int]:
        e = getattr(self.adapter.model.generation_config, "eos_token_id", None)
        if e is None:
            return set()
        return {int(e)} if isinstance(e, int) else {int(x) for x in e}
