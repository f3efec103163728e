"""Issue 12: DAMRO and VCD - contrastive decoding inside the stock generate, the contrast stream batched with the
prompt's rows after its own short prefill."""
import math
import warnings

import pytest
import torch
from transformers import DynamicCache

import vtoolkit as vt
from conftest import ARCHS, assert_same_continuation, sample_batch, tiny_model
from vtoolkit import compat
from vtoolkit.methods.contrastive import contrast_logits
from vtoolkit.methods.vcd import diffusion_noise
from vtoolkit.models.tiny import demo_image

GEN = dict(max_new_tokens=5, do_sample=False)
DAMRO = dict(topk=3, topk_rule="fixed")


def _reference_rule(full, contrast, alpha, beta):
    out = torch.empty_like(full)
    for b in range(full.shape[0]):
        m = max(full[b].tolist())
        for y in range(full.shape[1]):
            keep = beta == 0 or math.exp(full[b, y] - m) >= beta        # p(y) / max p
            out[b, y] = (1 + alpha) * full[b, y] - alpha * contrast[b, y] if keep else float("-inf")
    return out


def test_contrast_and_cutoff_equal_a_reference():
    g = torch.Generator().manual_seed(0)
    full, contrast = torch.randn(3, 40, generator=g) * 3, torch.randn(3, 40, generator=g) * 3
    for alpha, beta in [(0.0, 0.0), (1.0, 0.1), (2.0, 0.1), (0.5, 0.5), (3.0, 0.0)]:
        got, ref = contrast_logits(full, contrast, alpha, beta), _reference_rule(full, contrast, alpha, beta)
        assert torch.equal(torch.isinf(got), torch.isinf(ref))
        assert torch.allclose(got[~torch.isinf(got)], ref[~torch.isinf(ref)], atol=1e-5)
    assert torch.equal(contrast_logits(full, contrast, 0.0, 0.0), full)


@torch.no_grad()
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method,opts", [("damro", DAMRO), ("vcd", {})])
def test_alpha_zero_beta_zero_is_the_baseline(arch, method, opts):
    model, proc, adapter = tiny_model(arch)
    batch = sample_batch(arch, n=2)
    base = model.generate(**batch, **GEN)
    with vt.apply_method(model, method, alpha=0.0, beta=0.0, **opts) as h:
        assert torch.equal(model.generate(**batch, **GEN), base)
        assert h.stats["changed_tokens"] == [0, 0] and h.stats["steps"] == GEN["max_new_tokens"]
    with vt.apply_method(model, method, alpha=1.0, beta=0.1, **opts) as h:     # the contrast changes something
        model.generate(**batch, max_new_tokens=8, do_sample=False)
        assert sum(h.stats["changed_tokens"]) > 0


# -- the outliers and the contrast stream, from first principles --------------------------------------------------
def _eager_cls_topk(model, adapter, pixel_values, k):
    vc = model.config.vision_config
    old = vc._attn_implementation
    vc._attn_implementation = "eager"
    try:
        att = model.model.vision_tower(pixel_values, output_attentions=True).attentions[adapter.vision_feature_layer()]
    finally:
        vc._attn_implementation = old
    return [torch.topk(a, k).indices.sort().values for a in att[:, :, 0, 1:].mean(1)]


def _outlier_only_llava(model, adapter, batch, kept):
    ids = batch["input_ids"]
    emb = model.get_input_embeddings()(ids)
    feats = torch.cat(model.model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output)
    img = ids[0] == adapter.image_token_id
    emb = emb.masked_scatter(img[None, :, None], feats)
    keep = ~img
    keep[img.nonzero().flatten()[kept]] = True
    return emb, emb[:, keep]


@torch.no_grad()
def test_outliers_and_contrast_stream_equal_explicit_calls_llava():
    """cls_score="head_mean", order="spatial": outliers = top-k of the feature layer's head-mean [CLS] attention
    computed from the vision tower alone; the tokens equal a hand-written two-stream loop with two caches (full prompt
    / outlier-only prompt, contiguous positions). The default (pooled, score order): test_damro_vcd_fidelity.py."""
    model, proc, adapter = tiny_model("llava")
    batch = sample_batch("llava", n=1)
    alpha, beta, k, steps = 1.5, 0.1, 4, 6
    with vt.apply_method(model, "damro", alpha=alpha, beta=beta, topk=k, topk_rule="fixed", cls_score="head_mean",
                         order="spatial") as h:
        first = model(**batch).logits[:, -1]
        out = model.generate(**batch, max_new_tokens=steps, do_sample=False)
        (kept,) = h.stats["outlier_indices"][0]
        assert not h.methods[0]._batched_prefill       # a shorter contrast prompt: nested prefill + cache join
    assert torch.equal(kept, _eager_cls_topk(model, adapter, batch["pixel_values"], k)[0])
    full_emb, c_emb = _outlier_only_llava(model, adapter, batch, kept)
    lm, head = model.model.language_model, model.lm_head
    name = compat.cache_param(lm)
    c1, c2 = DynamicCache(config=model.config.text_config), DynamicCache(config=model.config.text_config)
    l1 = head(lm(inputs_embeds=full_emb, use_cache=True, **{name: c1}).last_hidden_state[:, -1])
    l2 = head(lm(inputs_embeds=c_emb, use_cache=True, **{name: c2}).last_hidden_state[:, -1])
    assert torch.allclose(first, contrast_logits(l1, l2, alpha, beta), atol=1e-4)    # step 1, logits
    toks = []
    for t in range(steps):
        nxt = contrast_logits(l1, l2, alpha, beta).argmax(-1)
        toks.append(int(nxt))
        e = model.get_input_embeddings()(nxt)[:, None]
        l1 = head(lm(inputs_embeds=e, use_cache=True, position_ids=torch.tensor([[full_emb.shape[1] + t]]),
                     **{name: c1}).last_hidden_state[:, -1])
        l2 = head(lm(inputs_embeds=e, use_cache=True, position_ids=torch.tensor([[c_emb.shape[1] + t]]),
                     **{name: c2}).last_hidden_state[:, -1])
    assert out[0, batch["input_ids"].shape[1]:].tolist() == toks


@torch.no_grad()
def test_contrast_stream_first_step_qwen_keeps_original_mrope_positions():
    """The outliers in the order of the stats (by score, the default), each with its original (t, h, w)."""
    model, proc, adapter = tiny_model("qwen2_vl")
    batch = sample_batch("qwen2_vl", n=1)
    alpha, beta = 1.0, 0.0
    with vt.apply_method(model, "damro", alpha=alpha, beta=beta, topk=3, topk_rule="fixed") as h:
        got = model(**batch).logits[:, -1]
        (kept,) = h.stats["outlier_indices"][0]
    full = model(**batch).logits[:, -1]
    ids = batch["input_ids"]
    pos, _ = model.model.get_rope_index(ids, mm_token_type_ids=batch["mm_token_type_ids"],
                                        image_grid_thw=batch["image_grid_thw"])
    emb = model.get_input_embeddings()(ids)
    feats = torch.cat(model.model.get_image_features(pixel_values=batch["pixel_values"],
                                                     image_grid_thw=batch["image_grid_thw"]).pooler_output)
    img = ids[0] == adapter.image_token_id
    emb = emb.masked_scatter(img[None, :, None], feats)
    vis = img.nonzero().flatten()
    assert len(set(kept.tolist())) == 3
    order = torch.cat([torch.arange(vis[0]), vis[kept], torch.arange(vis[-1] + 1, ids.shape[1])])  # score order
    n = order.numel()
    p4 = torch.cat([torch.arange(n)[None, None], pos[:, :, order]], 0)
    hid = model.model.language_model(inputs_embeds=emb[:, order], position_ids=p4,
                                     attention_mask=torch.ones(1, n, dtype=torch.long)).last_hidden_state
    contrast = model.lm_head(hid[:, -1])
    assert torch.allclose(got, contrast_logits(full, contrast, alpha, beta), atol=1e-4)


@torch.no_grad()
def test_vcd_contrast_stream_sees_the_noised_image():
    model, proc, adapter = tiny_model("llava")
    batch = sample_batch("llava", n=1)
    alpha, beta = 1.0, 0.1
    with vt.apply_method(model, "vcd", alpha=alpha, beta=beta, noise_step=400) as h:
        got = model(**batch).logits[:, -1]             # a plain forward: the language model makes its cache itself,
        assert not h.methods[0]._batched_prefill       # so the contrast rows take the nested prefill
        noised = h.methods[0].noised_pixels(batch)
        gen = model.generate(**batch, max_new_tokens=1, do_sample=False, output_logits=True, return_dict_in_generate=True)
        assert h.methods[0]._batched_prefill           # generate passes a cache: one forward of 2B rows
        assert torch.allclose(gen.logits[0], got, atol=1e-4)   # both prefill paths give the same contrasted logits
    assert not torch.equal(noised, batch["pixel_values"])
    full = model(**batch).logits[:, -1]
    contrast = model(**{**batch, "pixel_values": noised}).logits[:, -1]
    assert torch.allclose(got, contrast_logits(full, contrast, alpha, beta), atol=1e-4)


def test_vcd_noise_schedule():
    x = torch.randn(2, 3, 4, 4)
    betas = [1 / (1 + math.exp(-(-6 + 12 * i / 999))) * (0.5e-2 - 1e-5) + 1e-5 for i in range(1000)]
    abar = 1.0
    for i in range(500 + 1):
        abar *= 1 - betas[i]
    eps = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref = (math.sqrt(abar) * x.double() + math.sqrt(1 - abar) * eps).float()
    assert torch.allclose(diffusion_noise(x, 500, torch.Generator().manual_seed(1)), ref, atol=1e-6)


# -- generate --------------------------------------------------------------------------------------------------------
@torch.no_grad()
# the new families: neutral / batch == singles / cache == recompute are in the contract (tests/test_contract.py);
# here Qwen3-VL too, for a two-image prompt whose contrast rows carry DeepStack
@pytest.mark.parametrize("arch", ARCHS + ["qwen3_vl"])
@pytest.mark.parametrize("method,opts", [("damro", DAMRO), ("vcd", {})])
def test_batch_equals_singles_and_cache_equals_recompute(arch, method, opts):
    model, proc, adapter = tiny_model(arch)
    batch = sample_batch(arch, n=3, two_images=True)
    # a random model may "generate" a visual placeholder; re-fed without a cache, the stock model would then count
    # one placeholder more than it has features, and refuse: keep those tokens out of this comparison
    gen = dict(GEN, suppress_tokens=[adapter.image_token_id, *(t for t in (adapter.video_token_id,
                                                                              *adapter.visual_marker_ids) if t)])
    with vt.apply_method(model, method, alpha=1.0, beta=0.1, **opts) as h:
        out = model.generate(**batch, **gen)
        stats = h.stats
        assert torch.equal(model.generate(**batch, **gen, use_cache=False), out)
        assert h.stats["changed_tokens"] == stats["changed_tokens"]
        n = batch["input_ids"].shape[1]
        for i in range(3):
            imgs = [demo_image(i, [(160, 120), (200, 100), (120, 120)][i])]
            if i == 1:
                imgs = [[imgs[0], demo_image(7, (100, 150))]]
            q = ["Is there a dog?", "Describe this image in detail, please, with every object you see.", "Cat?"][i]
            one = adapter.prepare_inputs(proc, imgs, [q])
            single = model.generate(**one, **gen)
            assert_same_continuation(out[i, n:], single[0, one["input_ids"].shape[1]:],
                                     proc.tokenizer.pad_token_id, f"sample {i}")
            if method == "damro":
                assert all(torch.equal(a, b) for a, b in zip(h.stats["outlier_indices"][0],
                                                             stats["outlier_indices"][i]))


@torch.no_grad()
@pytest.mark.parametrize("method,opts", [("damro", DAMRO), ("vcd", {})])
def test_sampling_is_reproducible_and_direct_mode_bypasses_processors(method, opts):
    model, proc, adapter = tiny_model("qwen2_vl")
    batch = sample_batch("qwen2_vl", n=2)

    def sample(**kw):
        torch.manual_seed(11)
        return model.generate(**batch, max_new_tokens=6, do_sample=True, **kw)

    with vt.apply_method(model, method, processors="direct", **opts):
        a, b = sample(), sample()
        assert torch.equal(a, b)
        with pytest.warns(UserWarning, match=r"processors='direct'.*temperature=0.3 \(generate\(\) call\)"):
            c = sample(temperature=0.3, top_k=5)
        assert torch.equal(c, a)                                   # ignored: the contrasted distribution as it is
    with vt.apply_method(model, method, processors="standard", **opts):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            d = sample(temperature=0.3, top_k=5)
        assert not torch.equal(d, a)                               # applied after the contrast


@torch.no_grad()
@pytest.mark.parametrize("arch", ["llava", "qwen3_vl"])     # qwen3_vl: generate repeats the DeepStack features too
def test_beams_and_return_sequences_keep_the_streams_paired(arch):
    model, proc, adapter = tiny_model(arch)
    batch = sample_batch(arch, n=2)
    beams = dict(max_new_tokens=4, num_beams=3, num_return_sequences=2, do_sample=False)
    base = model.generate(**batch, **beams)
    with vt.apply_method(model, "damro", alpha=0.0, beta=0.0, **DAMRO) as h:
        assert torch.equal(model.generate(**batch, **beams), base)
        assert len(h.stats["outlier_indices"]) == 2
    with vt.apply_method(model, "damro", alpha=1.0, beta=0.1, **DAMRO):
        out = model.generate(**batch, **beams)
        for i in range(2):      # a beam batch equals each prompt alone: side rows follow their beams
            one = adapter.prepare_inputs(proc, [demo_image(i, [(160, 120), (200, 100)][i])],
                                         [["Is there a dog?", "Describe this image in detail, please, with every "
                                           "object you see."][i]])
            single = model.generate(**one, **beams)
            n, m = batch["input_ids"].shape[1], one["input_ids"].shape[1]
            for j in range(2):
                assert_same_continuation(out[2 * i + j, n:], single[j, m:], proc.tokenizer.pad_token_id, f"{i}/{j}")


@torch.no_grad()
@pytest.mark.parametrize("arch", ["llava", "qwen2_vl", "qwen3_vl"])
def test_composes_with_a_pre_llm_pruner(arch):
    model, proc, adapter = tiny_model(arch)
    batch = sample_batch(arch, n=2)
    with vt.apply_method(model, "damro", alpha=1.0, beta=0.1, **DAMRO) as h:
        alone = model.generate(**batch, **GEN)
        outliers = h.stats["outlier_indices"]
    with vt.apply_method(model, [("fastervlm", {"keep_ratio": 1.0}), ("damro", {"alpha": 1.0, **DAMRO})]) as h:
        assert torch.equal(model.generate(**batch, **GEN), alone)
    with vt.apply_method(model, [("fastervlm", {"keep_ratio": 0.25}), ("damro", {"alpha": 1.0, **DAMRO})]) as h:
        out = model.generate(**batch, **GEN)
        assert torch.equal(model.generate(**batch, **GEN, use_cache=False), out)
        st = h.stats
        assert st["fastervlm"]["visual_tokens_after"] < st["fastervlm"]["visual_tokens_before"]
        assert all(torch.equal(a[0], b[0]) for a, b in zip(st["damro"]["outlier_indices"], outliers))
    with vt.apply_method(model, [("random", {"keep_ratio": 0.5}), ("vcd", {})]):
        model.generate(**batch, **GEN)


def test_bad_options_and_refused_compositions():
    model, _, _ = tiny_model("llava")
    batch = sample_batch("llava", n=1)
    for name, bad, match in [("damro", {"alpha": -0.1}, "alpha"), ("damro", {"beta": 1.0}, "beta"),
                             ("damro", {"beta": -0.5}, "beta"), ("damro", {"topk": 0}, "topk"),
                             ("damro", {"processors": "fast"}, "processors"), ("vcd", {"noise_step": 1000}, "noise_step"),
                             ("vcd", {"alpha": -1}, "alpha")]:
        with pytest.raises(ValueError, match=match):
            vt.apply_method(model, name, **bad)
    with vt.apply_method(model, "damro", topk=65, topk_rule="fixed"):
        with pytest.raises(ValueError, match="topk=65 asks for 65 outlier tokens but .* has only 64"):
            with torch.no_grad():
                model(**batch)
    for combo in (["fastv", "damro"], ["vhr", "vcd"], ["damro", "vcd"], [("var", {"sink_dims": [0]}), "damro"]):
        with pytest.raises(ValueError, match="cannot be composed"):
            vt.apply_method(model, combo)
