"""Side streams: rows a method runs through the LLM next to the user's batch, inside the stock ``generate``.

VHR compares every head with its output on the same prompt without the image; DAMRO and VCD contrast the next-token
logits with those of the same prompt seeing only a few ViT outlier tokens / a noised image. Each needs a second
stream of rows with its own positions (and, for contrastive decoding, its own KV cache) that

- every other hook recognises as *not* a new call: while a side stream runs, :func:`in_side_stream` is True for the
  model, and the shared mechanics (the call context, pre-LLM and mid-stack pruners, vision scorers, other methods'
  layer hooks) leave it alone;
- touches no model-global state: its rows go straight to the decoder layers / the language model with explicit
  positions, so e.g. Qwen's ``rope_deltas`` (set by the main stream's prefill) is never read or written for them.

A :class:`SideStream` holds left-padded rows (``embeds [B, Ls, D]``, ``valid [B, Ls]``, text ``positions [B, Ls]`` or
M-RoPE ``[3, B, Ls]``) and runs them in one of two ways:

**Lockstep** (:meth:`SideStream.start`, :meth:`SideStream.advance`), no cache: the owner advances the side rows one
decoder layer at a time from the main stream's hooks, so a decision at layer ``l`` can compare both streams after
both ran layers ``< l`` with the same interventions (VHR: "layer by layer in one pass"). Each side layer is a nested
call of the same decoder layer module; its cost is that of the side rows only (VHR's text-only rows are short).

**Own cache, then batched decode** (:meth:`SideStream.prefill`, :meth:`SideStream.join`, :meth:`SideStream.widen`,
:meth:`SideStream.split`): the side prompt is prefilled by one nested language-model call with a fresh cache (short
rows cost little), its cache is appended to the main cache as ``B`` extra rows (keys/values left-padded to the main
length), and every decode step then runs main + side rows as ONE batch of ``2B`` rows: on a weight-bound decode step
the second stream costs far less than a second pass. :meth:`SideStream.widen` adds the side rows to the language
model's decode inputs (embeddings, 2-D mask, positions); :meth:`SideStream.split` takes them off the logits. Beam
search reorders the joined cache with indices of the main rows; :meth:`SideStream.join` extends the reorder to the
side rows.

**What the user gets back holds the user's rows only** (``B``, times ``num_beams`` / ``num_return_sequences`` as
stock ``generate`` makes them), in every field of ``generate(return_dict_in_generate=True)`` and of a plain forward:

- :func:`side_active` switches transformers' output capturing off, so a nested layer call on side rows (lockstep)
  is not recorded into the ``hidden_states`` / ``attentions`` of the main forward;
- a decode step over ``2B`` rows: :meth:`SideStream.keep_main_rows` (from the owner's language-model forward hook)
  keeps the main rows of ``hidden_states`` / ``attentions`` (and only the main stream's keys), as views;
- the joined cache: ``generate`` takes the cache for its next step from each step's output, so inside ``generate``
  it stays joined (nothing is copied per step), and when ``generate`` returns it is cut back once to the main rows
  at the main stream's length (:meth:`SideStream.release`; copied when it outlives the call, i.e. returned or the
  user's own object). A forward outside ``generate`` returns its cache cut back (:meth:`SideStream.detach`, views);
  a decode step by hand on it re-joins the parked side rows (:meth:`SideStream.rejoin`). :func:`return_main_rows`
  registers both (a model-level forward hook and an instance-level ``generate`` wrapper).

For method authors: build the rows from ``ctx.inputs`` at the main prefill (a hook on the language model sees the
merged ``inputs_embeds``), keep one :class:`SideStream` per call, and never let a pruner or scorer see it
(``in_side_stream``); a batched stream calls :func:`return_main_rows` once at install and
:meth:`SideStream.keep_main_rows` on its decode steps. See ``vtoolkit/methods/vhr.py`` (lockstep) and
``vtoolkit/methods/contrastive.py`` (batched).
"""
from __future__ import annotations

import contextlib
import weakref

import torch

from vtoolkit.compat import (
    PER_ROW_OUTPUT_FIELDS,
    cache_layer_tensors,
    cache_param,
    get_cache,
    output_cache,
    outputs_not_captured,
    set_cache_layer_tensors,
)
from vtoolkit.hooks.attention import current_implementation
from vtoolkit.hooks.masks import causal_mask, mask_dtype_for

_ACTIVE: weakref.WeakKeyDictionary[torch.nn.Module, int] = weakref.WeakKeyDictionary()


def in_side_stream(model: torch.nn.Module) -> bool:
    """True while a side stream of ``model`` (the unwrapped HF model, ``adapter.model``) is running."""
    return _ACTIVE.get(model, 0) > 0


@contextlib.contextmanager
def side_active(model: torch.nn.Module):
    """Run side rows: :func:`in_side_stream` is True, and transformers' output capturing is off (a nested layer call
    is not recorded into the ``hidden_states`` / ``attentions`` the user's forward returns)."""
    _ACTIVE[model] = _ACTIVE.get(model, 0) + 1
    try:
        with outputs_not_captured():
            yield
    finally:
        _ACTIVE[model] -= 1
        if not _ACTIVE[model]:
            del _ACTIVE[model]


def left_pad_rows(rows: list[torch.Tensor], pad_value=0) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack 1-D (or ``[n, ...]``) tensors into a left-padded batch; returns ``(batch, valid [B, L])``."""
    L = max(r.shape[0] for r in rows)
    out = rows[0].new_full((len(rows), L, *rows[0].shape[1:]), pad_value)
    valid = torch.zeros(len(rows), L, dtype=torch.bool, device=rows[0].device)
    for b, r in enumerate(rows):
        if r.shape[0]:
            out[b, L - r.shape[0]:] = r
            valid[b, L - r.shape[0]:] = True
    return out, valid


def contiguous_positions(valid: torch.Tensor) -> torch.Tensor:
    """Text positions of left-padded rows, as ``generate`` numbers them (0 at the first real token)."""
    return (valid.long().cumsum(-1) - 1).clamp(min=0)


def continue_positions(positions: torch.Tensor, valid: torch.Tensor, generated: int, q: int) -> torch.Tensor:
    """Positions of ``q`` new tokens after left-padded rows (``positions [B, L]`` or M-RoPE ``[3, B, L]``) that
    already generated ``generated`` tokens: one past the rows' largest position (M-RoPE: the same on all 3 rows)."""
    vmask = valid[None] if positions.dim() == 3 else valid
    last = positions.masked_fill(~vmask, -1)
    last = last.amax(-1) if positions.dim() == 2 else last.amax(dim=(0, 2))
    nxt = (last + 1 + generated)[:, None] + torch.arange(q, device=positions.device)
    return nxt[None].expand(3, -1, -1) if positions.dim() == 3 else nxt


class SideStream:
    """Side rows of one call (see the module docstring). ``owner`` names the method in errors."""

    def __init__(self, adapter, owner: str):
        self.adapter = adapter
        self.owner = owner
        impl = current_implementation(adapter.text_config)
        try:
            self._mask_kind = impl
            mask_dtype_for(impl, torch.float32)
        except NotImplementedError as e:
            raise NotImplementedError(f"{owner}: its side stream {e}") from None
        self.embeds = self.valid = self.positions = None
        self.llm_inputs: dict = {}
        self.next_layer = 0
        self.cache = None
        self._length = 0          # side tokens in the joined cache (after join): prompt slots + generated
        self._joined = None       # weakref to the main cache holding both streams' rows (None: not joined)
        self._parked = None       # per layer (keys, values) of the side rows while detached (see detach)
        self._released = False    # generate returned: the side rows were dropped

    # -- rows ---------------------------------------------------------------------------------------------------
    def set_rows(self, embeds: torch.Tensor, valid: torch.Tensor, positions: torch.Tensor | None = None,
                 llm_inputs: dict | None = None) -> None:
        """``embeds [B, Ls, D]``, ``valid [B, Ls]`` (left padding), ``positions`` ``[B, Ls]`` or M-RoPE ``[3, B, Ls]``
        (default: contiguous text positions from ``valid``). ``llm_inputs``: further language-model keyword arguments
        of the side prompt's prefill, from :meth:`ModelAdapter.side_llm_inputs` (Qwen3-VL: the side rows' own DeepStack
        features at their visual positions); none by default."""
        self.embeds, self.valid = embeds, valid
        self.llm_inputs = dict(llm_inputs or {})
        self.positions = contiguous_positions(valid) if positions is None else positions

    @property
    def text_positions(self) -> torch.Tensor:
        """``[B, Ls]`` positions for masks / layers (row 0 of M-RoPE positions is not text; use the mask count)."""
        return contiguous_positions(self.valid) if self.positions.dim() == 3 else self.positions

    def _mask(self, valid_keys: torch.Tensor, q_len: int, dtype: torch.dtype):
        return causal_mask(valid_keys, q_len, dtype=mask_dtype_for(self._mask_kind, dtype))

    # -- lockstep (no cache) --------------------------------------------------------------------------------------
    def start(self) -> None:
        """Begin running the rows layer by layer (call :meth:`advance` from the main stream's hooks)."""
        if self.llm_inputs:
            raise NotImplementedError(f"{self.owner}: side rows with per-token language-model inputs "
                                      f"({', '.join(self.llm_inputs)}) cannot run layer by layer")
        self.h = self.embeds
        self._pe = self.adapter.rotary(self.embeds, self.positions)
        self._layer_mask = self._mask(self.valid, self.valid.shape[1], self.embeds.dtype)
        self.next_layer = 0

    @property
    def running(self) -> bool:
        return self.embeds is not None and self.next_layer >= 0

    def advance(self, upto: int) -> None:
        """Run decoder layers ``next_layer .. upto`` (inclusive) on the side rows, nested, without a cache."""
        layers = self.adapter.decoder_layers
        with side_active(self.adapter.model):
            while self.next_layer <= upto:
                i = self.next_layer
                dev = next(layers[i].parameters()).device
                out = layers[i](self.h.to(dev), attention_mask=self._layer_mask.to(dev),
                                position_ids=self.text_positions.to(dev),
                                position_embeddings=tuple(t.to(dev) for t in self._pe), use_cache=False)
                self.h = out[0] if isinstance(out, tuple) else out
                self.next_layer += 1

    def stop(self) -> None:
        self.next_layer = -1
        self.h = self._pe = self._layer_mask = None

    # -- own cache, then batched decode ---------------------------------------------------------------------------
    def prefill(self) -> torch.Tensor:
        """Run the side prompt through the language model in one nested call with a fresh cache; returns the last
        position's final hidden state ``[B, D]`` (feed it to the LM head for the side logits)."""
        from transformers import DynamicCache

        lm = self.adapter.language_model
        self.cache = DynamicCache(config=self.adapter.text_config)
        mask = self.valid.long()
        with side_active(self.adapter.model):
            out = lm(inputs_embeds=self.embeds, attention_mask=mask, position_ids=self._lm_positions(self.positions),
                     use_cache=True, **{cache_param(lm): self.cache}, **self.llm_inputs)
        self._length = self.valid.shape[1]
        return out.last_hidden_state[:, -1]

    def _lm_positions(self, pos: torch.Tensor) -> torch.Tensor:
        """Position ids as the language model takes them (M-RoPE: ``[4, B, L]`` with text positions in row 0, so
        the mask does not come from packed-sequence detection)."""
        if pos.dim() == 3:
            text = contiguous_positions(self.valid)[..., -pos.shape[-1]:] if pos.shape[-1] == self.valid.shape[1] \
                else self._next_text_pos(pos.shape[-1])
            return torch.cat([text[None].to(pos.device), pos], 0)
        return pos

    def _next_text_pos(self, q: int) -> torch.Tensor:
        base = self.valid.long().sum(-1, keepdim=True) + (self._length - self.valid.shape[1])
        return base + torch.arange(q, device=self.valid.device)

    def widen_prefill(self, kwargs: dict, main_cache) -> dict | None:
        """Prefill as ONE batched forward: the language model's keyword arguments for main + side rows (``2B``), when
        the side prompt has the main prompt's shape (VCD: the same prompt with a noised image) and the main call
        starts from an empty cache; the forward then writes the joined cache itself (no :meth:`join` copy). Returns
        None when that does not hold (the caller then uses :meth:`prefill` + :meth:`join`). After the forward,
        :meth:`split_prefill` takes the side rows off its output."""
        emb, pos, mask = kwargs.get("inputs_embeds"), kwargs.get("position_ids"), kwargs.get("attention_mask")
        if (emb is None or pos is None or main_cache is None or main_cache.get_seq_length() != 0
                or tuple(self.embeds.shape) != tuple(emb.shape) or (mask is not None and mask.dim() != 2)):
            return None
        B, L = emb.shape[:2]
        extra = self.adapter.widen_llm_inputs(kwargs, self.llm_inputs)    # Qwen3-VL: both streams' DeepStack
        if extra is None:
            return None
        for k, v in kwargs.items():   # any other per-row input would need widening too: use the nested path
            if (torch.is_tensor(v) and v.dim() and v.shape[0] == B and k not in extra
                    and k not in ("inputs_embeds", "position_ids", "attention_mask", "cache_position")):
                return None
        dev = emb.device
        side_pos = self._lm_positions(self.positions).to(dev)
        if pos.dim() == 3 and side_pos.dim() == 3:
            if pos.shape[0] == 3 and side_pos.shape[0] == 4:
                side_pos = side_pos[1:]
            if pos.shape[0] != side_pos.shape[0]:
                return None
            positions = torch.cat([pos, side_pos.to(pos.dtype)], 1)
        elif pos.dim() == 2 and side_pos.dim() == 2:
            positions = torch.cat([pos, side_pos.to(pos.dtype)], 0)
        else:
            return None
        main_mask = mask.to(dev) if mask is not None else torch.ones(B, L, dtype=torch.long, device=dev)
        kw = dict(kwargs)
        kw["inputs_embeds"] = torch.cat([emb, self.embeds.to(device=dev, dtype=emb.dtype)], 0)
        kw["attention_mask"] = torch.cat([main_mask, self.valid.to(dev).to(main_mask.dtype)], 0)
        kw["position_ids"] = positions
        kw.update(extra)
        self.main_pad = self.side_pad = 0
        self._main_rows = B
        self._length = L
        self._joined = weakref.ref(main_cache)
        self._follow_reorder(main_cache)
        return kw

    def split_prefill(self, output) -> torch.Tensor:
        """After a :meth:`widen_prefill` forward: keep the main rows in ``output`` (in place: last hidden state,
        hidden states, attentions) and return the side rows' last-position final hidden state ``[B, D]``."""
        B = self._main_rows
        if isinstance(output, tuple):
            raise NotImplementedError(f"{self.owner}: a language model that returns tuples at the prefill")
        h = output.last_hidden_state
        side_last = h[B:, -1]
        output.last_hidden_state = h[:B]
        self.keep_main_rows(output)
        return side_last

    def _follow_reorder(self, main_cache) -> None:
        """Beam search reorders the joined cache with indices of the main rows; the side rows follow their sample
        (an attribute of this cache object only, removed when the rows are split again: :meth:`_unfollow_reorder`)."""
        B = self._main_rows
        original = main_cache.reorder_cache

        def reorder_cache(beam_idx: torch.Tensor):
            return original(torch.cat([beam_idx, beam_idx.to(torch.long) + B]))

        reorder_cache.__vtoolkit_side__ = True
        main_cache.reorder_cache = reorder_cache

    @staticmethod
    def _unfollow_reorder(main_cache) -> None:
        if getattr(vars(main_cache).get("reorder_cache"), "__vtoolkit_side__", False):
            del main_cache.reorder_cache

    def join(self, main_cache) -> None:
        """Append this stream's cache to ``main_cache`` as ``B`` extra rows, left-padding the shorter of the two
        (the padding is masked by :meth:`widen`), so decode steps run both streams as one batch."""
        self._join(main_cache, cache_layer_tensors(self.cache), self.cache.get_seq_length())
        self.cache = None

    def _join(self, main_cache, side_kv: list, side_len: int) -> None:
        B = self.valid.shape[0]
        main_len = main_cache.get_seq_length()
        L = max(main_len, side_len)
        self.main_pad, self.side_pad = L - main_len, L - side_len
        for i, (mk, mv) in enumerate(cache_layer_tensors(main_cache)):
            sk, sv = side_kv[i]
            k = torch.cat([_left_pad(mk, self.main_pad), _left_pad(sk.to(mk.device), self.side_pad)], 0)
            v = torch.cat([_left_pad(mv, self.main_pad), _left_pad(sv.to(mv.device), self.side_pad)], 0)
            set_cache_layer_tensors(main_cache, i, k, v)
        self._main_rows = B
        self._joined = weakref.ref(main_cache)
        self._follow_reorder(main_cache)

    # -- what the user gets back: the main rows only ------------------------------------------------------------
    @property
    def joined(self) -> bool:
        """The side rows sit in the main cache (decode steps run ``2B`` rows)."""
        return self._joined is not None

    @property
    def parked(self) -> bool:
        """The side rows were split off the main cache after a forward outside ``generate`` (:meth:`detach`)."""
        return self._parked is not None

    def keep_main_rows(self, output) -> None:
        """In place on a language-model output of a forward over main + side rows: the per-row fields that reach
        the user (``hidden_states``, ``attentions``; :data:`vtoolkit.compat.PER_ROW_OUTPUT_FIELDS`) keep the main
        rows, and attention weights only the main stream's keys (the ``main_pad`` slots that align the two caches
        are dropped). Views, no copy; ``last_hidden_state`` is left alone (the LM head needs both streams)."""
        B = self._main_rows
        if isinstance(output, tuple):
            raise NotImplementedError(f"{self.owner}: a language model that returns tuples")
        for name in PER_ROW_OUTPUT_FIELDS:
            v = getattr(output, name, None)
            if v is None:
                continue
            cut = self.main_pad if name == "attentions" else 0     # attention weights: [rows, H, q, keys]
            setattr(output, name, tuple(_main_part(t, B, cut) for t in v))

    def _split(self, main_cache) -> list:
        """Take the side rows off the joined ``main_cache`` in place (views); returns them per layer."""
        B = self._main_rows
        side = []
        for i, (k, v) in enumerate(cache_layer_tensors(main_cache)):
            if k.shape[0] != 2 * B:
                raise RuntimeError(f"{self.owner}: the joined cache holds {k.shape[0]} rows in layer {i}, not the "
                                   f"{2 * B} of the main and side streams")
            side.append((k[B:, :, self.side_pad:], v[B:, :, self.side_pad:]))
            set_cache_layer_tensors(main_cache, i, k[:B, :, self.main_pad:], v[:B, :, self.main_pad:])
        self._unfollow_reorder(main_cache)
        self._joined = None
        return side

    def _joined_cache(self):
        cache = self._joined() if self._joined is not None else None
        if cache is None:
            self._joined = None
        return cache

    def detach(self) -> None:
        """After a forward outside ``generate`` (the user gets the cache and may decode by hand): the joined cache
        holds the main rows only again, at the main stream's length, in place (views of the joined tensors, no
        copy); the side rows wait here until the next decode step of this call re-joins them (:meth:`rejoin`)."""
        cache = self._joined_cache()
        if cache is not None:
            self._parked = self._split(cache)

    def rejoin(self, main_cache) -> None:
        """A decode step after :meth:`detach`: append the parked side rows to ``main_cache`` again (one copy)."""
        if main_cache is None:
            raise RuntimeError(f"{self.owner}: a decode step without a cache after the contrast rows were split off")
        side, self._parked = self._parked, None
        self._join(main_cache, side, side[0][0].shape[-2] if side else 0)

    def release(self, keep: bool) -> None:
        """``generate`` returned: the joined cache (when still joined) keeps the main rows only, at the main
        stream's length, and the side rows are dropped. ``keep``: the cache outlives the call (returned to the user
        or their own object), so its tensors become compact copies (once per call) instead of views that would hold
        the side rows' memory."""
        cache = self._joined_cache()
        self._parked = None
        self._released = True
        if cache is None:
            return
        self._split(cache)
        if keep:
            for i, (k, v) in enumerate(cache_layer_tensors(cache)):
                set_cache_layer_tensors(cache, i, k.clone(), v.clone())

    def check_continuable(self) -> None:
        """Refuse a decode step of this call after ``generate`` returned (its side rows are gone)."""
        if self._released:
            raise NotImplementedError(f"{self.owner}: this forward continues from the cache a generate call returned; "
                                      f"the contrast rows were dropped when generate returned (the cache holds the "
                                      f"user's rows only). Run a new generate over the whole sequence instead.")

    def widen(self, kwargs: dict, main_cache) -> dict:
        """Decode step: the language model's keyword arguments for main + side rows (``2B``)."""
        B = self._main_rows
        kw = dict(kwargs)
        emb = kw["inputs_embeds"]
        q = emb.shape[1]
        kw["inputs_embeds"] = torch.cat([emb, emb], 0)
        total = main_cache.get_seq_length() + q                     # joined length incl. this step
        dev = emb.device
        mask = kw.get("attention_mask")
        main_len = total - self.main_pad
        main_mask = (mask.to(dev) if mask is not None and mask.dim() == 2
                     else torch.ones(B, main_len, dtype=torch.long, device=dev))
        if main_mask.shape[1] != main_len:
            raise RuntimeError(f"{self.owner}: the main stream's mask covers {main_mask.shape[1]} keys, its cache "
                               f"{main_len}: another hook changed the sequence after the side stream joined")
        side_valid = torch.cat([self.valid.to(dev).long(),
                                torch.ones(B, total - self.side_pad - self.valid.shape[1], dtype=torch.long,
                                           device=dev)], 1)
        kw["attention_mask"] = torch.cat([_left_pad(main_mask, self.main_pad, dim=1),
                                          _left_pad(side_valid, self.side_pad, dim=1)], 0)
        side_pos = self.next_positions(q, dev)
        pos = kw.get("position_ids")
        if pos is None:       # what the stock language model does without position ids: continue its cache
            if self.adapter.position_kind == "mrope":
                raise RuntimeError(f"{self.owner}: an M-RoPE decode step arrived without position ids")
            pos = (main_len - q + torch.arange(q, device=dev))[None].expand(B, -1)
        pos = pos.to(dev)
        if pos.dim() == 3:                                          # M-RoPE, 3 or 4 rows (row 0 = text positions)
            side = side_pos if side_pos.dim() == 3 else side_pos[None].expand(3, -1, -1)
            if pos.shape[0] == 4:
                side = torch.cat([self._next_text_pos(q).to(dev)[None], side], 0)
            kw["position_ids"] = torch.cat([pos, side], 1)
        else:
            kw["position_ids"] = torch.cat([pos, side_pos if side_pos.dim() == 2 else side_pos[0]], 0)
        self._length += q
        return kw

    def next_positions(self, q: int, dev) -> torch.Tensor:
        """Positions of the next ``q`` side tokens, after the side prompt and the tokens it generated so far."""
        return continue_positions(self.positions.to(dev), self.valid.to(dev), self._length - self.valid.shape[1], q)

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[2B, ...]`` -> (main rows, side rows)."""
        B = self._main_rows
        return x[:B], x[B:]


def return_main_rows(hooks, model: torch.nn.Module, stream) -> None:
    """Register (on ``hooks``) what keeps a batched side stream's rows out of the cache the user gets back; ``stream()``
    is the current call's :class:`SideStream` (or None). Inside ``generate`` nothing changes per step (generate
    feeds the joined cache back into the next step); when ``generate`` returns, the joined cache is cut back to the
    main rows once (:meth:`SideStream.release`). A forward outside ``generate`` returns its cache cut back
    (:meth:`SideStream.detach`), and a decode step by hand re-joins the side rows (:meth:`SideStream.rejoin`). The
    model-level hook runs before the call context's, so the context records the length the user sees."""
    depth = [0]

    def post(module, args, output):
        s = stream()
        if s is not None and depth[0] == 0 and not in_side_stream(model):
            s.detach()

    def generate(inner, *args, **kwargs):
        depth[0] += 1
        ok = False
        try:
            out = inner(*args, **kwargs)
            ok = True
        finally:
            depth[0] -= 1
            s = stream()
            if s is not None:
                try:
                    kept = [c for c in (get_cache(kwargs), output_cache(out) if ok and not torch.is_tensor(out)
                                        else None) if c is not None]
                    s.release(keep=any(c is s._joined_cache() for c in kept))
                except Exception:
                    if ok:          # else the generate error is the one to see
                        raise
        return out

    hooks.forward(model, post, prepend=True)
    hooks.patch(model, "generate", generate)


def _main_part(t, B: int, cut: int):
    """The first ``B`` rows of a ``[2B, ...]`` tensor, without its first ``cut`` entries in the last dimension."""
    if not torch.is_tensor(t) or t.shape[0] != 2 * B:
        return t
    return t[:B, ..., cut:] if cut else t[:B]


def _left_pad(t: torch.Tensor, n: int, dim: int = -2) -> torch.Tensor:
    """``n`` zero slots before ``t`` along ``dim`` (K/V: the sequence dimension ``-2``; masks: ``1``)."""
    if n == 0:
        return t
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([t.new_zeros(shape), t], dim)
