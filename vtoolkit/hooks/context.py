"""Per-call context: detects each new prefill and exposes that call's inputs and visual layout to the methods.

One pre-hook on the top-level model sees every forward that ``generate`` (or the user) makes. A forward whose KV
cache is empty (or absent) is a new prefill: the context records its inputs, drops the previous call's layout and
tells every method (``on_prefill``) to reset its per-call state. Later forwards of the same call are decode steps.
Nothing is carried from one call to the next.

What the context also knows about a call, for every method:

- ``expand``: ``generate(num_beams=n)`` / ``num_return_sequences=n`` encode each image once and then repeat every
  prompt row ``n`` times; :attr:`CallContext.spans` covers the repeated rows (each row's spans point at its sample's
  images) and :attr:`CallContext.sample_rows` names one row per input sample (for ``stats``).
- continuation: a forward whose cache is not the one this call's prefill built (multi-turn ``generate`` with a
  ``past_key_values`` from an earlier call, a cache the user made; the first forward of every ``generate`` call must
  be a prefill, which an instance-level wrapper of ``generate`` tells the context) is refused by every method that cannot honour it
  (``supports_continuation = False``), instead of applying the previous call's decisions to new tokens.
- video input is refused by methods with ``supports_video = False`` (they would prune or score only the images).
- ``labels=``: when a method rewrites the sequence (``rewrites_sequence = True``) the context holds the labels back
  from HF's loss and computes the loss on the sequence the LLM saw (:attr:`CallContext.layout`), so a pruned forward
  returns the right ``loss``.
- :attr:`CallContext.layout`: which source positions each LLM row holds after a pruner rewrote it (the layout the
  LLM sees), published by the pruners, so a later method asks for visual positions in the coordinates it sees.
- ``generate(use_cache=False)`` runs every step as a forward over the whole sequence with no cache, so each of them
  starts a new prefill here; :attr:`CallContext.new_call` is False (and :attr:`CallContext.recompute` True) for those
  after the first of one ``generate`` call,
  and :attr:`CallContext.prompt_length` keeps the length of that call's prompt (columns from it on are generated
  tokens), so decisions a method takes on the prompt (sink tokens, heads) can be taken on the prompt alone.

No silent no-op: a method that needs one of its hooks to run in a forward says so with :meth:`CallContext.expect`
(usually from ``on_prefill`` / ``on_step`` when the call has visual input); the hook reports with
:meth:`CallContext.mark`. A post-hook on the top-level model checks, at the end of every forward, that each expected
hook ran, and raises otherwise, naming the method, the hook and the transformers version (a renamed argument, a
bypassed code path or an unsupported input kind would otherwise return unmodified output without a word).
"""
from __future__ import annotations

import inspect
import weakref
from typing import Any

import torch

from vtoolkit.compat import cache_length, get_cache, output_cache, support_hint
from vtoolkit.hooks.sidestream import in_side_stream

_CAPTURED = ("input_ids", "attention_mask", "position_ids", "image_sizes", "image_grid_thw", "video_grid_thw",
             "mm_token_type_ids", "pixel_values", "pixel_values_videos", "labels", "batch_num_images")
_ROWWISE = ("input_ids", "attention_mask", "mm_token_type_ids", "labels")   # [B, L] tensors repeated by expansion


class Layout:
    """Which prompt positions the LLM's rows hold, from which decoder layer on (the layout the LLM sees).

    Each segment ``(from_layer, keep_idx [B, K], valid [B, K])`` says: from decoder layer ``from_layer`` on, row slot
    ``j`` of sample ``b`` holds the processor's position ``keep_idx[b, j]`` (``valid`` False at left-pad slots).
    A pruner adds a segment in the coordinates of the rows it rewrote; segments compose."""

    def __init__(self):
        self.segments: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def add(self, from_layer: int, keep_idx: torch.Tensor, valid: torch.Tensor) -> None:
        if self.segments:                    # keep_idx indexes the previous segment's rows: map to source positions
            _, prev_idx, prev_valid = self.segments[-1]
            valid = valid & torch.gather(prev_valid.to(keep_idx.device), 1, keep_idx)
            keep_idx = torch.gather(prev_idx.to(keep_idx.device), 1, keep_idx)
        self.segments.append((from_layer, keep_idx, valid))

    def at(self, layer: int):
        """``(keep_idx, valid)`` for the rows decoder layer ``layer`` sees; None when they are the input's."""
        found = None
        for from_layer, idx, valid in self.segments:
            if from_layer <= layer:
                found = (idx, valid)
        return found

    @property
    def final(self):
        """``(keep_idx, valid)`` of the rows that reach the LM head; None when nothing was rewritten."""
        return (self.segments[-1][1], self.segments[-1][2]) if self.segments else None


class CallContext:
    def __init__(self, adapter) -> None:
        self.adapter = adapter
        self.listeners: list = []
        self.inputs: dict[str, Any] = {}
        self.step = -1            # 0 at prefill, then 1, 2, ... per decode forward
        self.num_calls = 0
        self._spans = None
        self._arg_names = list(inspect.signature(adapter.model.forward).parameters)
        self.has_visual = False   # this call's prompt holds visual input
        self.has_video = False
        self.expand = 1           # rows per input sample (generate's num_beams / num_return_sequences)
        self.step_input_ids = None   # input_ids of the current forward (a decode step: the tokens chosen last step)
        self.new_call = False     # this prefill starts a call (False for generate(use_cache=False)'s later steps)
        self.layout = Layout()
        self.llm_input_embeds = None   # the prefill's inputs_embeds while a sequence pruner selects (hooks/sequence.py)
        self._labels = None       # labels held back from HF's loss (see module docstring)
        self._cache_ref = None    # the cache this call's forwards built, and its length after the last forward
        self._cache_len = 0
        self._expected: dict[str, str] = {}   # key -> "owner: what did not happen", for the current forward
        self._marked: set[str] = set()
        self.prompt_length = 0    # columns of the prompt of the current call (see recompute)
        self.recompute = False    # this prefill re-runs a generate(use_cache=False) call's prompt + generated tokens

    def install(self, hooks) -> None:
        hooks.forward_pre(self.adapter.model, self._pre_forward, with_kwargs=True, prepend=True)
        hooks.forward(self.adapter.model, self._post_forward)
        # ``generate`` runs the vision encoder before the prefill forward and pops pixel_values / image_sizes /
        # image_grid_thw from the forward's kwargs; record them where the encoder is called (an instance-level
        # patch, removed with the handle; the signature is preserved because generate inspects it).
        core = self.adapter.core
        names = list(inspect.signature(core.get_image_features).parameters)

        def get_image_features(inner, *args, **kwargs):
            if in_side_stream(self.adapter.model):     # a side stream's images (VCD's noised one) are not the call's
                return inner(*args, **kwargs)
            rec = dict(zip(names, args))
            rec.update(kwargs)
            self._encoder_inputs = {k: rec[k] for k in _CAPTURED if rec.get(k) is not None}
            self.encoder_calls += 1
            out = inner(*args, **kwargs)
            self._encoder_output = weakref.ref(out)
            return out

        hooks.patch(core, "get_image_features", get_image_features)

        def generate(inner, *args, **kwargs):      # the first forward of a generate call must be its prefill
            self._fresh_generate = True
            self._generate_depth += 1
            try:
                return inner(*args, **kwargs)
            finally:
                self._fresh_generate = False
                self._generate_depth -= 1

        hooks.patch(self.adapter.model, "generate", generate)
        self._fresh_generate = False
        self._generate_depth = 0
        self._encoder_inputs: dict[str, Any] = {}
        self._encoder_output = None
        self.encoder_calls = 0   # vision-encoder runs seen; results of the vision stage are tagged with it
        self.features_from_hooked_encoder = True   # False when this call's image features bypassed our encoder hooks

    # -- per forward ------------------------------------------------------------------------------------------
    def _pre_forward(self, module, args, kwargs):
        kw = dict(zip(self._arg_names, args))
        kw.update(kwargs)
        self._expected, self._marked = {}, set()
        self.step_input_ids = kw.get("input_ids")
        cache = get_cache(kw)
        fresh, self._fresh_generate = self._fresh_generate, False
        if cache_length(cache) == 0:
            # generate(use_cache=False) re-runs the whole sequence at every step: those prefills continue one call
            self.new_call = fresh or self._generate_depth == 0
            self._start_call(kw, recompute=not self.new_call)
            if self._labels is not None:     # compute the loss ourselves on the rows the LLM sees
                kw["labels"] = None
                return (), kw
        else:
            if (fresh or self._cache_ref is None or self._cache_ref() is not cache
                    or cache_length(cache) != self._cache_len):
                self._refuse_continuation()
            self.step += 1
            for listener in self.listeners:
                on_step = getattr(listener, "on_step", None)
                if on_step is not None:
                    on_step(self)
        return None

    def _start_call(self, kw, recompute: bool = False) -> None:
        self.inputs = {k: kw.get(k) for k in _CAPTURED}
        seq = self.inputs["input_ids"] if self.inputs["input_ids"] is not None else kw.get("inputs_embeds")
        self.recompute = recompute and self.prompt_length > 0
        if not self.recompute:
            self.prompt_length = int(seq.shape[1]) if seq is not None else 0
        mm = kw.get("mm_encoder_outputs") or {}
        self.features_from_hooked_encoder = True
        if mm.get("image") is not None:   # features precomputed by this generate's encoder call
            ours = self._encoder_output() if self._encoder_output is not None else None
            self.features_from_hooked_encoder = mm["image"] is ours
            for k, v in self._encoder_inputs.items():   # (kept for every prefill of the call: use_cache=False)
                if self.inputs.get(k) is None:
                    self.inputs[k] = v
        self.has_visual = self._visual_input(mm)
        self.has_video = self._video_input(mm)
        self._spans = None
        self.expand = 1
        self.layout = Layout()
        self.step = 0
        self.num_calls += self.new_call
        self._cache_ref, self._cache_len = None, 0
        self._labels = None
        if self.has_video:
            refusing = [ls.name for ls in self.listeners if getattr(ls, "supports_video", True) is False]
            if refusing:
                raise NotImplementedError(f"{', '.join(refusing)}: video input is not supported (these methods "
                                          f"score and prune images only; a video would be left untouched or scored "
                                          f"with an image's scores). Pass images, or remove the handle for video "
                                          f"prompts.")
        if self.inputs.get("labels") is not None and any(getattr(ls, "rewrites_sequence", False)
                                                         for ls in self.listeners):
            self._labels = self.inputs["labels"]
        for listener in self.listeners:
            listener.on_prefill(self)

    def _refuse_continuation(self) -> None:
        refusing = [ls.name for ls in self.listeners if getattr(ls, "supports_continuation", True) is False]
        if refusing:
            raise NotImplementedError(
                f"{', '.join(refusing)}: this forward continues from a KV cache that this handle's prefill did not "
                f"build (multi-turn generate(past_key_values=...), or a cache passed by hand). The cached prefix was "
                f"not processed by the method and its per-call decisions belong to another prompt, so the result "
                f"would be neither the method's nor the baseline's. Run each turn as a fresh prefill (the whole "
                f"conversation as the prompt), or remove the handle for cache continuation.")
        self.step = 0   # methods that accept it (the identity) count steps of this continuation from here

    def _visual_input(self, mm) -> bool:
        ids = self.inputs.get("input_ids")
        if ids is not None and bool((ids == self.adapter.image_token_id).any()):
            return True
        return any(self.inputs.get(k) is not None for k in ("pixel_values", "pixel_values_videos")) or bool(mm)

    def _video_input(self, mm) -> bool:
        ids, vid = self.inputs.get("input_ids"), self.adapter.video_token_id
        if ids is not None and vid is not None and bool((ids == vid).any()):
            return True
        return self.inputs.get("pixel_values_videos") is not None or mm.get("video") is not None

    def _post_forward(self, module, args, output):
        cache = output_cache(output)
        if cache is not None:
            self._cache_ref, self._cache_len = weakref.ref(cache), cache_length(cache)
        missing = [msg for key, msg in self._expected.items() if key not in self._marked]
        self._expected, self._marked = {}, set()
        if missing:
            stage = "prefill" if self.step == 0 else f"decode step {self.step}"
            raise RuntimeError(f"{'; '.join(missing)} (in the {stage} of this call). The method did not run as "
                               f"designed, so the output is not the method's: {support_hint()}")
        if self._labels is not None and self.step == 0:
            return self._loss_on_seen_rows(output)
        return None

    def _loss_on_seen_rows(self, output):
        """HF's own causal-LM loss, on the labels of the positions the LLM actually saw."""
        labels, self._labels = self._labels, None
        final = self.layout.final
        if final is not None:
            idx, valid = final
            labels = torch.gather(labels.to(idx.device), 1, idx).masked_fill(~valid, -100)
        logits = output["logits"]
        loss = self.adapter.model.loss_function(logits=logits, labels=labels.to(logits.device),
                                                vocab_size=self.adapter.text_config.vocab_size)
        return type(output)(loss=loss, **{k: v for k, v in output.items() if k != "loss"})

    # -- no silent no-op ----------------------------------------------------------------------------------------
    def expect(self, key: str, owner: str, what: str) -> None:
        """Require that :meth:`mark` ``(key)`` is called before the current forward ends; ``what`` says what the
        missing hook means (e.g. "the language-model hook did not see this prefill: nothing was pruned")."""
        self._expected[key] = f"{owner}: {what}"

    def mark(self, key: str) -> None:
        """A hook that :meth:`expect` asked for ran in this forward."""
        self._marked.add(key)

    # -- what methods read ----------------------------------------------------------------------------------------
    @property
    def is_prefill(self) -> bool:
        return self.step == 0

    @property
    def batch_size(self) -> int:
        ids = self.inputs.get("input_ids")
        return 0 if ids is None else ids.shape[0]

    @property
    def spans(self):
        """Per LLM row, per image :class:`~vtoolkit.models.ImageSpan` of this call (computed once, lazily)."""
        if self._spans is None:
            if self.inputs.get("input_ids") is None:
                raise ValueError("vtoolkit needs input_ids at prefill to locate visual tokens; calls with only "
                                 "inputs_embeds are not supported by this method")
            self.expand = self._expansion()
            if self.expand == 1:
                self._spans = self.adapter.image_spans(self.inputs)
            else:
                unique = dict(self.inputs)
                for k in _ROWWISE:
                    if unique.get(k) is not None:
                        unique[k] = unique[k][:: self.expand]
                per_sample = self.adapter.image_spans(unique)
                self._spans = [s for s in per_sample for _ in range(self.expand)]
        return self._spans

    @property
    def sample_rows(self) -> list[int]:
        """One LLM row per input sample (the first of its ``expand`` copies)."""
        _ = self.spans
        return list(range(0, self.batch_size, self.expand))

    def _expansion(self) -> int:
        """How many times generate repeated each prompt row after encoding the images once (beams, sequences)."""
        ids = self.inputs["input_ids"]
        in_ids = int((ids == self.adapter.image_token_id).sum())
        encoded = sum(self.adapter.image_token_counts(self.inputs, encoded=True))
        if in_ids == 0 or encoded == 0 or in_ids == encoded:
            return 1
        n, rem = divmod(in_ids, encoded)
        B = ids.shape[0]
        if rem or n < 2 or B % n:
            raise ValueError(f"input_ids hold {in_ids} image placeholder tokens but the encoded images account for "
                             f"{encoded}: the prompts and the images do not match")
        grouped = ids.view(B // n, n, -1)
        if not bool((grouped == grouped[:, :1]).all()):
            raise ValueError(f"input_ids hold {n}x the encoded images' placeholders but the rows are not repeated "
                             f"prompts (as generate's num_beams / num_return_sequences make them)")
        return n

    def encoder_output(self):
        """What this call's ``get_image_features`` returned (HF's output object: ``pooler_output``, and Qwen3-VL's
        ``deepstack_features``), one entry per image placeholder block as :meth:`image_features` says."""
        out = self._encoder_output() if self._encoder_output is not None else None
        if out is None or not self.features_from_hooked_encoder:
            raise RuntimeError("this call's image features were not computed under this handle (precomputed "
                               "features are not supported by this method)")
        return out

    def image_features(self) -> list[torch.Tensor]:
        """The projected visual features of this call's images, one ``[N_i, D]`` tensor per image placeholder block in
        the order the blocks appear in the (row-major) ``input_ids`` - what HF scatters into the embeddings (generate
        repeats an image's entry for each of its beam rows)."""
        return self.adapter.features_by_image(self.encoder_output().pooler_output, self.inputs)

    def merged_embeddings(self, input_ids: torch.Tensor, by_image: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Token embeddings of ``input_ids`` (``[B, L]``, this call's rows) with image features at the visual
        placeholders, as the model merges them: ``by_image`` (one ``[N_i, D]`` tensor per image, encoder order, e.g.
        the features of a noised copy) or, by default, this call's own :meth:`image_features`."""
        emb = self.adapter.model.get_input_embeddings()(input_ids)
        if by_image is None:
            feats = self.image_features()
        else:          # row-major: each row's images, in the order their placeholder blocks appear
            feats = [by_image[span.image_index] for row in self.spans for span in row]
        vis = input_ids == self.adapter.image_token_id
        n_feats = sum(int(f.shape[0]) for f in feats)
        if int(vis.sum()) != n_feats:
            raise RuntimeError(f"{int(vis.sum())} visual placeholders for {n_feats} image features")
        flat = torch.cat([f.reshape(-1, emb.shape[-1]) for f in feats]).to(emb.device, emb.dtype)
        return emb.masked_scatter(vis[..., None].to(emb.device), flat)

    def rope_positions(self) -> torch.Tensor:
        """M-RoPE positions ``[3, B, L]`` of the call's (unpruned) rows, as HF computes them for the prefill."""
        _ = self.spans      # resolves the row expansion
        inputs = dict(self.inputs)
        if self.expand > 1:
            for k in _ROWWISE:
                if inputs.get(k) is not None:
                    inputs[k] = inputs[k][:: self.expand]
        mask = inputs.get("attention_mask")
        pos, _ = self.adapter.rope_index(inputs, attention_mask=mask if mask is not None and mask.dim() == 2
                                         else None)
        return pos.repeat_interleave(self.expand, dim=1) if self.expand > 1 else pos

    def visual_mask(self, layer: int = 0) -> torch.Tensor:
        """``[B, L]`` bool over the prompt rows decoder layer ``layer`` sees: True at visual token positions (in the
        pruned coordinates when a pruner rewrote the sequence before that layer)."""
        vis = self.inputs["input_ids"] == self.adapter.image_token_id
        seen = self.layout.at(layer)
        if seen is None:
            return vis
        idx, valid = seen
        return torch.gather(vis.to(idx.device), 1, idx) & valid

    def nonpad_mask(self, layer: int = 0) -> torch.Tensor:
        """``[B, L]`` bool over the prompt rows decoder layer ``layer`` sees: False at left-pad slots."""
        seen = self.layout.at(layer)
        if seen is not None:
            return seen[1]
        ids, mask = self.inputs["input_ids"], self.inputs.get("attention_mask")
        return mask.bool() if mask is not None and mask.dim() == 2 else torch.ones_like(ids, dtype=torch.bool)
