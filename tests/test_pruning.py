"""Issue 3: FasterVLM and the random baseline through stock generate, batched, KV-cached."""
import pytest
import torch

import vtoolkit as vt
from conftest import assert_same_continuation, attn_implementation, sample_batch, tiny_model
from vtoolkit.hooks import count_hooks

GEN = dict(max_new_tokens=5, do_sample=False)


@torch.no_grad()
@pytest.mark.parametrize("method", ["fastervlm", "random"])
def test_keep_everything_equals_baseline(arch, method):
    model, _, _ = tiny_model(arch)
    batch = sample_batch(arch, n=3, two_images=True)
    base_logits = model(**batch).logits
    base = model.generate(**batch, **GEN)
    before = count_hooks(model)
    with vt.apply_method(model, method, keep_ratio=1.0) as h:
        assert torch.equal(model(**batch).logits, base_logits)
        assert torch.equal(model.generate(**batch, **GEN), base)
        assert h.stats["visual_tokens_after"] == h.stats["visual_tokens_before"]
    assert count_hooks(model) == before
    assert model.config.get_text_config()._attn_implementation == "sdpa"


@torch.no_grad()
@pytest.mark.parametrize("scope", ["per_crop", "global"])
def test_cache_equals_recompute_and_batch_equals_singles(arch, scope):
    model, proc, adapter = tiny_model(arch)
    batch = sample_batch(arch, n=3)
    with vt.apply_method(model, "fastervlm", keep_ratio=0.3, budget_scope=scope) as h:
        cached = model.generate(**batch, **GEN)
        stats = h.stats
        assert all(a < b for a, b in zip(stats["visual_tokens_after"], stats["visual_tokens_before"]))
        recomputed = model.generate(**batch, **GEN, use_cache=False)
        assert torch.equal(cached, recomputed)
        new = cached[:, batch["input_ids"].shape[1]:]
        for i in range(3):
            single = sample_batch(arch, n=3)  # rebuild and slice sample i alone (no padding)
            one = {k: v for k, v in single.items()}
            ids = one["input_ids"][i:i + 1]
            keep = one["attention_mask"][i].bool()
            one_inputs = adapter.prepare_inputs(proc, [_image_of(i)], [_question_of(i)])
            assert torch.equal(one_inputs["input_ids"][0], ids[0][keep])
            out = model.generate(**one_inputs, **GEN)
            assert_same_continuation(new[i], out[0, one_inputs["input_ids"].shape[1]:], proc.tokenizer.pad_token_id,
                                     f"sample {i}")
            assert all(torch.equal(x, y) for x, y in zip(h.stats["kept_indices"][0], stats["kept_indices"][i]))


def _image_of(i):
    from vtoolkit.models.tiny import demo_image

    sizes = [(160, 120), (200, 100), (120, 120)]
    return demo_image(i, sizes[i])


def _question_of(i):
    return ["Is there a dog?", "Describe this image in detail, please, with every object you see.", "Cat?"][i]


@torch.no_grad()
def test_manual_recompute_of_pruned_sequence_llava():
    """Independent reference: build the pruned embeddings by hand and decode greedily without a cache."""
    model, proc, adapter = tiny_model("llava")
    batch = sample_batch("llava", n=1)
    with vt.apply_method(model, "fastervlm", keep_tokens=10) as h:
        out = model.generate(**batch, max_new_tokens=4, do_sample=False)
        (kept,) = h.stats["kept_indices"][0]
    ids = batch["input_ids"]
    emb = model.get_input_embeddings()(ids)
    feats = torch.cat(model.model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output)
    img = ids[0] == adapter.image_token_id
    emb = emb.masked_scatter(img[None, :, None], feats)
    vis_pos = img.nonzero().flatten()
    keep = ~img
    keep[vis_pos[kept]] = True
    seq = emb[:, keep]
    toks = []
    for _ in range(4):
        hs = model.model.language_model(inputs_embeds=seq, use_cache=False).last_hidden_state
        nxt = model.lm_head(hs[:, -1]).argmax(-1)
        toks.append(int(nxt))
        seq = torch.cat([seq, model.get_input_embeddings()(nxt)[:, None]], 1)
    assert out[0, ids.shape[1]:].tolist() == toks


@torch.no_grad()
@pytest.mark.parametrize("arch_", ["llava", "llava_next"])
def test_kept_indices_match_eager_cls_attention(arch_):
    model, proc, adapter = tiny_model(arch_)
    batch = sample_batch(arch_, n=2)
    t = 7
    with vt.apply_method(model, "fastervlm", keep_tokens=t) as h:
        model.generate(**batch, max_new_tokens=1)
        kept = h.stats["kept_indices"]
    with attn_implementation(model.config.vision_config, "eager"):
        pv = batch["pixel_values"]
        if pv.dim() == 5:  # NeXT: crops of image 0 only; the base crop is never unpadded
            pv = pv[0]
        att = model.model.vision_tower(pv, output_attentions=True).attentions
    layer = adapter.vision_feature_layer()
    cls = att[layer][:, :, 0, 1:].mean(1)            # [crops, N]
    expected = torch.topk(cls[0], t).indices.sort().values
    got = kept[0][0][:t] if arch_ == "llava" else kept[0][0][:t]
    assert torch.equal(got, expected)


@torch.no_grad()
@pytest.mark.parametrize("arch_", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_kept_tokens_keep_original_mrope_positions(arch_):
    model, proc, adapter = tiny_model(arch_)
    batch = sample_batch(arch_, n=3)
    seen = []

    def spy(m, a, k):
        seen.append(k["position_ids"].clone())

    hook = model.model.language_model.register_forward_pre_hook(spy, with_kwargs=True)
    model.generate(**batch, max_new_tokens=3, do_sample=False)
    hook.remove()
    base_steps = seen[1:]
    seen.clear()
    with vt.apply_method(model, "fastervlm", keep_ratio=0.5) as h:
        hook = model.model.language_model.register_forward_pre_hook(spy, with_kwargs=True)  # runs after ours
        try:
            model.generate(**batch, max_new_tokens=3, do_sample=False)
        finally:
            hook.remove()
        kept = h.stats["kept_indices"]
        rope_deltas = model.model.rope_deltas.clone()
    full, _ = adapter.rope_index(batch, attention_mask=batch["attention_mask"])   # [3, B, L]
    pre = seen[0][1:] if seen[0].shape[0] == 4 else seen[0]
    ids = batch["input_ids"]
    spans = adapter.image_spans(batch)
    for b in range(3):
        keep = batch["attention_mask"][b].bool() & (ids[b] != adapter.image_token_id)
        vis = torch.cat([s.positions[k] for s, k in zip(spans[b], kept[b])])
        keep[vis] = True
        expected = full[:, b, keep]
        n = int(keep.sum())
        assert torch.equal(pre[:, b, -n:], expected)
    # decode steps continue exactly as in the unpruned run, and rope_deltas continues from the pruned cache length
    for step_pruned, step_base in zip(seen[1:], base_steps):
        assert torch.equal(step_pruned[1:], step_base[1:])
    L_pruned = seen[0].shape[-1]
    max_pos = full.masked_fill(~batch["attention_mask"].bool()[None], -1).amax(dim=(0, 2))
    assert torch.equal(rope_deltas.flatten(), max_pos + 1 - L_pruned)


@torch.no_grad()
def test_successive_calls_select_independently(arch):
    model, proc, adapter = tiny_model(arch)
    from vtoolkit.models.tiny import demo_image

    a = adapter.prepare_inputs(proc, [demo_image(11, (160, 120))], ["Is there a dog?"])
    b = adapter.prepare_inputs(proc, [demo_image(12, (160, 120))], ["Is there a dog?"])
    with vt.apply_method(model, "fastervlm", keep_ratio=0.25) as h:
        model.generate(**a, max_new_tokens=2)
        ka = h.stats["kept_indices"]
        model.generate(**b, max_new_tokens=2)
        kb = h.stats["kept_indices"]
    with vt.apply_method(model, "fastervlm", keep_ratio=0.25) as h:
        model.generate(**b, max_new_tokens=2)
        kb_fresh = h.stats["kept_indices"]
    assert not torch.equal(ka[0][0], kb[0][0])
    assert torch.equal(kb[0][0], kb_fresh[0][0])


@torch.no_grad()
def test_sampling_and_forward_with_batch():
    model, proc, adapter = tiny_model("llava")
    batch = sample_batch("llava", n=3)
    with vt.apply_method(model, "fastervlm", keep_tokens=8, positions="original") as h:
        torch.manual_seed(0)
        s1 = model.generate(**batch, max_new_tokens=4, do_sample=True, top_k=5)
        torch.manual_seed(0)
        s2 = model.generate(**batch, max_new_tokens=4, do_sample=True, top_k=5, use_cache=False)
        assert torch.equal(s1, s2)
        logits = model(**batch).logits
        assert logits.shape[1] == batch["input_ids"].shape[1] - (64 - 8)   # the LLM saw the pruned sequence
        assert h.stats["visual_tokens_after"] == [8, 8, 8]


def test_random_is_seeded():
    model, _, _ = tiny_model("llava")
    batch = sample_batch("llava", n=2)
    picks = []
    for seed in (0, 0, 1):
        with vt.apply_method(model, "random", keep_tokens=5, seed=seed) as h:
            with torch.no_grad():
                model(**batch)
            picks.append(h.stats["kept_indices"][0][0])
    assert torch.equal(picks[0], picks[1]) and not torch.equal(picks[0], picks[2])


def test_budget_errors():
    model, _, _ = tiny_model("llava")
    for bad in (dict(keep_ratio=0.0), dict(keep_ratio=1.5), dict(keep_ratio=0.1, keep_tokens=3),
                dict(keep_tokens=0), dict(budget_scope="everything")):
        with pytest.raises(ValueError):
            vt.apply_method(model, "fastervlm", **bad)
    with vt.apply_method(model, "fastervlm", keep_tokens=65):
        with pytest.raises(ValueError, match="keep_tokens=65 exceeds the 64 visual tokens"):
            with torch.no_grad():
                model(**sample_batch("llava", n=1))
    with pytest.raises(ValueError, match="M-RoPE"):
        vt.apply_method(tiny_model("qwen2_vl")[0], "fastervlm", positions="contiguous")
    with pytest.raises(TypeError, match="Did you mean 'keep_ratio'"):
        vt.apply_method(model, "fastervlm", keep_rato=0.1)
    assert vt.active_handles(model) == []


@torch.no_grad()
def test_unused_vision_layers_are_skipped_without_changing_outputs():
    model, _, adapter = tiny_model("llava")
    batch = sample_batch("llava", n=2)
    last = adapter.vision_layers[-1]
    calls = []
    h0 = last.register_forward_hook(lambda m, a, o: calls.append(torch.equal(o, a[0])))
    try:
        outs = {}
        for skip in (False, True):
            calls.clear()
            with vt.apply_method(model, "fastervlm", keep_tokens=12, skip_unused_vision_layers=skip) as h:
                outs[skip] = model.generate(**batch, max_new_tokens=3, do_sample=False)
                assert h.stats["vision_layers_run"] == len(adapter.vision_layers) - int(skip)
            assert calls == [skip]          # skipped: the layer returned its input unchanged
        assert torch.equal(outs[False], outs[True])
        assert "forward" not in vars(last)  # the instance override is gone after remove()
    finally:
        h0.remove()


@torch.no_grad()
def test_precomputed_image_features_do_not_reuse_stale_scores():
    model, _, _ = tiny_model("llava")
    batch = sample_batch("llava", n=1)
    with vt.apply_method(model, "fastervlm", keep_tokens=4) as h:
        model.generate(**batch, max_new_tokens=1)
        with h.disabled():   # features computed without the handle: no scores for them
            feats = model.model.get_image_features(pixel_values=batch["pixel_values"], return_dict=True)
        inputs = {k: v for k, v in batch.items() if k != "pixel_values"}
        with pytest.raises(RuntimeError, match="no vision scores were recorded for this call"):
            model(**inputs, mm_encoder_outputs={"image": feats})


@torch.no_grad()
@pytest.mark.parametrize("arch_", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_kept_indices_match_eager_received_attention(arch_):
    """Independent reference: HF's eager vision attention probabilities of the last full-attention block, mean over
    queries and heads, averaged over each 2x2 merge group, window order undone, top-k per image."""
    import importlib

    from transformers import AttentionInterface
    from transformers.vision_utils import get_vision_window_index

    model, proc, adapter = tiny_model(arch_)
    batch = sample_batch(arch_, n=3, two_images=True)
    t = 5
    with vt.apply_method(model, "fastervlm", keep_tokens=t) as h:
        model.generate(**batch, max_new_tokens=1)
        kept = [k for sample in h.stats["kept_indices"] for k in sample]

    modeling = importlib.import_module(type(model).__module__)
    target = adapter.vision_attention(adapter.full_attention_layers()[-1])
    probs = []

    def capture(module, q, k, v, attention_mask=None, **kw):
        out, w = modeling.eager_attention_forward(module, q, k, v, attention_mask, **kw)
        if module is target:
            probs.append(w[0].float())
        return out, w

    AttentionInterface.register("vtk_test_capture", capture)
    with attn_implementation(model.config.vision_config, "vtk_test_capture"):
        grid = batch["image_grid_thw"]
        model.model.visual(batch["pixel_values"], grid_thw=grid)
    received = torch.cat([w.mean(1).mean(0) for w in probs])          # per patch, ViT (window) order
    merged = received.view(-1, adapter.merge_size ** 2).mean(-1)
    if arch_ == "qwen2_5_vl":
        vt_ = adapter.vision_tower
        widx = get_vision_window_index(grid, spatial_merge_size=vt_.spatial_merge_size, window_size=vt_.window_size,
                                       patch_size=vt_.patch_size)[0]
        merged = merged[torch.argsort(widx)]
    per_image = torch.split(merged, (grid.prod(-1) // 4).tolist())
    assert len(per_image) == len(kept) == 4
    for scores, k in zip(per_image, kept):
        assert torch.equal(k, torch.topk(scores, t).indices.sort().values)


def test_fastervlm_requires_default_feature_strategy(monkeypatch):
    model, _, _ = tiny_model("llava")
    monkeypatch.setattr(model.config, "vision_feature_select_strategy", "full")
    with pytest.raises(ValueError, match="vision_feature_select_strategy='default'"):
        vt.apply_method(model, "fastervlm")
    assert vt.active_handles(model) == []
