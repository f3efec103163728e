"""Issue 8: pruning mechanics on the paths the first suite never reached (each test failed on the code before the fix).

Unpadded batches with different kept counts, video input, cache continuation, ``disabled()`` as a true baseline,
stacked handles removed in any order, beam search / several return sequences, ``labels=``, layers on other devices,
the rewrite path under neutral settings, FastV against an independent layer-by-layer reference, and the shared
``keep_ratio`` / ``keep_tokens`` vocabulary.
"""
import copy
import itertools
from dataclasses import dataclass

import pytest
import torch

import vtoolkit as vt
from conftest import ARCHS, NEW_ARCHS, assert_same_continuation, pruned_llava_embeds, sample_batch, tiny_model
from vtoolkit import compat
from vtoolkit.hooks.sequence import force_rewrite
from vtoolkit.models.tiny import demo_image

GEN = dict(max_new_tokens=4, do_sample=False)


def _pad_id(model, proc):
    pid = model.generation_config.pad_token_id
    return pid if pid is not None else proc.tokenizer.pad_token_id


def _equal_length_batch(arch):
    """Sample 0: two images; sample 1: one image, its question lengthened until both prompts have the same length, so
    the batch has no padding (generate then drops the all-ones attention mask)."""
    model, proc, adapter = tiny_model(arch)
    if arch.startswith("qwen"):
        imgs0, img1 = [demo_image(1, (56, 56)), demo_image(2, (56, 56))], demo_image(3, (112, 56))
    else:
        imgs0, img1 = [demo_image(1, (160, 120)), demo_image(2, (120, 160))], demo_image(3, (160, 120))
    q0 = "Is there a dog?"
    n0 = adapter.prepare_inputs(proc, [imgs0], [q0])["input_ids"].shape[1]
    for extra, dots in itertools.product(range(0, 120), range(3)):
        q1 = "Is there a dog?" + " x" * extra + "." * dots
        if adapter.prepare_inputs(proc, [img1], [q1])["input_ids"].shape[1] == n0:
            batch = adapter.prepare_inputs(proc, [imgs0, img1], [q0, q1])
            assert bool(batch["attention_mask"].all())
            return batch, [(imgs0, q0), ([img1], q1)]
    raise AssertionError("could not equalise the prompt lengths")


# 1 ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
@pytest.mark.parametrize("arch", ["qwen2_vl", "llava"])
def test_unpadded_batch_with_different_kept_counts_equals_singles(arch):
    model, proc, adapter = tiny_model(arch)
    batch, parts = _equal_length_batch(arch)
    with vt.apply_method(model, "fastervlm", keep_tokens=4) as h:
        out = model.generate(**batch, max_new_tokens=6, do_sample=False)
        assert h.stats["visual_tokens_after"] == [8, 4]
        n = batch["input_ids"].shape[1]
        for i, (imgs, q) in enumerate(parts):
            one = adapter.prepare_inputs(proc, [imgs], [q])
            single = model.generate(**one, max_new_tokens=6, do_sample=False)
            assert_same_continuation(out[i, n:], single[0, one["input_ids"].shape[1]:], _pad_id(model, proc),
                                     f"sample {i}")


# 2 ----------------------------------------------------------------------------------------------------------------
def _qwen_video_batch(proc, adapter, with_image: bool):
    tok = proc.tokenizer
    t, h, w = 1, 4, 4                                   # one temporal group of 4x4 patches -> 4 merged tokens
    n_vid = t * h * w // 4
    image = ""
    batch = {}
    if with_image:
        img = adapter.prepare_inputs(proc, [demo_image(0, (56, 56))], ["x"])
        n_img = int((img["input_ids"] == adapter.image_token_id).sum())
        image = "<|vision_start|>" + "<|image_pad|>" * n_img + "<|vision_end|>"
        batch.update(pixel_values=img["pixel_values"], image_grid_thw=img["image_grid_thw"])
    text = (f"<|im_start|>user\n{image}<|vision_start|>" + "<|video_pad|>" * n_vid
            + "<|vision_end|>Describe the video.<|im_end|>\n<|im_start|>assistant\n")
    ids = tok([text], return_tensors="pt")
    tt = torch.zeros_like(ids["input_ids"])
    tt[ids["input_ids"] == adapter.image_token_id] = 1
    tt[ids["input_ids"] == adapter.video_token_id] = 2
    g = torch.Generator().manual_seed(0)
    batch.update(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"], mm_token_type_ids=tt,
                 pixel_values_videos=torch.randn(t * h * w, 3 * 2 * 14 * 14, generator=g),
                 video_grid_thw=torch.tensor([[t, h, w]]))
    return batch


@torch.no_grad()
@pytest.mark.parametrize("method,opts", [("fastervlm", {"keep_ratio": 0.5}), ("random", {"keep_ratio": 0.5}),
                                         ("fastv", {"keep_ratio": 0.5})])
@pytest.mark.parametrize("with_image", [False, True])
def test_video_input_is_refused_never_half_pruned(method, opts, with_image):
    model, proc, adapter = tiny_model("qwen2_vl")
    batch = _qwen_video_batch(proc, adapter, with_image)
    model.generate(**batch, max_new_tokens=2)           # the stock model takes this input
    with vt.apply_method(model, method, **opts):
        with pytest.raises(NotImplementedError, match=f"{method}: video input is not supported"):
            model.generate(**batch, max_new_tokens=2)
    with vt.apply_method(model, "none"):                # the identity supports anything
        model.generate(**batch, max_new_tokens=2)


# 3 ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def test_continuing_from_a_cache_is_refused():
    model, proc, adapter = tiny_model("llava")
    batch = sample_batch("llava", n=1)
    first = model.generate(**batch, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    ids = torch.cat([first.sequences, proc.tokenizer([" and?"], return_tensors="pt", add_special_tokens=False)
                     ["input_ids"]], 1)
    follow = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False)
    name = compat.cache_param(adapter.language_model)       # the image is in the cache already

    base = model.generate(**follow, **{name: copy.deepcopy(compat.output_cache(first))})
    with vt.apply_method(model, "fastervlm", keep_ratio=0.25):
        out = model.generate(**batch, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
        with pytest.raises(NotImplementedError, match="fastervlm: this forward continues from a KV cache"):
            model.generate(**follow, **{name: compat.output_cache(out)})
    with vt.apply_method(model, "none"):                # the identity continues like the stock model
        again = model.generate(**follow, **{name: copy.deepcopy(compat.output_cache(first))})
    assert torch.equal(again, base)


# 4 ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
@pytest.mark.parametrize("arch,method,opts", [("llava", "fastervlm", {"keep_ratio": 0.25}),
                                              ("qwen2_vl", "fastervlm", {"keep_ratio": 0.25}),
                                              ("llava", "fastv", {"keep_ratio": 0.5}),
                                              ("qwen2_5_vl", "random", {"keep_ratio": 0.5})])
def test_disabled_is_the_true_baseline(arch, method, opts):
    model, proc, adapter = tiny_model(arch)
    batch = sample_batch(arch, n=2)
    pixels = batch["pixel_values"]
    kw = {"grid_thw": batch["image_grid_thw"]} if arch.startswith("qwen") else {}
    base_gen = model.generate(**batch, **GEN)
    base_vision = adapter.vision_tower(pixels, output_hidden_states=True, **kw)
    with vt.apply_method(model, method, **opts) as h:
        model.generate(**batch, **GEN)
        m = h.methods[0]
        state_before = _side_state(m)
        with h.disabled():
            assert torch.equal(model.generate(**batch, **GEN), base_gen)
            vision = adapter.vision_tower(pixels, output_hidden_states=True, **kw)
            for a, b in zip(base_vision.hidden_states, vision.hidden_states):   # no layer skipped
                assert torch.equal(a, b)
            assert _side_state(m) == state_before                             # no scorer ran
        assert model.generate(**batch, **GEN).shape == base_gen.shape       # re-enabled


def _side_state(m):
    scores = getattr(m, "scores", None)
    chunks = getattr(scores, "_chunks", None)
    return (id(chunks), len(chunks) if chunks is not None else None, id(getattr(m, "_scores", None)),
            m.adapter.model.model.__dict__.get("rope_deltas") is None)


# 5 ----------------------------------------------------------------------------------------------------------------
@pytest.fixture
def second_identity():
    """A second identity-like method, so three handles can sit on one model at once."""
    from vtoolkit import registry
    from vtoolkit.config import MethodConfig
    from vtoolkit.methods.none import NoneMethod

    @dataclass(frozen=True)
    class Cfg(MethodConfig):
        pass

    @registry.register_method("test_identity_b", config=Cfg, kind="identity", stage="none", architectures=("*",))
    class IdentityB(NoneMethod):
        pass

    yield "test_identity_b"
    registry._METHODS.pop("test_identity_b", None)


@torch.no_grad()
@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_stacked_handles_removed_in_any_order(order, second_identity):
    model, _, adapter = tiny_model("llava")
    batch = sample_batch("llava", n=2)
    base = model(**batch).logits
    attrs = {id(m): set(vars(m)) for m in model.modules()}
    handles = [vt.apply_method(model, "fastervlm", keep_tokens=8), vt.apply_method(model, "none"),
               vt.apply_method(model, second_identity)]
    alive = set(range(3))
    for i in order:
        model.generate(**batch, max_new_tokens=2)
        for j in alive:                                  # every live handle saw the call
            assert handles[j].stats["visual_tokens_before"] == [64, 64]
        if 0 in alive:
            assert handles[0].stats["visual_tokens_after"] == [8, 8]
        handles[i].remove()
        alive.discard(i)
    assert {id(m): set(vars(m)) for m in model.modules()} == attrs
    assert torch.equal(model(**batch).logits, base)


# 6 ----------------------------------------------------------------------------------------------------------------
def _pruned_llava_inputs(model, adapter, batch, kept):
    """The LLM input FasterVLM builds, by hand: merged embeddings, kept visual rows, contiguous positions."""
    emb, _ = pruned_llava_embeds(model, adapter, batch, kept)
    return emb, torch.ones(1, emb.shape[1], dtype=torch.long)


@torch.no_grad()
def test_beam_search_equals_beam_search_on_hand_pruned_inputs():
    model, proc, adapter = tiny_model("llava")
    batch = sample_batch("llava", n=1)
    beams = dict(max_new_tokens=5, num_beams=3, num_return_sequences=2, do_sample=False, early_stopping=True)
    with vt.apply_method(model, "fastervlm", keep_tokens=10) as h:
        out = model.generate(**batch, **beams)
        (kept,) = h.stats["kept_indices"][0]
        assert h.stats["visual_tokens_after"] == [10]                  # one entry per input sample
    emb, mask = _pruned_llava_inputs(model, adapter, batch, kept)
    ref = model.generate(inputs_embeds=emb, attention_mask=mask, **beams)
    assert torch.equal(out[:, batch["input_ids"].shape[1]:], ref)


@torch.no_grad()
def test_sampled_return_sequences_equal_hand_pruned_inputs():
    model, proc, adapter = tiny_model("llava")
    batch = sample_batch("llava", n=1)
    kw = dict(max_new_tokens=4, do_sample=True, top_k=20, num_return_sequences=3)
    with vt.apply_method(model, "fastervlm", keep_tokens=10) as h:
        torch.manual_seed(5)
        out = model.generate(**batch, **kw)
        (kept,) = h.stats["kept_indices"][0]
    emb, mask = _pruned_llava_inputs(model, adapter, batch, kept)
    torch.manual_seed(5)
    ref = model.generate(inputs_embeds=emb, attention_mask=mask, **kw)
    assert torch.equal(out[:, batch["input_ids"].shape[1]:], ref)


@torch.no_grad()
@pytest.mark.parametrize("arch", ARCHS + NEW_ARCHS)      # new families: tiles, several images per prompt, DeepStack
@pytest.mark.parametrize("method,opts", [("fastervlm", {"keep_ratio": 0.3}), ("fastv", {"keep_ratio": 0.5})])
def test_beam_search_batch_equals_singles(arch, method, opts):
    model, proc, adapter = tiny_model(arch)
    batch = sample_batch(arch, n=2, two_images=True)
    beams = dict(max_new_tokens=3, num_beams=2, do_sample=False)
    with vt.apply_method(model, method, **opts) as h:
        out = model.generate(**batch, **beams)
        assert len(h.stats["visual_tokens_after"]) == 2
        n = batch["input_ids"].shape[1]
        for i in range(2):
            images = [demo_image(0, (160, 120))] if i == 0 else [[demo_image(1, (200, 100)),
                                                                   demo_image(7, (100, 150))]]
            q = ["Is there a dog?", "Describe this image in detail, please, with every object you see."][i]
            one = adapter.prepare_inputs(proc, images, [q])
            single = model.generate(**one, **beams)
            assert_same_continuation(out[i, n:], single[0, one["input_ids"].shape[1]:], _pad_id(model, proc),
                                     f"sample {i}")


# 7 ----------------------------------------------------------------------------------------------------------------
def _labels(batch, adapter):
    labels = batch["input_ids"].clone()
    labels[(labels == adapter.image_token_id) | (batch["attention_mask"] == 0)] = -100
    return labels


@torch.no_grad()
def test_labels_are_pruned_with_the_sequence():
    model, proc, adapter = tiny_model("llava")
    batch = sample_batch("llava", n=1)
    labels = _labels(batch, adapter)
    base = model(**batch, labels=labels)
    with vt.apply_method(model, "fastervlm", keep_ratio=1.0):
        assert torch.allclose(model(**batch, labels=labels).loss, base.loss)
    with vt.apply_method(model, "fastervlm", keep_tokens=10) as h:
        out = model(**batch, labels=labels)
        (kept,) = h.stats["kept_indices"][0]
    emb, _ = _pruned_llava_inputs(model, adapter, batch, kept)
    img = batch["input_ids"][0] == adapter.image_token_id
    keep = ~img
    keep[img.nonzero().flatten()[kept]] = True
    logits = model.lm_head(model.model.language_model(inputs_embeds=emb).last_hidden_state)
    ref = torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, keep][1:], ignore_index=-100)
    assert torch.allclose(out.loss, ref, atol=1e-6)
    assert out.logits.shape[1] == int(keep.sum())


@torch.no_grad()
@pytest.mark.parametrize("arch", ["llava", "qwen2_vl"])
def test_labels_with_midstack_pruning_and_padding(arch):
    model, proc, adapter = tiny_model(arch)
    batch = sample_batch(arch, n=3)
    labels = _labels(batch, adapter)
    with vt.apply_method(model, "fastv", keep_ratio=0.5) as h:
        out = model(**batch, labels=labels)
        kept = h.stats["kept_indices"]
    spans = adapter.image_spans(batch)
    rows = []
    for b in range(3):                     # the rows the last layers saw: text + kept visual tokens, left-padded
        keep = batch["attention_mask"][b].bool() & (batch["input_ids"][b] != adapter.image_token_id)
        keep[spans[b][0].positions[kept[b][0]]] = True
        rows.append(labels[b, keep])
    K = max(r.numel() for r in rows)
    pruned = torch.stack([torch.cat([torch.full((K - r.numel(),), -100), r]) for r in rows])
    assert out.logits.shape[1] == K
    ref = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), pruned[:, 1:].flatten(),
                                            ignore_index=-100)
    assert torch.allclose(out.loss, ref, atol=1e-6)


# 8 ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def test_masks_and_positions_move_to_the_device_of_the_layer_they_feed():
    """A CPU machine has one device; the 'meta' device stands in for a second one: every tensor a hook hands to a
    layer on the other device must be on that device (a real device_map split raises on a mismatch)."""
    from vtoolkit.hooks.context import CallContext
    from vtoolkit.hooks.midstack import MidStackPruner
    from vtoolkit.hooks.sequence import PrunePlan, SequencePruner

    model, proc, adapter = tiny_model("llava")
    ctx = CallContext(adapter)
    ctx.step = 0
    B, L, K, D = 2, 10, 6, 8
    keep_idx = torch.tensor([[0, 1, 2, 5, 8, 9], [0, 0, 2, 3, 4, 9]])
    valid = torch.tensor([[True] * 6, [False] + [True] * 5])
    meta = torch.device("meta")

    mid = MidStackPruner(adapter, ctx, 2, None)
    mid.plan = {"L": L, "keep_idx": keep_idx, "valid": valid, "per_device": {}}
    pe = (torch.randn(1, L, 4), torch.randn(1, L, 4))
    _, kw = mid._rewrite(2, (), {"hidden_states": torch.randn(B, L, D), "position_embeddings": pe,
                                 "position_ids": torch.arange(L)[None], "attention_mask": None},
                         torch.randn(B, L, D))
    _, kw = mid._rewrite(3, (), {"hidden_states": torch.randn(B, K, D, device=meta)}, torch.randn(B, K, D,
                                                                                                  device=meta))
    assert {t.device for t in (kw["attention_mask"], *kw["position_embeddings"], kw["position_ids"])} == {meta}
    ctx.step = 1
    _, kw = mid._rewrite(3, (), {"hidden_states": torch.randn(B, 1, D, device=meta), "attention_mask": None},
                         torch.randn(B, 1, D, device=meta))
    assert kw["attention_mask"].device == meta and kw["attention_mask"].shape == (B, 1, 1, K + 1)

    seq = SequencePruner(adapter, ctx, None, "contiguous")
    seq.plan = PrunePlan(L, keep_idx, valid, torch.tensor([4, 5]))
    _, kw = seq._decode({"attention_mask": torch.ones(B, L + 1, device=meta, dtype=torch.long),
                         "position_ids": torch.full((B, 1), L, device=meta)}, K + 1, meta)
    assert kw["attention_mask"].device == meta and kw["position_ids"].device == meta
    _, kw = seq._decode({"attention_mask": None}, K + 1, meta)
    assert kw["attention_mask"].device == meta and kw["attention_mask"].shape == (B, K + 1)


# 10 ---------------------------------------------------------------------------------------------------------------
NEUTRAL = [(a, m, o) for a in ARCHS for m, o in [("fastervlm", {"keep_ratio": 1.0}), ("random", {"keep_ratio": 1.0}),
                                                   ("fastv", {"keep_ratio": 1.0})]]
NEUTRAL += [(a, m, {"keep_ratio": 1.0}) for a in NEW_ARCHS for m in ("fastervlm", "fastv")]   # two-image prompts
NEUTRAL += [(a, "fastervlm", {"keep_ratio": 1.0, "positions": "original"}) for a in ("llava", "llava_next")]


@torch.no_grad()
@pytest.mark.parametrize("arch,method,opts", NEUTRAL)
def test_keep_everything_through_the_rewrite_path_equals_baseline(arch, method, opts):
    model, proc, adapter = tiny_model(arch)
    batch = sample_batch(arch, n=3, two_images=True)
    base = model.generate(**batch, **GEN)
    one = sample_batch(arch, n=1)
    base_logits = model(**one).logits
    rewrites = []
    with vt.apply_method(model, method, **opts) as h, force_rewrite():
        hook = adapter.decoder_layers[-1].register_forward_pre_hook(lambda m, a, k: rewrites.append(
            h.methods[0].ctx.layout.final is not None) if hasattr(h.methods[0], "ctx") else None, with_kwargs=True)
        try:
            assert torch.equal(model.generate(**batch, **GEN), base)
            assert torch.allclose(model(**one).logits, base_logits, atol=1e-5)
        finally:
            hook.remove()
    assert rewrites and all(rewrites)       # the rows were rewritten (identity gather), not passed through


# 11 ---------------------------------------------------------------------------------------------------------------
def _layer0_inputs(model, adapter, inputs):
    """Hidden states and keyword arguments entering decoder layer 0 in a plain forward (no handle)."""
    got = {}

    def grab(m, args, kwargs):
        got["hidden"] = (args[0] if args else kwargs["hidden_states"]).clone()
        got["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}

    hk = adapter.decoder_layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model(**inputs, use_cache=False)
    finally:
        hk.remove()
    return got["hidden"], got["kwargs"]


def _fastv_reference_next_token(model, adapter, inputs, K, keep):
    """Layers < K on every position, layers >= K on ``keep`` (bool over positions) with the original rotary
    embeddings; causal attention without a cache. Returns the last position's logits."""
    h, kw = _layer0_inputs(model, adapter, inputs)
    pe = kw["position_embeddings"]
    for i, layer in enumerate(adapter.decoder_layers):
        if i == K:
            h = h[:, keep]
            pe = tuple(t[:, keep] for t in pe)
        h = layer(h, attention_mask=None, position_embeddings=pe, use_cache=False)
        h = h[0] if isinstance(h, tuple) else h
    h = adapter.language_model.norm(h)
    return adapter.lm_head(h[:, -1])


@torch.no_grad()
@pytest.mark.parametrize("arch", ["llava", "qwen2_vl"])
def test_fastv_equals_an_independent_layer_by_layer_reference(arch):
    model, proc, adapter = tiny_model(arch)
    batch = sample_batch(arch, n=1)
    K, steps = 2, 4
    with vt.apply_method(model, "fastv", K=K, keep_ratio=0.4) as h:
        logits = model(**batch).logits[:, -1]
        cached = model.generate(**batch, max_new_tokens=steps, do_sample=False)
        (kept,) = h.stats["kept_indices"][0]
    (span,) = adapter.image_spans(batch)[0]
    L = batch["input_ids"].shape[1]
    keep = batch["input_ids"][0] != adapter.image_token_id
    keep[span.positions[kept]] = True
    assert torch.allclose(logits, _fastv_reference_next_token(model, adapter, batch, K, keep), atol=1e-5)
    # greedy continuation recomputed from scratch each step with the prefill's selection frozen (what the cache holds)
    seq = dict(batch)
    tokens = []
    for _ in range(steps):
        n = seq["input_ids"].shape[1]
        keep_all = torch.cat([keep, torch.ones(n - L, dtype=torch.bool)])
        nxt = _fastv_reference_next_token(model, adapter, seq, K, keep_all).argmax(-1)
        tokens.append(int(nxt))
        seq = {**seq, "input_ids": torch.cat([seq["input_ids"], nxt[:, None]], 1),
               "attention_mask": torch.cat([seq["attention_mask"], torch.ones(1, 1, dtype=torch.long)], 1)}
        if "mm_token_type_ids" in seq:
            seq["mm_token_type_ids"] = torch.cat([seq["mm_token_type_ids"], torch.zeros(1, 1, dtype=torch.long)], 1)
    assert cached[0, L:].tolist() == tokens[: cached.shape[1] - L]


@torch.no_grad()
def test_llava_next_tile_selections_match_eager_cls_attention_per_crop():
    """Every crop of a LLaVA-NeXT image (the unpadded high-res tiles too) keeps the top-T of its own [CLS]
    attention over the patches that survive unpadding, as computed from the vision tower alone."""
    model, proc, adapter = tiny_model("llava_next")
    batch = adapter.prepare_inputs(proc, [demo_image(4, (150, 100))], ["Describe it."])   # tiles of 48 of 64
    t = 5
    with vt.apply_method(model, "fastervlm", keep_tokens=t) as h:
        model(**batch)
        (kept,) = h.stats["kept_indices"][0]
    (span,) = adapter.image_spans(batch)[0]
    assert len(span.crops) >= 3
    vc = model.config.vision_config
    old = vc._attn_implementation
    vc._attn_implementation = "eager"
    try:
        pv = adapter.image_pixels(batch, 0)
        att = model.model.vision_tower(pv, output_attentions=True).attentions[adapter.vision_feature_layer()]
    finally:
        vc._attn_implementation = old
    cls = att[:, :, 0, 1:].mean(1)                                        # [crops, N]
    kept_pos = set(span.positions[kept].tolist())
    unpadded = 0
    for c, (pos, patches) in enumerate(zip(span.crops, span.crop_patches)):
        unpadded += int(patches.numel() < cls.shape[1])
        s = cls[c][patches]
        expected = set(pos[torch.topk(s, min(t, s.numel())).indices].tolist())
        assert expected == kept_pos & set(pos.tolist()), f"crop {c}"
    assert unpadded >= 1, "the test image should have unpadded tiles"
    assert set(span.newlines.tolist()) <= kept_pos


# 12 ---------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def test_every_pruner_speaks_keep_ratio_and_keep_tokens():
    model, _, _ = tiny_model("llava")
    batch = sample_batch("llava", n=2)
    for name in ("fastervlm", "random", "fastv"):
        fields = vt.get_config_class(name).field_names()
        assert {"keep_ratio", "keep_tokens"} <= set(fields), name
        with vt.apply_method(model, name, keep_ratio=0.25) as h:
            model(**batch)
            assert h.stats["visual_tokens_after"] == [16, 16], name
        with vt.apply_method(model, name, keep_tokens=5) as h:
            model(**batch)
            assert h.stats["visual_tokens_after"] == [5, 5], name
    with vt.apply_method(model, "fastv", ratio=0.75) as h:           # the paper's R (dropped) as an alias
        assert h.config.keep_ratio == 0.25
        model(**batch)
        assert h.stats["visual_tokens_after"] == [16, 16]
    with pytest.raises(ValueError, match="not several"):
        vt.apply_method(model, "fastv", ratio=0.5, keep_ratio=0.5)
    with pytest.raises(ValueError, match="keep_ratio .*KEPT"):
        vt.apply_method(model, "fastv", keep_ratio=0.0)
