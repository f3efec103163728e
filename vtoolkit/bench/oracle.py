"""Oracle rows of ``vtoolkit bench``: the stock model (no vtoolkit hook installed) run on the sequence a method ended
up computing, so that ``overhead = method / oracle - 1`` is what vtoolkit's mechanics (hooks, scoring, gathers,
masks, host syncs) cost above the physical limit of the same work.

Each oracle is built from the method's ``h.stats`` of a measured call (which tokens it kept) and returns a ``gen(n)``
callable that :func:`vtoolkit.bench.run.run_bench` times exactly as it times the method (``n = 1``: prefill;
``n = 1 + decode_tokens``: end to end). What is inside the timed call:

- the LLaVA input embeddings built by hand: the stock CLIP layers in a plain loop (only the layers the method ran,
  ``vision_layers_run``: FasterVLM skips the layers after the feature layer), the feature layer's output without
  CLS, the stock projector, scattered into the stock token embeddings;
- pre-LLM pruners (``fastervlm``, ``random``): those embeddings gathered at the kept positions (contiguous
  positions, LLaVA's policy) into stock ``generate(inputs_embeds=..., attention_mask=...)``;
- mid-stack pruners (``fastv``, ``dyvte``, ``dart``): prefill only -- a forward loop over the stock decoder layers, the first
  ``K`` on the full sequence, the rest on the kept rows' hidden states with their original RoPE positions, then the
  final norm and the LM head on the last position (no cache is kept: the decode cells stay empty);
- ``vcd``: stock ``generate`` over the 2B rows (each prompt twice; the second copy's pixels are the same tensor as the
  noise does not change the cost), so the contrast forward and decode steps are batched as VCD batches them;
- ``vhr``: prefill only -- one stock forward over the text-only rows (every visual token removed, left-padded among
  themselves), then stock ``generate(max_new_tokens=1)`` over the main rows. Not one batch padded to the prompt's
  length: that would charge the ~50 text-only positions as many as the ~600 of the prompt, far above what VHR's side
  stream computes (its own short rows). VHR's decode steps run the main rows only: the baseline's decode is its limit;
- ``damro``: stock ``generate`` over the main rows and the short contrast prompts (the text with only the outlier
  tokens, left-padded to the prompt's length) batched, as the issue defines it -- an upper limit for the prefill
  (the padded contrast rows cost as much as the main rows; DAMRO's own contrast prefill is short), a fair one for the
  decode steps (both streams, one batch).

The issue-19 families (``vtoolkit bench --arch qwen3_vl|llava_onevision|internvl``, and Qwen2-VL / Qwen2.5-VL) have
prefill oracles for the pre-LLM and mid-stack pruners: the stock ``get_image_features`` of the model (the whole
vision tower, the family's merger / pixel shuffle / packing with ``image_newline``), the stock placeholder scatter,
then the stock language model over the kept rows -- M-RoPE models at the kept tokens' original 3-D positions (the
positions policy the method's stats name), Qwen3-VL's DeepStack features added by the stock layers at the kept
visual rows only -- and the LM head on the last position. No cache is kept (the decode cells stay empty).
:func:`family_prefill` returns those logits, so a test checks that an oracle runs what its method ran.
"""
from __future__ import annotations

import torch

ORACLE_METHODS = {"fastervlm": "pre_llm", "random": "pre_llm", "fastv": "midstack", "dyvte": "midstack",
                  "vcd": "vcd", "vhr": "vhr", "damro": "damro"}
ORACLE_METHODS["dart"] = "midstack"   # like FastV: K full layers, then the kept rows at their original positions


def _any_adapter(model):
    import vtoolkit as vt

    return vt.models.get_adapter(model)


def _is_llava15(a) -> bool:
    return a.family == "llava" and a.has_cls


def _adapter(model):
    a = _any_adapter(model)
    if not _is_llava15(a):
        raise NotImplementedError(f"this oracle is built for LLaVA-1.5 models, not {a.family!r}")
    return a


# the oracle kinds with a prefill oracle on the other families (`family_inputs`)
FAMILY_ORACLE_KINDS = ("pre_llm", "midstack")


def has_oracle(model, method: str) -> bool:
    """Whether :func:`build` has an oracle of ``method`` (a registry name) on ``model``'s architecture."""
    kind = ORACLE_METHODS.get(method)
    return kind is not None and (_is_llava15(_any_adapter(model)) or kind in FAMILY_ORACLE_KINDS)


def family_inputs(model, batch) -> dict:
    """The language model's inputs as the stock model builds them, without running it: ``embeds [B, L, D]`` (token
    embeddings with the stock ``get_image_features`` output scattered into the image-token slots), ``positions``
    (``[3, B, L]`` M-RoPE from the stock ``get_rope_index``, or ``[B, L]``), ``visual [B, L]`` (image-token slots) and
    ``deepstack`` (Qwen3-VL: one ``[visual tokens, D]`` tensor per DeepStack layer, rows in ``visual``'s order)."""
    a = _any_adapter(model)
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    emb = model.get_input_embeddings()(ids)
    kw = {k: batch[k] for k in ("image_grid_thw", "image_sizes", "batch_num_images") if batch.get(k) is not None}
    out = a.core.get_image_features(pixel_values=batch["pixel_values"], return_dict=True, **kw)
    feats = out.pooler_output
    feats = torch.cat(list(feats)) if isinstance(feats, (list, tuple)) else feats
    visual = ids == a.image_token_id
    emb = emb.masked_scatter(visual[..., None].expand_as(emb), feats.reshape(-1, emb.shape[-1]).to(emb.dtype))
    ds = getattr(out, "deepstack_features", None)
    if ds is not None:
        ds = [torch.cat(list(d)) if isinstance(d, (list, tuple)) else d for d in ds]
    if a.position_kind == "mrope":
        positions = a.rope_index(batch, attention_mask=mask)[0]
    elif mask is not None:
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    else:
        positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    return {"embeds": emb, "positions": positions, "visual": visual, "deepstack": ds or None}


def _gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x [B, L, ...]`` at ``idx [B, K]``: ``[B, K, ...]``."""
    return torch.gather(x, 1, idx.view(*idx.shape, *([1] * (x.dim() - 2))).expand(*idx.shape, *x.shape[2:]))


def _gather_positions(pos: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Positions ``[B, L]`` or ``[3, B, L]`` at ``idx [B, K]``."""
    if pos.dim() == 3:
        return torch.gather(pos, 2, idx[None].expand(pos.shape[0], -1, -1))
    return torch.gather(pos, 1, idx)


def family_prefill(model, batch, keep: list[torch.Tensor], policy: str = "original") -> torch.Tensor:
    """``[B, 1, V]`` last-position logits of the stock language model run on the rows ``keep`` (per sample, sorted
    sequence positions) of :func:`family_inputs`; rows of unequal length are left-padded. ``policy``: ``"original"``
    (the kept tokens' own positions) or ``"contiguous"`` (renumbered 0..K-1; 1-D RoPE models only)."""
    a = _any_adapter(model)
    x = family_inputs(model, batch)
    K = max(int(k.numel()) for k in keep)
    B = len(keep)
    dev = x["embeds"].device
    idx = torch.zeros(B, K, dtype=torch.long, device=dev)
    m = torch.zeros(B, K, dtype=torch.long, device=dev)
    for b, k in enumerate(keep):
        idx[b, K - k.numel():] = k.to(dev)
        m[b, K - k.numel():] = 1
    e = _gather_rows(x["embeds"], idx) * m[..., None].to(x["embeds"].dtype)
    if policy == "contiguous":
        if a.position_kind == "mrope":
            raise NotImplementedError("the family oracle renumbers 1-D RoPE positions only (M-RoPE: 'original')")
        pos = (m.cumsum(-1) - 1).clamp(min=0)
    elif policy == "original":
        pos = _gather_positions(x["positions"], idx)
    else:
        raise ValueError(f"positions policy must be 'original' or 'contiguous', got {policy!r}")
    extra = {}
    if x["deepstack"] is not None:
        rank = (x["visual"].flatten().long().cumsum(0) - 1).view_as(x["visual"])
        vis = torch.gather(x["visual"], 1, idx) & m.bool()
        rows = torch.gather(rank, 1, idx)[vis]
        extra = {"visual_pos_masks": vis, "deepstack_visual_embeds": [d[rows] for d in x["deepstack"]]}
    out = a.language_model(inputs_embeds=e, attention_mask=m, position_ids=pos, use_cache=False, **extra)
    return a.lm_head(out.last_hidden_state[:, -1:])


def image_features(model, pixel_values, vision_layers_run: int | None = None) -> torch.Tensor:
    """``[images, patches, hidden]`` LLM-space image features as LLaVA-1.5 computes them, by a plain loop over the
    stock CLIP layers: only the first ``vision_layers_run`` layers are run (default: up to the feature layer, which is
    all LLaVA reads; HF runs every layer), then the feature layer's output without CLS and the stock projector."""
    a = _adapter(model)
    tower = a.vision_tower
    feat = a.vision_feature_layer()
    n = len(a.vision_layers) if vision_layers_run is None else int(vision_layers_run)
    if n <= feat:
        raise ValueError(f"vision_layers_run={n} does not reach the feature layer {feat}")
    h = tower.pre_layrnorm(tower.embeddings(pixel_values.to(tower.dtype)))
    out = None
    for i, layer in enumerate(a.vision_layers[:n]):
        h = layer(h, None)
        if i == feat:
            out = h
    return a.projector(out[:, 1:])


def merged_embeds(model, batch, vision_layers_run: int | None = None) -> torch.Tensor:
    """``[B, L, D]``: the token embeddings with the image features in the image-token slots (LLaVA's merge)."""
    a = _adapter(model)
    ids = batch["input_ids"]
    emb = model.get_input_embeddings()(ids)
    feats = image_features(model, batch["pixel_values"], vision_layers_run).to(emb.dtype)
    slots = (ids == a.image_token_id)[..., None].expand_as(emb)
    return emb.masked_scatter(slots, feats.reshape(-1))


def kept_positions(model, batch, stats) -> list[torch.Tensor]:
    """Per sample, the sorted sequence positions a pruner kept: every non-pad text token and the visual tokens at
    ``stats["kept_indices"]`` (per sample, per image: indices within that image's visual tokens); a method that
    removes every visual token reports no ``kept_indices`` but ``visual_tokens_after == 0`` (DyVTE)."""
    a = _any_adapter(model)
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    vis = ids == a.image_token_id
    nonpad = mask.bool() if mask is not None else torch.ones_like(vis)
    spans = a.image_spans(batch)
    out = []
    for b in range(ids.shape[0]):
        keep = nonpad[b] & ~vis[b]
        if stats.get("kept_indices") is not None:
            for span, idx in zip(spans[b], stats["kept_indices"][b]):   # indices within each image's tokens
                pos = span.positions.to(keep.device)
                keep[pos[torch.as_tensor(idx, dtype=torch.long, device=keep.device)]] = True
        elif (stats.get("visual_tokens_after") or [None] * (b + 1))[b] != 0:
            raise ValueError("the method's stats name no kept_indices and do not say that every visual token went")
        out.append(keep.nonzero().flatten())
    return out


def left_pad(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``[n_b, D]`` -> ``([B, N, D]`` left-padded with zeros, ``[B, N]`` long mask)."""
    N = max(r.shape[0] for r in rows)
    out = rows[0].new_zeros(len(rows), N, rows[0].shape[-1])
    mask = torch.zeros(len(rows), N, dtype=torch.long, device=rows[0].device)
    for b, r in enumerate(rows):
        out[b, N - r.shape[0]:] = r
        mask[b, N - r.shape[0]:] = 1
    return out, mask


def _generate(model, n: int, **inputs) -> None:
    with torch.inference_mode():
        model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)


def build(model, batch, method: str, stats: dict) -> tuple:
    """``(gen, decodes)`` for ``method``'s oracle: ``gen(n)`` runs it for ``n`` new tokens (timed by the caller);
    ``decodes`` False when only the prefill (``n = 1``) is an oracle of the method (the decode cells stay empty)."""
    kind = ORACLE_METHODS.get(method)
    if kind is None:
        raise ValueError(f"no oracle for {method!r} (oracles: {', '.join(ORACLE_METHODS)})")
    run = stats.get("vision_layers_run")
    a = _any_adapter(model)
    if not _is_llava15(a):
        return _build_family(model, batch, method, kind, stats)
    if kind == "pre_llm":
        keep = kept_positions(model, batch, stats)

        def gen(n):
            with torch.inference_mode():
                emb = merged_embeds(model, batch, run)
                e, m = left_pad([emb[b, k] for b, k in enumerate(keep)])
            _generate(model, n, inputs_embeds=e, attention_mask=m)

        return gen, True
    if kind == "midstack":
        keep = kept_positions(model, batch, stats)
        if len({k.numel() for k in keep}) != 1 or (batch.get("attention_mask") is not None
                                                   and not bool(batch["attention_mask"].bool().all())):
            raise NotImplementedError("the mid-stack oracle runs unpadded batches whose rows keep equally many tokens")
        layer = int(stats.get("layer") or 0)
        if layer < 1:
            raise ValueError("the method's stats name no removal layer (stats['layer'])")
        keep_idx = torch.stack(keep)

        def gen(n):
            if n != 1:
                raise ValueError("the mid-stack oracle measures the prefill only")
            with torch.inference_mode():
                midstack_forward(model, merged_embeds(model, batch), layer, keep_idx)

        return gen, False
    if kind == "vcd":
        two = {k: torch.cat([v, v]) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        return (lambda n: _generate(model, n, **two)), True
    if kind == "vhr":
        a = _adapter(model)
        text = a.text_only_keep(batch["input_ids"])
        mask = batch.get("attention_mask")
        if mask is not None:
            text = text & mask.bool()
        main_mask = mask if mask is not None else torch.ones_like(batch["input_ids"])

        def gen(n):
            if n != 1:
                raise ValueError("the VHR oracle measures the prefill only (VHR's decode runs the main rows)")
            with torch.inference_mode():
                emb = merged_embeds(model, batch)
                t, tm = left_pad([emb[b, text[b]] for b in range(emb.shape[0])])
                model(inputs_embeds=t, attention_mask=tm, use_cache=False, logits_to_keep=1)
            _generate(model, n, inputs_embeds=emb, attention_mask=main_mask)

        return gen, False
    # damro: the contrast prompt keeps the text and only the outlier tokens
    keep = kept_positions(model, batch, {"kept_indices": stats["outlier_indices"]})
    mask = batch.get("attention_mask")
    main_mask = mask if mask is not None else torch.ones_like(batch["input_ids"])

    def gen(n):
        with torch.inference_mode():
            emb = merged_embeds(model, batch, run)
            c, cm = left_pad([emb[b, k] for b, k in enumerate(keep)])
            L = emb.shape[1]
            c = torch.cat([c.new_zeros(c.shape[0], L - c.shape[1], c.shape[2]), c], 1)
            cm = torch.cat([cm.new_zeros(cm.shape[0], L - cm.shape[1]), cm], 1)
        _generate(model, n, inputs_embeds=torch.cat([emb, c]), attention_mask=torch.cat([main_mask, cm]))

    return gen, True


def _build_family(model, batch, method: str, kind: str, stats: dict) -> tuple:
    """Prefill oracles on the issue-19 families (the module docstring)."""
    a = _any_adapter(model)
    if kind not in FAMILY_ORACLE_KINDS:
        raise NotImplementedError(f"no {method} oracle on {a.family!r} models yet (there: "
                                  f"{', '.join(m for m, k in ORACLE_METHODS.items() if k in FAMILY_ORACLE_KINDS)})")
    keep = kept_positions(model, batch, stats)
    if kind == "pre_llm":
        policy = stats.get("positions") or ("original" if a.position_kind == "mrope" else "contiguous")

        def gen(n):
            if n != 1:
                raise ValueError(f"the {a.family} oracle measures the prefill only")
            with torch.inference_mode():
                family_prefill(model, batch, keep, policy)

        return gen, False
    if len({k.numel() for k in keep}) != 1 or (batch.get("attention_mask") is not None
                                               and not bool(batch["attention_mask"].bool().all())):
        raise NotImplementedError("the mid-stack oracle runs unpadded batches whose rows keep equally many tokens")
    layer = int(stats.get("layer") or 0)
    if layer < 1:
        raise ValueError("the method's stats name no removal layer (stats['layer'])")
    keep_idx = torch.stack(keep)

    def gen(n):
        if n != 1:
            raise ValueError("the mid-stack oracle measures the prefill only")
        with torch.inference_mode():
            x = family_inputs(model, batch)
            midstack_forward(model, x["embeds"], layer, keep_idx, positions=x["positions"], visual=x["visual"],
                             deepstack=x["deepstack"])

    return gen, False


def midstack_forward(model, embeds, layer: int, keep_idx, positions=None, visual=None, deepstack=None) -> torch.Tensor:
    """Logits of the last position: stock decoder layers ``0..layer-1`` over the full ``embeds`` and ``layer..`` over
    the rows ``keep_idx [B, K]`` (original RoPE positions), causal (unpadded rows), final norm, LM head.
    ``positions``: the input's positions (default ``0..L-1``; ``[3, B, L]`` M-RoPE); ``visual`` / ``deepstack``
    (Qwen3-VL): DeepStack feature ``i`` added after layer ``i`` at the visual rows still present, as HF adds it."""
    a = _any_adapter(model)
    B, L, _ = embeds.shape
    pos = torch.arange(L, device=embeds.device).expand(B, L) if positions is None else positions
    cos, sin = a.rotary(embeds, pos)
    seq_dim = cos.dim() - 2          # [B, L, D] or [3, B, L, D] (Qwen2-VL's sectioned M-RoPE)
    src = torch.arange(L, device=embeds.device).expand(B, L)
    if deepstack is not None:
        rank = (visual.flatten().long().cumsum(0) - 1).view_as(visual)

    def take(t, idx):
        t = t.expand(*t.shape[:seq_dim - 1], B, *t.shape[seq_dim:])
        return torch.gather(t, seq_dim, idx.view(*([1] * (seq_dim - 1)), *idx.shape, 1).expand(
            *t.shape[:seq_dim - 1], *idx.shape, t.shape[-1]))

    h = embeds
    for i, dec in enumerate(a.decoder_layers):
        if i == layer:
            idx = keep_idx.to(h.device)
            h = torch.gather(h, 1, idx[..., None].expand(-1, -1, h.shape[-1]))
            cos, sin = take(cos, idx), take(sin, idx)
            pos = _gather_positions(pos, idx)
            src = torch.gather(src, 1, idx)
        h = dec(h, attention_mask=None, position_ids=pos, position_embeddings=(cos, sin))
        if deepstack is not None and i < len(deepstack):
            vis = torch.gather(visual, 1, src)
            h = h.clone()
            h[vis] = h[vis] + deepstack[i][torch.gather(rank, 1, src)[vis]].to(h.dtype)
    h = a.language_model.norm(h[:, -1:])
    return a.lm_head(h)
