"""Issue 19 families (Qwen3-VL, LLaVA-OneVision, InternVL): each family's visual score against an independent
reference computed here from hooked stock tensors; Qwen3-VL DeepStack under pre-LLM and mid-stack pruning against a
by-hand forward that prunes the DeepStack inputs itself; a tiny checkpoint saved with ``save_pretrained`` and loaded
back through ``vtoolkit eval --model DIR`` (the real-checkpoint code path, offline)."""
import json

import pytest
import torch
from typer.testing import CliRunner

import vtoolkit as vt
from conftest import attn_implementation, tiny_model
from vtoolkit.models.tiny import demo_image


def _kept(h):
    return h.stats["kept_indices"][0][0].tolist()


# ------------------------------------------------------------------------------------------------ visual scores
@torch.no_grad()
def test_internvl_score_is_cls_attention_mean_over_the_four_shuffled_patches():
    model, proc, adapter = tiny_model("internvl")
    batch = adapter.prepare_inputs(proc, [demo_image(1, (200, 100))], ["Is there a dog?"])
    tiles = batch["pixel_values"].shape[0]
    assert tiles == 3                                              # 2 tiles + the thumbnail
    vc = model.config.vision_config
    with attn_implementation(vc, "eager"):
        out = model.model.vision_tower(pixel_values=batch["pixel_values"], output_attentions=True)
    cls = out.attentions[-1][:, :, 0, 1:].mean(1)                 # feature layer (-1): CLS row, mean over heads
    g = int(cls.shape[1] ** 0.5)
    # HF's pixel shuffle applied to the score map itself: each token's four patch scores, then their mean
    per_token = model.model.pixel_shuffle(cls.view(tiles, g, g, 1), scale_factor=0.5).reshape(tiles, -1, 4).mean(-1)
    n = per_token.shape[1]
    want = sorted(t * n + int(j) for t in range(tiles) for j in torch.topk(per_token[t], 5).indices)
    with vt.apply_method(model, "fastervlm", keep_tokens=5) as h:     # (5: where the max of the four would differ)
        model(**batch)
    assert _kept(h) == want
    assert h.stats["visual_tokens_before"] == [tiles * n] and h.stats["visual_tokens_after"] == [5 * tiles]


@torch.no_grad()
def test_llava_onevision_score_is_received_attention_packed_by_hf():
    model, proc, adapter = tiny_model("llava_onevision")
    batch = adapter.prepare_inputs(proc, [demo_image(0, (160, 120))], ["Is there a dog?"])
    sizes = batch["image_sizes"].tolist()
    crops = batch["pixel_values"].shape[1]
    assert crops > 1                                               # base crop + tiles
    with attn_implementation(model.config.vision_config, "eager"):
        out = model.model.vision_tower(pixel_values=batch["pixel_values"][0], output_attentions=True)
    recv = out.attentions[-1].mean(1).mean(1)                      # [crops, N]: mean over heads and queries
    # HF's own unpad / newline packing applied to the score maps (newline slots marked NaN)
    packed, _ = model.model.pack_image_features([recv.double().view(crops, -1, 1)], sizes,
                                                image_newline=torch.tensor([float("nan")], dtype=torch.float64),
                                                vision_aspect_ratio=model.config.vision_aspect_ratio)
    s = packed[0].view(-1)
    newline = torch.isnan(s)
    assert newline.sum() > 0
    patch = (~newline).nonzero().flatten()
    t = int(0.3 * patch.numel() + 0.5)
    want = sorted(patch[torch.topk(s[patch], t).indices].tolist() + newline.nonzero().flatten().tolist())
    with vt.apply_method(model, "fastervlm", keep_ratio=0.3, budget_scope="global") as h:
        model(**batch)
    assert _kept(h) == want


@torch.no_grad()
def test_llava_onevision_two_images_in_one_prompt_are_pruned_per_image():
    """Several images in one prompt: HF gives each only its base crop (no tiles) and one image_newline after it;
    FasterVLM keeps round(0.3 * 16) patches of EACH image, by that image's own received attention (stock SigLIP
    attention of its crop), plus its newline; a padded batch holding that prompt gives the prompt alone's logits."""
    model, proc, adapter = tiny_model("llava_onevision")
    images = [demo_image(1, (200, 100)), demo_image(7, (100, 150))]
    two = adapter.prepare_inputs(proc, [images], ["Describe both images."])
    assert two["pixel_values"].shape[0] == 2                       # one entry per image
    with attn_implementation(model.config.vision_config, "eager"):
        out = model.model.vision_tower(pixel_values=two["pixel_values"][:, 0], output_attentions=True)
    recv = out.attentions[-1].mean(1).mean(1)                      # [images, 16]: mean over heads and queries
    n = recv.shape[1]
    k = int(0.3 * n + 0.5)
    with vt.apply_method(model, "fastervlm", keep_ratio=0.3) as h:
        got = model(**two).logits[0, -1]
        kept = [i.tolist() for i in h.stats["kept_indices"][0]]
        after = h.stats["visual_tokens_after"]
        batch = adapter.prepare_inputs(proc, [demo_image(0, (160, 120)), images], ["Cat?", "Describe both images."])
        batched = model(**batch).logits[1, -1]
    assert kept == [sorted(torch.topk(recv[i], k).indices.tolist()) + [n] for i in range(2)]   # + the newline
    assert after == [2 * (k + 1)]
    torch.testing.assert_close(batched, got, rtol=0, atol=1e-4)


def _qwen3_received(model, adapter, batch):
    """Per merged token: the mean attention its 2x2 patches receive in the last ViT block (from the stock q / k)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    last = len(adapter.vision_layers) - 1
    got = []

    def record(module, q, k, v, attention_mask, scaling=None, **kw):   # the stock post-RoPE q / k of each block
        if module is adapter.vision_attention(last):
            p = torch.softmax(q.float() @ k.float().transpose(-1, -2) * scaling, -1)   # [1, H, N, N]
            got.append(p.mean(2)[0].mean(0))                                         # mean over queries, heads
        return sdpa_attention_forward(module, q, k, v, attention_mask, scaling=scaling, **kw)

    AttentionInterface.register("vtk_test_record", record)
    with attn_implementation(model.config.vision_config, "vtk_test_record"):
        model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
    return torch.cat(got).view(-1, 4).mean(-1)                    # the 2x2 patches of one token are consecutive


@torch.no_grad()
def test_qwen3_vl_score_is_received_attention_of_the_last_vit_block():
    model, proc, adapter = tiny_model("qwen3_vl")
    batch = adapter.prepare_inputs(proc, [demo_image(0, (160, 120))], ["Is there a dog?"])
    want = sorted(torch.topk(_qwen3_received(model, adapter, batch), 5).indices.tolist())
    with vt.apply_method(model, "fastervlm", keep_tokens=5) as h:
        model(**batch)
    assert _kept(h) == want


@torch.no_grad()
@pytest.mark.parametrize("arch", ["llava_onevision", "internvl"])
def test_vcd_contrast_is_the_stock_model_on_the_noised_image(arch):
    """The contrast stream is what the stock model gives for the noised image (InternVL: HF returns features per
    tile, the contrast needs them per image)."""
    model, proc, adapter = tiny_model(arch)
    batch = adapter.prepare_inputs(proc, [demo_image(1, (200, 100))], ["Is there a dog?"])
    base = model(**batch).logits[0, -1]
    with vt.apply_method(model, "vcd", alpha=1.0, beta=0.0) as h:
        got = model(**batch).logits[0, -1]
        noised = h.methods[0].noised_pixels(batch)
    neg = model(**{**batch, "pixel_values": noised}).logits[0, -1]
    torch.testing.assert_close(got, 2 * base - neg, rtol=0, atol=1e-4)


# ------------------------------------------------------------------------------------------------ DeepStack
def _qwen3_parts(model, adapter, batch):
    """Merged embeddings, the DeepStack tensors, the visual mask and the M-RoPE positions of a stock forward."""
    ids = batch["input_ids"]
    img = ids == adapter.image_token_id
    out = model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"], return_dict=True)
    emb = model.get_input_embeddings()(ids).masked_scatter(img[..., None], torch.cat(out.pooler_output))
    deep = [torch.cat(f) if isinstance(f, (list, tuple)) else f for f in out.deepstack_features]
    pos, _ = adapter.rope_index(batch, batch["attention_mask"])
    return emb, deep, img, pos


@torch.no_grad()
def test_qwen3_vl_pre_llm_pruning_drops_the_same_rows_from_every_deepstack_tensor():
    model, proc, adapter = tiny_model("qwen3_vl")
    assert adapter.num_deepstack == 2
    batch = adapter.prepare_inputs(proc, [demo_image(0, (160, 120))], ["Is there a dog?"])
    with vt.apply_method(model, "random", keep_tokens=6, seed=1) as h:
        got = model(**batch).logits[0, -1]
    kept = torch.tensor(_kept(h))
    emb, deep, img, pos = _qwen3_parts(model, adapter, batch)
    keep = ~img[0]
    keep[img[0].nonzero().flatten()[kept]] = True
    lm = adapter.language_model

    def ref(deepstack):
        hidden = lm(inputs_embeds=emb[:, keep], position_ids=pos[:, :, keep], attention_mask=torch.ones_like(
            img[:, keep], dtype=torch.long), visual_pos_masks=img[:, keep], deepstack_visual_embeds=deepstack)
        return model.lm_head(hidden.last_hidden_state)[0, -1]

    torch.testing.assert_close(got, ref([d[kept] for d in deep]), rtol=0, atol=1e-5)
    assert (got - ref(None)).abs().max() > 1e-3                    # DeepStack matters: leaving it out is visible


@torch.no_grad()
def test_qwen3_vl_midstack_pruning_before_the_last_deepstack_layer_drops_the_rows_there_too():
    model, proc, adapter = tiny_model("qwen3_vl")
    batch = adapter.prepare_inputs(proc, [demo_image(0, (160, 120))], ["Is there a dog?"])
    K = 1                                                          # DeepStack feeds layers 0 and 1
    with vt.apply_method(model, "fastv", K=K, keep_ratio=0.5) as h:
        got = model(**batch).logits[0, -1]
    kept = torch.tensor(_kept(h))
    emb, deep, img, pos = _qwen3_parts(model, adapter, batch)
    lm = adapter.language_model
    cos, sin = lm.rotary_emb(emb, pos)

    def causal(n):
        return torch.full((n, n), float("-inf")).triu(1)[None, None]

    hidden, vis, rows = emb, img, torch.arange(int(img.sum()))
    keep = torch.ones(emb.shape[1], dtype=torch.bool)
    for i, layer in enumerate(adapter.decoder_layers):
        if i == K:                                                 # FastV: drop the unkept visual rows here
            keep = ~img[0]
            keep[img[0].nonzero().flatten()[kept]] = True
            hidden, vis, rows = hidden[:, keep], img[:, keep], kept
        n = hidden.shape[1]
        hidden = layer(hidden, attention_mask=causal(n), position_embeddings=(cos[:, keep], sin[:, keep]),
                       position_ids=pos[0][:, keep])
        if i < len(deep):                                          # DeepStack of layer i, at the rows still there
            hidden = hidden.clone()
            hidden[vis] = hidden[vis] + deep[i][rows]
    want = model.lm_head(lm.norm(hidden))[0, -1]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@torch.no_grad()
def test_qwen3_vl_vcd_contrast_is_the_stock_model_on_the_noised_image_with_its_deepstack():
    """VCD's contrast rows get the noised image's DeepStack features: the contrast equals the stock model fed the
    noised pixels, both when the two streams are prefilled as one batch (main DeepStack inputs widened) and when the
    contrast is prefilled on its own beside a rewritten main stream (a co-applied pruner keeping everything)."""
    from vtoolkit.hooks.sequence import force_rewrite

    model, proc, adapter = tiny_model("qwen3_vl")
    batch = adapter.prepare_inputs(proc, [demo_image(1, (200, 100))], ["Is there a dog?"])
    base = model(**batch).logits[0, -1]
    with vt.apply_method(model, "vcd", alpha=1.0, beta=0.0) as h:
        got = model(**batch).logits[0, -1]
        noised = h.methods[0].noised_pixels(batch)
    with force_rewrite(), vt.apply_method(model, [("fastervlm", {"keep_ratio": 1.0}),
                                                  ("vcd", {"alpha": 1.0, "beta": 0.0})]):
        got_nested = model(**batch).logits[0, -1]
    neg = model(**{**batch, "pixel_values": noised}).logits[0, -1]
    torch.testing.assert_close(got, 2 * base - neg, rtol=0, atol=1e-4)
    torch.testing.assert_close(got_nested, 2 * base - neg, rtol=0, atol=1e-4)
    # the noised image WITHOUT its DeepStack features (the refused state before) gives another contrast
    emb, deep, img, pos = _qwen3_parts(model, adapter, {**batch, "pixel_values": noised})
    lm = adapter.language_model
    no_deep = model.lm_head(lm(inputs_embeds=emb, position_ids=pos, attention_mask=batch["attention_mask"])
                            .last_hidden_state)[0, -1]
    assert (got - (2 * base - no_deep)).abs().max() > 1e-3


@torch.no_grad()
def test_qwen3_vl_damro_contrast_rows_carry_the_outliers_own_deepstack_rows():
    """DAMRO's contrast prompt holds only the outlier visual tokens, fed in score order at their own M-RoPE
    positions; each brings its own row of every DeepStack tensor. Reference: the stock language model on that prompt
    built by hand (merged embeddings, positions, ``visual_pos_masks`` and DeepStack tensors gathered with the
    outlier indices); the outliers themselves are the top-k of the received attention in the last ViT block."""
    model, proc, adapter = tiny_model("qwen3_vl")
    batch = adapter.prepare_inputs(proc, [demo_image(0, (160, 120))], ["Is there a dog?"])
    base = model(**batch).logits[0, -1]
    with vt.apply_method(model, "damro", alpha=1.0, beta=0.0, topk=4, topk_rule="fixed") as h:
        got = model(**batch).logits[0, -1]
    outliers = h.stats["outlier_indices"][0][0]
    assert outliers.tolist() == torch.topk(_qwen3_received(model, adapter, batch), 4).indices.tolist()
    emb, deep, img, pos = _qwen3_parts(model, adapter, batch)
    vis_cols = img[0].nonzero().flatten()
    keep = ~img[0]
    keep[vis_cols[outliers]] = True
    cols = keep.nonzero().flatten()
    cols[img[0][cols]] = vis_cols[outliers]                        # the visual slots, refilled in score order
    lm = adapter.language_model

    def contrast(deepstack):
        hidden = lm(inputs_embeds=emb[:, cols], position_ids=pos[:, :, cols], attention_mask=torch.ones_like(
            cols[None]), visual_pos_masks=img[:, cols], deepstack_visual_embeds=deepstack)
        return model.lm_head(hidden.last_hidden_state)[0, -1]

    torch.testing.assert_close(got, 2 * base - contrast([d[outliers] for d in deep]), rtol=0, atol=1e-4)
    assert (got - (2 * base - contrast(None))).abs().max() > 1e-3   # without DeepStack: another contrast
    assert (got - (2 * base - contrast([d[outliers.sort().values] for d in deep]))).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize("arch", ["qwen3_vl", "llava_onevision", "internvl"])
def test_saved_tiny_checkpoint_runs_through_vtoolkit_eval(tmp_path, arch):
    pytest.importorskip("torchvision")                             # the stock processors' video processor needs it
    from vtoolkit.cli import app
    from vtoolkit.eval import demo_data as dd
    from vtoolkit.eval.runner import read_predictions

    ckpt = tmp_path / "ckpt"
    vt.models.tiny.save_checkpoint(arch, ckpt)
    assert json.loads((ckpt / "config.json").read_text())["model_type"] == arch
    pope = dd.make_pope_json(tmp_path / "data" / "pope", n_images=1)
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["eval", "--model", str(ckpt), "--method", "fastervlm", "--set", "keep_ratio=0.5",
                                   "--data", str(pope), "--out", str(out), "--limit", "2", "--set",
                                   "pope.max_new_tokens=2", "--no-progress"])
    assert res.exit_code == 0, res.output
    rows = read_predictions(out / "predictions" / "pope.jsonl")
    assert len(rows) == 2 and all(not r.get("error") for r in rows), rows
