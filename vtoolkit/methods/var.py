"""VAR: visual attention sink redistribution (Kang et al., "See what you are told: visual attention sink in large
multimodal models", ICLR 2025; official code ``seilk/VisAttnSink``, docs/methods.md section 2).

Some tokens ("sinks") soak up attention without carrying information. In image-centric attention rows VAR moves part
of the sinks' attention to the other visual tokens. Three steps, as the official code does them:

1. **Sinks** (prefill only, per sample and per layer ``l`` in ``layers``): on the residual stream ``h`` ENTERING layer
   ``l`` (before its input norm), over every prompt token ``t`` (text tokens such as BOS can be sinks)::

       phi(h_t) = max_{d in sink_dims} |h_t[d]| / sqrt(mean_d(h_t^2) + 1e-6);     t is a sink  iff  phi(h_t) > tau

   The indices are kept for every decode step; generated tokens are never sinks.
2. **Image-centric rows**, from the UNMODIFIED probabilities ``A`` of the same layer, per (sample, head, query row),
   with ``V`` the visual tokens and ``S_v`` the visual sinks::

       portion = sum_{S_v} A / sum_{j in V} (A_j + 1e-6) <= rho     and     sum_V A >= summ

   A sample whose layer has no visual sink is left untouched in that layer.
3. **Redistribution** on those rows (prefill: the rows after the sample's last visual token; decode: the new row of
   every step). Every sink ``j`` (visual and text) keeps the fraction ``p`` of its weight; the freed budget
   ``Omega = (1 - p) * sum_{sinks} A`` goes to the non-sink visual tokens in proportion to their attention::

       A'_j = p A_j  (j a sink);     A'_j = A_j + Omega A_j / sum_{V \\ S_v} A  (j in V \\ S_v);     else A'_j = A_j

   Rows still sum to 1; ``A' V`` replaces the layer's attention output.

``p`` is the fraction KEPT, as in the official code (``attn *= p`` on the sinks); the paper's "moved" fraction is
``1 - p``. Official defaults (``LogicEngine.activate`` / ``A_exps/lv1.5_7b.yml``): ``p=0.6`` (40 % of sink attention
moves), ``tau=20``, ``rho=0.5``, ``summ=0.2``, layers ``2 .. L-1`` (the released code's ``except_last_layer`` is dead
code, so the last layer is modified too; ``layers=None`` does the same). ``p=1`` is the identity: no layer computes
probabilities and the model runs its stock attention.

``sink_dims`` (the massive-activation dimensions of the LLM): presets for the LLaMA-2 backbones of the official
constants, recognised from the LLM config (``model_type == "llama"`` with the LLaMA-2 shape: hidden 4096, 32 layers,
32 heads, intermediate 11008 -> 7B ``{1415, 2533}``, e.g. LLaVA-1.5-7B / LLaVA-NeXT-Vicuna-7B; hidden 5120, 40 layers,
40 heads, intermediate 13824 -> 13B ``{2100, 4743}``). For any other LLM run :func:`discover_sink_dims` on a few
dozen real prompts and pass ``sink_dims=``; without a preset and without ``sink_dims`` applying VAR raises.

How it runs here (vs the official code: eager attention in every layer, batch 1, global state, a per-head loop):

- Sinks come from a pre-hook on each modified layer's input norm (after any pre-hook of the layer itself, so a
  mid-stack pruner's rewrite is seen) in the coordinates the layer sees: with ``["fastervlm", "var"]`` or
  ``["fastv", "var"]`` the visual positions are the kept ones of that layer (``CallContext.visual_mask(layer)``;
  FastV ranks tokens from layer K-1's q/k, i.e. its unmodified attention).
  Visual positions are every image placeholder of the sequence (LLaVA-NeXT: the whole block, ``image_newline``
  tokens included; several images: all of them). Pad slots are never sinks and never receive mass.
- The modified layers run through the attention interception of :mod:`vtoolkit.hooks.attention`: probabilities are
  computed, vectorised over batch, heads and rows, only for the query rows VAR may change (prefill: from the
  earliest first-changeable row among the samples with a visual sink; decode: the new row); the earlier rows of those layers, all
  other layers and the vision tower keep the model's SDPA (or eager) attention. The redistribution is one masked
  multiply of the probabilities (``[B, H, rows, prompt]``) in float32; the weights returned are None as with SDPA.
- Batched with padding, per sample: each sample has its own sinks, visual mask and first modified row.
- ``generate(use_cache=False)`` recomputes prompt + generated tokens at every step; the sinks are then still those
  of the prompt (detected on the prompt's positions only; the prompt's hidden states do not depend on later tokens),
  and the rows of generated tokens are modified as at a cached decode step, so the tokens equal the cached run's.

Named deviations: the official code keeps the image span ``[im, im + pa)`` of a single image (LLaVA-1.5 only) and
the 7B dims for every model (its setter is never called; here a 13B LLaMA-2 gets the 13B dims); the redistribution runs in float32 (official: the model
dtype); a selected row whose visual attention is all on sinks has nowhere to move mass and is left unchanged
(official: division by zero). Inference only (no attention dropout).
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from vtoolkit.config import MethodConfig
from vtoolkit.hooks.attention import base_attention, current_implementation, intercept
from vtoolkit.hooks.sidestream import in_side_stream
from vtoolkit.methods.base import Method
from vtoolkit.registry import register_method

EPS_RMS = 1e-6      # inside the square root of the RMS (official DimProspector.rmsnorm)
EPS_PORTION = 1e-6  # added to every visual probability in the portion's denominator (official HeadFork)

# LLaMA-2 backbones of the official constants (src/logic/constants.py): the LLM config's shape -> sink dims
PRESETS: dict[str, tuple[dict[str, int], tuple[int, ...]]] = {
    "llama-2-7b": ({"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
                    "intermediate_size": 11008}, (1415, 2533)),
    "llama-2-13b": ({"hidden_size": 5120, "num_hidden_layers": 40, "num_attention_heads": 40,
                     "intermediate_size": 13824}, (2100, 4743)),
}

_FORCE_EAGER = False


@contextlib.contextmanager
def force_eager():
    """Tests: compute the probabilities and the redistribution even at ``p == 1`` (which is otherwise skipped as the
    identity), so that "p = 1 == baseline" checks the eager path."""
    global _FORCE_EAGER
    old, _FORCE_EAGER = _FORCE_EAGER, True
    try:
        yield
    finally:
        _FORCE_EAGER = old


def preset_sink_dims(text_config) -> tuple[str, tuple[int, ...]] | None:
    """``(preset name, dims)`` when the LLM config has the shape of a LLaMA-2 backbone with official dims, else None."""
    if getattr(text_config, "model_type", None) != "llama":
        return None
    for name, (shape, dims) in PRESETS.items():
        if all(getattr(text_config, k, None) == v for k, v in shape.items()):
            return name, dims
    return None


def _number(name: str, value, lo: float | None = None, hi: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be in {rng}, got {value!r}")
    return float(value)


def _int_tuple(name: str, value) -> tuple[int, ...] | None:
    if value is None:
        return None
    items = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    try:
        items = list(items)
    except TypeError:
        raise ValueError(f"{name} must be a list of non-negative integers, got {value!r}") from None
    if not items or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in items):
        raise ValueError(f"{name} must be a non-empty list of non-negative integers, got {value!r}")
    return tuple(sorted(set(items)))


@dataclass(frozen=True)
class VARConfig(MethodConfig):
    """p: share of sink attention KEPT (the paper moves 1 - p); tau: sink threshold on the RMS-normalised magnitude;
    rho: max visual-sink share of a row's visual attention; summ: min visual attention of a row; layers: decoder
    layers to modify (None: 2 .. L-1); sink_dims: massive-activation dims (None: the LLaMA-2 preset)."""

    p: float = 0.6
    tau: float = 20.0
    rho: float = 0.5
    summ: float = 0.2
    layers: tuple[int, ...] | None = None
    sink_dims: tuple[int, ...] | None = None

    def validate(self) -> None:
        _number("p (the share of sink attention KEPT)", self.p, 0.0, 1.0)
        _number("tau", self.tau, 0.0)
        _number("rho", self.rho, 0.0, 1.0)
        _number("summ", self.summ, 0.0, 1.0)
        object.__setattr__(self, "layers", _int_tuple("layers", self.layers))
        object.__setattr__(self, "sink_dims", _int_tuple("sink_dims", self.sink_dims))

    def check_model(self, adapter, spans=None) -> None:
        """layers within the LLM's layers (the default 2 .. L-1 not empty); sink_dims below its hidden size."""
        n = adapter.num_layers
        layers = self.layers if self.layers is not None else tuple(range(2, n))
        bad = [i for i in layers if i >= n]
        if bad:
            raise ValueError(f"layers: {bad} out of range for the {n}-layer LLM (valid: 0 .. {n - 1})")
        if not layers:
            raise ValueError(f"layers: the default (2 .. L-1) is empty for a {n}-layer LLM; pass layers=[...]")
        hidden = adapter.text_config.hidden_size
        bad = [d for d in (self.sink_dims or ()) if d >= hidden]
        if bad:
            raise ValueError(f"sink_dims: {bad} >= the LLM hidden size {hidden}")


# ---------------------------------------------------------------------------------------------------- the math
def sink_scores(hidden: torch.Tensor, dims) -> torch.Tensor:
    """``phi`` per token, ``[B, L]`` float32: ``max_{d in dims} |h[d]| / sqrt(mean(h^2) + 1e-6)``."""
    x = hidden.float()
    idx = torch.as_tensor(dims, device=x.device)
    return x.index_select(-1, idx).abs().amax(-1) * torch.rsqrt(x.pow(2).mean(-1) + EPS_RMS)


@dataclass
class KeyMasks:
    """Per-key masks of one layer, built once per prefill (:func:`key_masks`) and reused at every decode step."""

    sums: torch.Tensor        # [B, 1, P, 3] float32: visual, visual sinks, all sinks (one matmul gives the three sums)
    n_vis: torch.Tensor       # [B, 1, 1] float32: visual tokens per sample
    sinks: torch.Tensor       # [B, 1, 1, P] bool
    other: torch.Tensor       # [B, 1, 1, P] bool: neither a sink nor a receiver (factor 1)
    active: torch.Tensor      # [B, 1, 1] bool: the sample has a visual sink


def key_masks(sinks: torch.Tensor, visual: torch.Tensor) -> KeyMasks:
    """:class:`KeyMasks` from ``sinks``, ``visual`` ``[B, P]`` bool."""
    vsink = sinks & visual
    receivers = visual & ~sinks
    return KeyMasks(sums=torch.stack([visual, vsink, sinks], -1).float()[:, None],
                    n_vis=visual.sum(1).float()[:, None, None], sinks=sinks[:, None, None, :],
                    other=~(sinks | receivers)[:, None, None, :], active=vsink.any(1)[:, None, None])


def redistribute(probs: torch.Tensor, sinks: torch.Tensor, visual: torch.Tensor, rows: torch.Tensor | None, p: float,
                 rho: float, summ: float, keys: KeyMasks | None = None) -> torch.Tensor:
    """HeadFork + VAR on attention probabilities, in place; returns the ``[B, H, Q]`` bool of redistributed rows.

    ``probs [B, H, Q, K]`` (float32, rows sum to 1; modified in place on the first ``P`` columns); ``sinks``,
    ``visual`` ``[B, P]`` bool over the first ``P <= K`` key columns (the prompt; later keys are generated tokens:
    neither sinks nor visual); ``rows [B, Q]`` bool: the query rows VAR may change (None: all; a sample without a
    visual sink is never changed); ``keys``: :func:`key_masks` of ``sinks, visual``, when already built.
    """
    P = sinks.shape[1]
    keys = keys if keys is not None else key_masks(sinks, visual)
    a = probs[..., :P]
    s_vis, s_vsink, s_sink = torch.matmul(a, keys.sums).unbind(-1)         # each [B, H, Q]
    s_recv = s_vis - s_vsink
    portion = s_vsink / (s_vis + EPS_PORTION * keys.n_vis)
    sel = (portion <= rho) & (s_vis >= summ) & (s_recv > 0) & keys.active
    if rows is not None:
        sel &= rows[:, None, :]
    gain = torch.where(sel, 1.0 + (1.0 - p) * s_sink / s_recv.clamp_min(torch.finfo(probs.dtype).tiny), 1.0)
    keep = torch.where(sel, p, 1.0)
    # one [B, H, Q, P] factor: p on sinks, 1 + Omega / sum(receivers) on the receivers, 1 elsewhere
    factor = torch.where(keys.sinks, keep[..., None], gain[..., None])
    factor.masked_fill_(keys.other, 1.0)
    a.mul_(factor)
    return sel


# ---------------------------------------------------------------------------------------------------- the method
@dataclass
class _LayerState:
    """What the prefill decided for one layer, in that layer's coordinates (``P`` prompt columns)."""

    sinks: torch.Tensor       # [B, P] bool
    visual: torch.Tensor      # [B, P] bool
    nonpad: torch.Tensor      # [B, P] bool: not padding
    row0: torch.Tensor        # [B] long: first row VAR may change (after the last visual token; P without image)
    active: torch.Tensor      # [B] bool: the sample has a visual sink here
    has_visual: torch.Tensor  # [B] bool: the sample has visual tokens here
    keys: KeyMasks
    first_row: int            # min of row0 over active samples (rows before it are never changed)
    any_active: bool
    n_visual: int             # samples with visual tokens
    counts: torch.Tensor = field(default=None)   # [2] long: (head, row) pairs redistributed, considered (prefill)
    considered: int = 0       # (head, row) pairs considered at decode steps (known without looking at the device)


@register_method("var", config=VARConfig, kind="mitigate", stage="llm_attention",
                 architectures=("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_onevision",
                                "internvl"),
                 requires=("attention probabilities of the modified LLM layers (computed there; other layers keep "
                           "SDPA)", "sink_dims (LLaMA-2 preset, or discover_sink_dims)"),
                 description="Visual attention sink redistribution in image-centric rows (VAR)")
class VAR(Method):
    """VAR; see the module docstring for the algorithm, defaults and deviations."""

    supports_video = False
    supports_continuation = False

    def check(self) -> None:
        super().check()
        cfg, n = self.config, self.adapter.num_layers
        layers = cfg.layers if cfg.layers is not None else tuple(range(2, n))
        dims = cfg.sink_dims
        if dims is None:
            preset = preset_sink_dims(self.adapter.text_config)
            if preset is None:
                raise ValueError(
                    f"var needs the massive-activation dimensions of this LLM (sink_dims): there is a preset only for "
                    f"the LLaMA-2 7B/13B backbones, and this model's LLM "
                    f"({getattr(self.adapter.text_config, 'model_type', '?')}, hidden size "
                    f"{self.adapter.text_config.hidden_size}) has none. Find them with "
                    f"vtoolkit.methods.var.discover_sink_dims(model, batches) and pass sink_dims=[...]")
            dims = preset[1]
        hidden = self.adapter.text_config.hidden_size
        bad = [d for d in dims if d >= hidden]
        if bad:
            raise ValueError(f"sink_dims: {bad} >= the LLM hidden size {hidden}")
        impl = current_implementation(self.adapter.text_config)
        if "flash" in impl or "flex" in impl or "paged" in impl:
            raise ValueError(f"var computes attention probabilities in the modified layers from the mask of the base "
                             f"attention, which needs 'sdpa' or 'eager' in the LLM; this model uses {impl!r}: "
                             f"model.set_attn_implementation({{'text_config': 'sdpa'}}) first")
        self.layers, self.dims = tuple(layers), tuple(dims)

    def install(self, hooks, ctx) -> None:
        self.ctx = ctx
        self._state: dict[int, _LayerState] = {}
        self._active = False
        ctx.listeners.append(self)
        for i in self.layers:
            hooks.forward_pre(self.adapter.input_norm(i), self._detector(i), with_kwargs=True)
        modules = [self.adapter.attention(i) for i in self.layers]
        self._layer_of = {id(m): i for m, i in zip(modules, self.layers)}
        intercept(hooks, self.adapter.text_config, modules, self._attend)

    # -- per call ---------------------------------------------------------------------------------------------------
    def on_prefill(self, ctx) -> None:
        super().on_prefill(ctx)
        self._state = {}
        self._active = ctx.has_visual
        if not self._active:
            return
        if ctx.inputs.get("input_ids") is None:
            raise ValueError("var needs input_ids at prefill to locate the visual tokens; this call passed only "
                             "inputs_embeds")
        for i in self.layers:
            ctx.expect(f"var:sinks{i}", self.name, f"the input-norm pre-hook of decoder layer {i} did not see this "
                       f"prefill, so no sink token was detected there")
            ctx.expect(f"var:attn{i}", self.name, f"the attention interceptor of decoder layer {i} did not run, so its "
                       f"attention was not redistributed")

    def on_step(self, ctx) -> None:
        for i, st in self._state.items():
            if st.any_active:
                ctx.expect(f"var:attn{i}", self.name, f"the attention interceptor of decoder layer {i} did not run at "
                           f"this decode step, so its attention was not redistributed")

    def _detector(self, layer: int):
        def hook(module, args, kwargs):
            ctx = self.ctx
            if not (self._active and ctx.is_prefill) or in_side_stream(self.adapter.model):
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            ctx.mark(f"var:sinks{layer}")
            self._state[layer] = self._detect(layer, hidden)
            return None

        return hook

    def _detect(self, layer: int, hidden: torch.Tensor) -> _LayerState:
        ctx, dev = self.ctx, hidden.device
        B, L = hidden.shape[:2]
        visual = ctx.visual_mask(layer).to(dev)
        nonpad = ctx.nonpad_mask(layer).to(dev)
        prompt = nonpad        # where sinks may be
        if visual.shape != (B, L):
            raise RuntimeError(f"var: decoder layer {layer} receives {L} positions for {B} rows but the call's layout "
                               f"describes {tuple(visual.shape)}: a hook rewrote the sequence without publishing it")
        if ctx.recompute:    # generate(use_cache=False): the columns after the prompt are generated tokens
            seen = ctx.layout.at(layer)
            src = seen[0].to(dev) if seen is not None else torch.arange(L, device=dev).expand(B, L)
            prompt = prompt & (src < ctx.prompt_length)
        sinks = (sink_scores(hidden, self.dims) > self.config.tau) & prompt
        pos = torch.arange(L, device=dev)
        last = torch.where(visual, pos, -1).amax(1)
        row0 = torch.where(last >= 0, last + 1, L)
        active = (sinks & visual).any(1)
        first = torch.where(active, row0, L).amin()
        first_row, any_active, n_visual = torch.stack([first, active.any().long(), (last >= 0).sum()]).tolist()
        return _LayerState(sinks, visual, nonpad, row0, active, last >= 0, key_masks(sinks, visual), int(first_row),
                           bool(any_active), int(n_visual), torch.zeros(2, dtype=torch.long, device=dev))

    # -- attention ----------------------------------------------------------------------------------------------------
    def _attend(self, module, query, key, value, attention_mask, kwargs):
        if in_side_stream(self.adapter.model):   # another method's side rows (VHR's text-only prompt: no visual sink)
            return None
        layer = self._layer_of[id(module)]
        self.ctx.mark(f"var:attn{layer}")
        st = self._state.get(layer)
        if st is None:
            return None
        B, H, Lq, _ = query.shape
        Lk, P = key.shape[2], st.sinks.shape[1]
        past = Lk - Lq
        # rows VAR may change: after the sample's last visual token and not padding; a generated row (position >= P)
        # qualifies in every sample that has visual tokens
        n_prompt_rows = min(max(P - past, 0), Lq)
        if n_prompt_rows == 0:                     # decode: every row (a sample without visual sink stays unchanged)
            rows = None
            st.considered += st.n_visual * H * Lq
        else:
            qpos = torch.arange(past, Lk, device=query.device)
            nonpad = torch.ones(B, Lq, dtype=torch.bool, device=query.device)
            nonpad[:, :n_prompt_rows] = st.nonpad[:, past:past + n_prompt_rows]
            rows = (qpos[None, :] >= st.row0[:, None]) & nonpad & st.has_visual[:, None]
            st.counts[1] += rows.sum() * H
        r0 = min(st.first_row, Lq) if past == 0 else 0   # rows before r0 are unchanged in every sample
        if not st.any_active or r0 >= Lq or (self.config.p == 1.0 and not _FORCE_EAGER):
            return None
        scaling = kwargs.get("scaling") or getattr(module, "scaling", None) or query.shape[-1] ** -0.5
        mask = attention_mask[:, :, r0:] if attention_mask is not None else None
        probs = _probs(query[:, :, r0:], key, mask, scaling, past + r0)
        sel = redistribute(probs, st.sinks, st.visual, rows[:, r0:] if rows is not None else None, self.config.p,
                           self.config.rho, self.config.summ, st.keys)
        st.counts[0] += sel.sum()
        out = _apply(probs.to(value.dtype), value)                       # [B, H, Lq - r0, d]
        out = out.transpose(1, 2)
        if r0 > 0:       # the rows before, untouched: the base attention (SDPA) on those rows
            base = base_attention(self.adapter.text_config)
            if attention_mask is None:      # causal without padding: the square prefix of the keys
                head, _ = base(module, query[:, :, :r0], key[:, :, :r0], value[:, :, :r0], None, **kwargs)
            else:                           # every key, as the full call (a fully masked pad row attends alike)
                head, _ = base(module, query[:, :, :r0], key, value, attention_mask[:, :, :r0], **kwargs)
            out = torch.cat([head.to(out.dtype), out], 1)
        return out.contiguous(), None

    # -- stats --------------------------------------------------------------------------------------------------------
    @property
    def stats(self) -> dict[str, Any]:
        """``sinks`` / ``visual_sinks``: per input sample, ``{layer: positions}`` (positions in the sequence that layer
        sees: the processor's positions, or the kept rows after pruning); ``num_sinks`` / ``num_visual_sinks`` their
        counts; ``rows_redistributed`` / ``rows_considered``: per layer, (head, row) pairs redistributed / eligible
        (rows after the last visual token and every decode row, over the LLM's rows) in the last call, and
        ``redistributed_share`` their ratio."""
        out = dict(self._stats)
        if not self._state:
            return out
        rows = self.ctx.sample_rows
        sinks = [{i: st.sinks[r].nonzero().flatten().tolist() for i, st in self._state.items()} for r in rows]
        vis = [{i: (st.sinks[r] & st.visual[r]).nonzero().flatten().tolist() for i, st in self._state.items()}
               for r in rows]
        counts = {i: [c[0], c[1] + st.considered] for i, st in self._state.items() for c in [st.counts.tolist()]}
        out.update(
            layers=list(self.layers), sink_dims=list(self.dims), sinks=sinks, visual_sinks=vis,
            num_sinks=[{i: len(v) for i, v in s.items()} for s in sinks],
            num_visual_sinks=[{i: len(v) for i, v in s.items()} for s in vis],
            rows_redistributed={i: c[0] for i, c in counts.items()},
            rows_considered={i: c[1] for i, c in counts.items()},
            redistributed_share={i: (c[0] / c[1] if c[1] else 0.0) for i, c in counts.items()})
        return out


def _grouped(query: torch.Tensor, n_kv: int) -> torch.Tensor:
    """``[B, H, Q, d]`` -> ``[B, H_kv, (H / H_kv) * Q, d]`` (head ``h`` uses kv head ``h // (H / H_kv)``; no copy)."""
    B, H, Q, d = query.shape
    return query.reshape(B, n_kv, (H // n_kv) * Q, d)


def _probs(query, key, mask, scaling, q_offset: int) -> torch.Tensor:
    """Eager attention probabilities ``[B, H, Q, Lk]`` (float32) of the query rows at positions ``q_offset ..``,
    GQA without repeating K; ``mask``: bool (True = attend), additive float, or None (causal, no padding)."""
    B, H, Q, _ = query.shape
    n_kv, Lk = key.shape[1], key.shape[2]
    w = torch.matmul(_grouped(query, n_kv), key.transpose(2, 3)).view(B, H, Q, Lk) * scaling
    if mask is not None:
        m = mask[:, :, :, :Lk]
        if m.dtype == torch.bool:
            w = w.masked_fill(~m, torch.finfo(w.dtype).min)
        else:
            w = w + m
    elif q_offset < Lk - 1:                        # causal: the row at position q sees keys <= q
        qpos = torch.arange(q_offset, q_offset + Q, device=w.device)
        w = w.masked_fill(torch.arange(Lk, device=w.device)[None, :] > qpos[:, None], torch.finfo(w.dtype).min)
    return torch.softmax(w, dim=-1, dtype=torch.float32)


def _apply(probs: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``probs [B, H, Q, Lk] @ value [B, H_kv, Lk, d]`` -> ``[B, H, Q, d]`` (GQA without repeating V)."""
    B, H, Q, Lk = probs.shape
    n_kv = value.shape[1]
    return torch.matmul(probs.reshape(B, n_kv, (H // n_kv) * Q, Lk), value).view(B, H, Q, value.shape[-1])


# ---------------------------------------------------------------------------------------------- discovering dims
@dataclass(frozen=True)
class SinkDims:
    """What :func:`discover_sink_dims` found: ``dims`` (pass as ``sink_dims=``) and ``margins`` (each dim's peak
    RMS-normalised magnitude over ``tau``), ``runner_up`` (the largest peak over ``tau`` among the dims not chosen),
    and per dim ``peak`` and ``share`` (the share of (token, layer) pairs above ``tau``)."""

    dims: tuple[int, ...]
    margins: tuple[float, ...]
    runner_up: float
    peak: torch.Tensor
    share: torch.Tensor
    tau: float
    layers: tuple[int, ...]
    tokens: int


@torch.no_grad()
def discover_sink_dims(model, batches: Iterable[dict], tau: float = 20.0, layers=None, max_dims: int = 3,
                       min_margin: float = 1.5, max_share: float = 0.1) -> SinkDims:
    """Find the massive-activation dimensions of an LLM (the ``sink_dims`` VAR needs) from sample inputs.

    Procedure (docs/methods.md 2.4): run the model on ``batches`` (dicts of model inputs, e.g. from
    ``adapter.prepare_inputs``; a few dozen real image + question prompts); on the residual stream entering each
    decoder layer in ``layers`` (default ``2 .. L-1``, as VAR), take the parameter-free RMS-normalised magnitude
    ``|h_t[d]| / sqrt(mean(h_t^2) + 1e-6)`` of every non-pad token ``t`` and dim ``d``. Per dim: ``peak`` = its maximum,
    ``share`` = the share of (token, layer) pairs where it exceeds ``tau``. A sink dim is one where a FEW tokens exceed
    ``tau`` by a WIDE margin: ``peak >= min_margin * tau`` and ``share <= max_share``; the ``max_dims`` largest peaks
    are returned with ``margins = peak / tau``. ``runner_up`` says how far the best dim left out got: a clear gap
    between the margins and it means massive activations; no dim (``dims == ()``) means none at this ``tau`` (the
    model has none, or ``tau`` is too high for it: the normalised magnitude of one dim is at most ``sqrt(hidden)``).

    >>> found = discover_sink_dims(model, [batch1, batch2])
    >>> h = vt.apply_method(model, "var", sink_dims=found.dims)
    """
    import vtoolkit as vt

    if vt.active_handles(model):
        raise ValueError("discover_sink_dims runs the stock model: remove the vtoolkit handles applied to it first")
    adapter = vt.models.get_adapter(model)
    n = adapter.num_layers
    layers = tuple(range(2, n)) if layers is None else _int_tuple("layers", layers)
    if not layers or max(layers) >= n:
        raise ValueError(f"layers must be in 0 .. {n - 1} (default 2 .. L-1), got {layers}")
    hidden_size = adapter.text_config.hidden_size
    peak = torch.zeros(hidden_size, dtype=torch.float32)
    over = torch.zeros(hidden_size, dtype=torch.float64)
    seen = {"pairs": 0, "tokens": 0, "mask": None}

    def hook(module, args, kwargs):
        h = (args[0] if args else kwargs["hidden_states"]).float()
        r = h.abs() * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS_RMS)      # [B, L, D]
        m = seen["mask"]
        if m is not None and m.shape == r.shape[:2]:
            r = r[m.to(r.device)]
        else:
            r = r.flatten(0, 1)
        peak.copy_(torch.maximum(peak, r.amax(0).cpu()))
        over.add_((r > tau).sum(0).cpu().double())
        seen["pairs"] += r.shape[0]
        return None

    handles = [adapter.input_norm(i).register_forward_pre_hook(hook, with_kwargs=True) for i in layers]
    try:
        for batch in batches:
            mask = batch.get("attention_mask")
            seen["mask"] = mask.bool() if mask is not None and mask.dim() == 2 else None
            seen["tokens"] += int(mask.sum()) if seen["mask"] is not None else int(batch["input_ids"].numel())
            model(**batch, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    if not seen["pairs"]:
        raise ValueError("discover_sink_dims: no tokens were seen (empty batches?)")
    share = (over / seen["pairs"]).float()
    ok = (peak >= min_margin * tau) & (share <= max_share)
    order = torch.argsort(peak, descending=True)
    chosen = [int(d) for d in order if ok[d]][:max_dims]
    rest = [float(peak[d]) for d in order if int(d) not in chosen]
    return SinkDims(dims=tuple(sorted(chosen)), margins=tuple(float(peak[d] / tau) for d in sorted(chosen)),
                    runner_up=(rest[0] / tau) if rest else 0.0, peak=peak, share=share, tau=float(tau),
                    layers=layers, tokens=seen["tokens"])
