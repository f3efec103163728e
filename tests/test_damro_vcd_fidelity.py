"""Issue 17 (fidelity): DAMRO's outliers by the released LLaVA code's pooled [CLS] score in score order, the scaled
top-k rule on grids other than 576 tokens, VCD's noise (computed here from the official schedule) on all four
architectures with one draw per still image, direct mode naming what it bypasses, and text-only prompts.

The references are written out here from stock tensors (hooked ``q_proj`` / ``k_proj`` outputs of a stock forward,
the processor's pixels), not through vtoolkit's helpers."""
import copy
import hashlib
import math
import warnings

import pytest
import torch
from transformers import GenerationConfig

import vtoolkit as vt
from conftest import ARCHS, sample_batch, tiny_model
from vtoolkit.methods.contrastive import contrast_logits
from vtoolkit.methods.damro import DAMROConfig
from vtoolkit.models.tiny import demo_image


# -- DAMRO: the official outlier rule ------------------------------------------------------------------------------
def _stock_qk(model, pixel_values):
    """q_proj / k_proj outputs of the vision feature layer (``encoder.layers[vision_feature_layer]``, as the official
    hooks) in a stock vision-tower forward. ``pixel_values [n, 3, H, W]`` -> ``q, k [n, 1 + N, C]``."""
    attn = model.model.vision_tower.encoder.layers[model.config.vision_feature_layer].self_attn
    got = {}
    handles = [attn.q_proj.register_forward_hook(lambda m, a, o: got.__setitem__("q", o)),
               attn.k_proj.register_forward_hook(lambda m, a, o: got.__setitem__("k", o))]
    try:
        model.model.vision_tower(pixel_values)
    finally:
        for h in handles:
            h.remove()
    return got["q"], got["k"], attn.num_heads


def _official_topk(q, k, heads, topk, rule):
    """pooled (modeling_llava.py L466-473): softmax(q @ k^T * C ** -0.5)[:, 0, 1:], torch.topk (by score);
    head_mean (modeling_instructblip.py L1588-1610): per-head softmax with d ** -0.5, mean over heads."""
    n, T, C = q.shape
    if rule == "pooled":
        attn = torch.softmax((q @ k.transpose(-2, -1)) * C ** -0.5, dim=-1)
    else:
        d = C // heads
        qh, kh = (x.view(n, T, heads, d).transpose(1, 2) for x in (q, k))
        attn = torch.softmax((qh @ kh.transpose(-2, -1)) * d ** -0.5, dim=-1).mean(1)
    return torch.topk(attn[:, 0, 1:], topk, dim=1, largest=True).indices


@torch.no_grad()
@pytest.mark.parametrize("topk", [4, 10])
def test_damro_default_outliers_are_the_official_pooled_topk_in_score_order_llava(topk):
    model, proc, adapter = tiny_model("llava")
    batch = sample_batch("llava", n=5)
    q, k, heads = _stock_qk(model, batch["pixel_values"])
    pooled = _official_topk(q, k, heads, topk, "pooled")
    head_mean = _official_topk(q, k, heads, topk, "head_mean")
    # the two rules pick different sets on these images: the test tells them apart
    assert any(set(a.tolist()) != set(b.tolist()) for a, b in zip(pooled, head_mean))
    with vt.apply_method(model, "damro", topk=topk, topk_rule="fixed") as h:
        model(**batch)
        got = [img for sample in h.stats["outlier_indices"] for img in sample]
    assert [g.tolist() for g in got] == [p.tolist() for p in pooled]          # the same tokens, in score order
    with vt.apply_method(model, "damro", topk=topk, topk_rule="fixed", cls_score="head_mean") as h:
        model(**batch)
        got = [img for sample in h.stats["outlier_indices"] for img in sample]
    assert [g.tolist() for g in got] == [p.tolist() for p in head_mean]
    with vt.apply_method(model, "damro", topk=topk, topk_rule="fixed", order="spatial") as h:
        model(**batch)
        got = [img for sample in h.stats["outlier_indices"] for img in sample]
    assert [g.tolist() for g in got] == [p.sort().values.tolist() for p in pooled]


@torch.no_grad()
def test_damro_llava_next_base_crop_outliers_and_one_newline_last():
    """Per crop, the official pooled top-k in score order; the base image (crop 0, packed first) is the crop HF keeps
    whole, so its indices are raster indices; one image_newline after all outliers."""
    model, proc, adapter = tiny_model("llava_next")
    batch = sample_batch("llava_next", n=3)
    k = 3
    base = batch["pixel_values"][:, 0]                          # [images, 3, H, W]: each image's base crop
    q, kk, heads = _stock_qk(model, base)
    pooled = _official_topk(q, kk, heads, k, "pooled")
    with vt.apply_method(model, "damro", topk=k, topk_rule="fixed") as h:
        model(**batch)
        got = [img for sample in h.stats["outlier_indices"] for img in sample]
    counts = adapter.image_token_counts(batch)
    for i, g in enumerate(got):
        assert g[:k].tolist() == pooled[i].tolist(), i
        assert int(g[-1]) == counts[i] - 1                      # the block's last token: its final newline
        assert len(g) % k == 1


@torch.no_grad()
def test_damro_contrast_stream_is_fed_in_score_order_llava():
    """The first contrasted logits equal those of a stock LM on [text, outlier features in pooled-score order, text]
    (contiguous positions), not the spatial order."""
    model, proc, adapter = tiny_model("llava")
    batch = sample_batch("llava", n=1)
    alpha, beta, topk = 1.0, 0.0, 4
    q, k, heads = _stock_qk(model, batch["pixel_values"])
    (idx,) = _official_topk(q, k, heads, topk, "pooled")
    assert not torch.equal(idx, idx.sort().values)
    with vt.apply_method(model, "damro", alpha=alpha, beta=beta, topk=topk, topk_rule="fixed"):
        got = model(**batch).logits[:, -1]
    ids = batch["input_ids"]
    full = model(**batch).logits[:, -1]
    emb = model.get_input_embeddings()(ids)
    feats = torch.cat(model.model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output)
    vis = (ids[0] == adapter.image_token_id).nonzero().flatten()
    emb = emb.masked_scatter((ids == adapter.image_token_id)[..., None], feats)
    hidden = []
    for order in (idx, idx.sort().values):
        seq = torch.cat([torch.arange(vis[0]), vis[order], torch.arange(vis[-1] + 1, ids.shape[1])])
        hidden.append(model.model.language_model(inputs_embeds=emb[:, seq]).last_hidden_state[:, -1])
    by_score, spatial = (contrast_logits(full, model.lm_head(x), alpha, beta) for x in hidden)
    assert torch.allclose(got, by_score, atol=1e-4)
    assert not torch.allclose(got, spatial, atol=1e-4)


def test_damro_cls_score_and_order_options():
    model, _, _ = tiny_model("llava")
    for bad, match in [({"cls_score": "mean"}, "cls_score"), ({"order": "random"}, "order")]:
        with pytest.raises(ValueError, match=match):
            vt.apply_method(model, "damro", **bad)
    qwen, _, _ = tiny_model("qwen2_vl")
    with pytest.raises(ValueError, match=r"cls_score='head_mean'.*no \[CLS\] token"):
        vt.apply_method(qwen, "damro", cls_score="head_mean")


# -- DAMRO: the scaled top-k rule on grids other than 576 tokens ---------------------------------------------------
def _scaled(topk, n):
    """round half up (not Python's half-to-even), at least 1."""
    return max(1, math.floor(topk * n / 576 + 0.5))


def test_scaled_rule_gives_the_official_k_on_the_official_grids():
    cfg = DAMROConfig()
    assert cfg.outliers(576, "CLIP-L/336") == 10
    assert cfg.outliers(256, "EVA 16 x 16") == 4                # the k of the official InstructBLIP runs
    assert DAMROConfig(topk=60).outliers(24, "x") == 3          # 2.5 -> 3 (half up; round() would give 2)


@torch.no_grad()
@pytest.mark.parametrize("arch,topk", [("llava", 33), ("llava_next", 33), ("qwen2_vl", 60), ("qwen2_5_vl", 60)])
def test_scaled_topk_rule_on_tiny_grids(arch, topk):
    """Default topk_rule="scaled": per crop (LLaVA) / image (Qwen) of N tokens, max(1, round_half_up(topk N / 576))
    outliers (LLaVA-NeXT: per crop of the 8 x 8 tiny grid, plus the block's last newline)."""
    model, proc, adapter = tiny_model(arch)
    batch = sample_batch(arch, n=3, two_images=True)
    with vt.apply_method(model, "damro", topk=topk) as h:
        model(**batch)
        got = [len(img) for sample in h.stats["outlier_indices"] for img in sample]
    if arch == "llava":
        expected = [_scaled(topk, 64)] * 4                      # 33 * 64 / 576 = 3.67 -> 4 (truncation: 3)
    elif arch == "llava_next":
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        crops = [image_size_to_num_patches(image_size=s.tolist(), grid_pinpoints=model.config.image_grid_pinpoints,
                                           patch_size=model.config.vision_config.image_size)
                 for s in batch["image_sizes"]]
        expected = [c * _scaled(topk, 64) + 1 for c in crops]
    else:
        n = (batch["image_grid_thw"].prod(-1) // 4).tolist()    # [24, 28, 20, 16] merged tokens
        expected = [_scaled(topk, x) for x in n]                # 24: 2.5 -> 3 (half up), 16: 1.67 -> 2
        assert expected == [3, 3, 2, 2]
    assert got == expected


# -- VCD: the noise of the official schedule, on all four architectures ------------------------------------------
def _official_noise(x0, step, gen):
    """vcd_utils/vcd_add_noise.py: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (float64 here)."""
    betas = torch.sigmoid(torch.linspace(-6, 6, 1000, dtype=torch.float64)) * (0.5e-2 - 1e-5) + 1e-5
    abar = torch.cumprod(1 - betas, dim=0)[step]
    eps = torch.randn(x0.shape, dtype=torch.float64, generator=gen)
    return abar.sqrt() * x0.double() + (1 - abar).sqrt() * eps


def _seeded(pixels, seed):
    """The generator rule vcd documents: seeded with ``seed`` and the image's pixels (blake2b)."""
    digest = hashlib.blake2b(pixels.to(torch.float32).contiguous().numpy().tobytes(), digest_size=8,
                             key=str(seed).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def _expected_tower_input(model, arch, batch, step, seed):
    """What the vision tower must receive in the contrast stream, image by image from the processor's pixels."""
    px = batch["pixel_values"]
    if arch == "llava":
        return torch.stack([_official_noise(px[i], step, _seeded(px[i], seed)) for i in range(px.shape[0])])
    if arch == "llava_next":
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        out = []
        for i, size in enumerate(batch["image_sizes"].tolist()):
            n = image_size_to_num_patches(image_size=size, grid_pinpoints=model.config.image_grid_pinpoints,
                                          patch_size=model.config.vision_config.image_size)
            out.append(_official_noise(px[i, :n], step, _seeded(px[i, :n], seed)))
        return torch.cat(out)
    vc = model.config.vision_config
    T, p = vc.temporal_patch_size, vc.patch_size
    out, start = [], 0
    for n in batch["image_grid_thw"].prod(-1).tolist():
        rows = px[start:start + n]
        start += n
        frames = rows.view(n, 3, T, p, p)                       # each patch row: [channel, time, patch, patch]
        assert torch.equal(frames[:, :, 0], frames[:, :, 1])    # a still image: the processor repeated it in time
        still = _official_noise(frames[:, :, 0], step, _seeded(rows, seed))    # noised once, before the repeat
        out.append(still[:, :, None].expand(n, 3, T, p, p).reshape(n, -1))
    return torch.cat(out)


@torch.no_grad()
@pytest.mark.parametrize("arch", ARCHS)
def test_vcd_contrast_tower_sees_the_officially_noised_pixels(arch):
    model, proc, adapter = tiny_model(arch)
    batch = sample_batch(arch, n=3, two_images=True)
    step, seed = 500, 3
    tower = model.model.visual if arch.startswith("qwen") else model.model.vision_tower
    seen = []

    def grab(module, args, kwargs):
        seen.append((args[0] if args else kwargs.get("pixel_values", kwargs.get("hidden_states"))).clone())

    hook = tower.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with vt.apply_method(model, "vcd", noise_step=step, seed=seed):
            model.generate(**batch, max_new_tokens=1, do_sample=False)
    finally:
        hook.remove()
    assert len(seen) == 2                                       # the image, then its noised copy
    expected = _expected_tower_input(model, arch, batch, step, seed)
    assert seen[1].shape == expected.shape
    assert torch.allclose(seen[1].double(), expected, atol=1e-5)
    if arch.startswith("qwen"):
        vc = model.config.vision_config
        halves = seen[1].view(seen[1].shape[0], 3, vc.temporal_patch_size, -1)
        assert torch.equal(halves[:, :, 0], halves[:, :, 1])    # both temporal copies: the same noise


# -- processors="direct" names what it bypasses ------------------------------------------------------------------
@torch.no_grad()
@pytest.mark.parametrize("method", ["damro", "vcd"])
def test_direct_mode_names_bypassed_settings_and_their_source_once_per_handle(method):
    model, proc, adapter = tiny_model("qwen2_vl")
    batch = sample_batch("qwen2_vl", n=2)
    opts = {"processors": "direct"} | ({"topk": 3, "topk_rule": "fixed"} if method == "damro" else {})

    def sample(**kw):
        torch.manual_seed(5)
        return model.generate(**batch, max_new_tokens=4, **kw)

    with vt.apply_method(model, method, **opts):
        plain = sample(do_sample=True)                          # the contrasted distribution as it is
    old = copy.deepcopy(model.generation_config)
    try:
        model.generation_config.do_sample, model.generation_config.top_k = True, 1      # Qwen-style shipped config
        model.generation_config.temperature = 0.01
        with vt.apply_method(model, method, **opts):
            with pytest.warns(UserWarning, match=r"processors='direct'") as rec:
                out = sample()
            msg = str(rec[0].message)
            assert "temperature=0.01 (the model's generation_config)" in msg
            assert "top_k=1 (the model's generation_config)" in msg
            assert "do_sample=True (the model's generation_config)" in msg
            assert torch.equal(out, plain)                      # bypassed: sampling at T = 1, no top-k
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                assert torch.equal(sample(), plain)             # same handle: said once
            with pytest.warns(UserWarning, match=r"temperature=0.3 \(generate\(\) call\)") as rec:
                sample(temperature=0.3)                         # a call-time value: named, with its source
            assert "top_k" not in str(rec[0].message)           # (the model's top_k was said already)
            with pytest.warns(UserWarning, match=r"top_p=0.5 \(the generation_config passed to generate\(\)\)"):
                sample(generation_config=GenerationConfig(do_sample=True, top_p=0.5))
        with vt.apply_method(model, method, **opts):            # a new handle says it again
            with pytest.warns(UserWarning, match=r"top_k=1 \(the model's generation_config\)"):
                model.generate(**batch, max_new_tokens=1)
    finally:
        model.generation_config = old
    with vt.apply_method(model, method, **{**opts, "processors": "standard"}):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            sample(do_sample=True, temperature=0.3)             # standard mode applies them: nothing to say


# -- text-only prompts -----------------------------------------------------------------------------------------------
@torch.no_grad()
@pytest.mark.parametrize("arch", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("method", ["damro", "vcd"])
def test_text_only_prompt_is_left_untouched_and_mixed_batches_run(arch, method):
    model, proc, adapter = tiny_model(arch)
    text = adapter.prepare_inputs(proc, [[]], ["Is there a dog?"])
    stock = model.generate(**text, max_new_tokens=4, do_sample=False)
    # a call without any image (an image-free benchmark question): nothing to contrast, the stock greedy tokens
    # (issue 24: such records are first-class and may form a whole batch; this raised before)
    with vt.apply_method(model, method, alpha=1.0, beta=0.1) as h:
        assert torch.equal(model.generate(**text, max_new_tokens=4, do_sample=False), stock)
    # a row without an image next to one with: it contrasts with itself (l = l_full), so greedy keeps its tokens
    mixed = adapter.prepare_inputs(proc, [demo_image(0, (160, 120)), []], ["Is there a dog?", "Cat?"])
    gen = dict(max_new_tokens=4, do_sample=False)
    base = model.generate(**mixed, **gen)
    with vt.apply_method(model, method, alpha=1.0, beta=0.1) as h:
        out = model.generate(**mixed, **gen)
    assert torch.equal(out[1], base[1])
    if method == "damro":
        assert h.stats["outlier_indices"][1] == []
