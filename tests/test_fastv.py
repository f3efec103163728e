"""Issue 3: FastV (mid-stack pruning after layer K) through stock generate, batched, KV-cached."""
import pytest
import torch

import vtoolkit as vt
import vtoolkit.methods.fastv as fastv_mod
from conftest import assert_same_continuation, attn_implementation, sample_batch, tiny_model
from vtoolkit.hooks import count_hooks

GEN = dict(max_new_tokens=4, do_sample=False)


@torch.no_grad()
def test_ratio_zero_is_baseline(arch):
    model, _, _ = tiny_model(arch)
    batch = sample_batch(arch, n=3, two_images=True)
    base_logits, base = model(**batch).logits, model.generate(**batch, **GEN)
    before = count_hooks(model)
    with vt.apply_method(model, "fastv", ratio=0.0):
        assert torch.equal(model(**batch).logits, base_logits)
        assert torch.equal(model.generate(**batch, **GEN), base)
    assert count_hooks(model) == before
    assert model.config.get_text_config()._attn_implementation == "sdpa"


@torch.no_grad()
def test_kv_cache_equals_recompute_with_static_selection(arch, monkeypatch):
    """With a query-independent score, a no-cache recompute re-prunes the same tokens at every step, so it must equal
    the cached run: this checks the per-layer cache lengths and the masks of layers >= K at decode."""

    def positional(query, key, mask, scaling):
        n = key.shape[2]
        return ((torch.arange(n) % 3 == 0).float() + torch.arange(n) * 1e-6).expand(query.shape[0], n)

    monkeypatch.setattr(fastv_mod, "last_query_scores", positional)
    model, _, _ = tiny_model(arch)
    batch = sample_batch(arch, n=3)
    with vt.apply_method(model, "fastv", K=2, ratio=0.6) as h:
        cached = model.generate(**batch, **GEN)
        assert all(a < b for a, b in zip(h.stats["visual_tokens_after"], h.stats["visual_tokens_before"]))
        assert torch.equal(cached, model.generate(**batch, **GEN, use_cache=False))


@torch.no_grad()
def test_batch_equals_singles(arch):
    model, proc, adapter = tiny_model(arch)
    from vtoolkit.models.tiny import demo_image

    images = [demo_image(i, s) for i, s in enumerate([(160, 120), (200, 100), (120, 120)])]
    qs = ["Is there a dog?", "Describe this image in detail, please, with every object you see.", "Cat?"]
    batch = adapter.prepare_inputs(proc, images, qs)
    with vt.apply_method(model, "fastv") as h:
        out = model.generate(**batch, **GEN)[:, batch["input_ids"].shape[1]:]
        kept = h.stats["kept_indices"]
        for i in range(3):
            one = adapter.prepare_inputs(proc, [images[i]], [qs[i]])
            single = model.generate(**one, **GEN)[:, one["input_ids"].shape[1]:]
            assert_same_continuation(out[i], single[0], proc.tokenizer.pad_token_id, f"sample {i}")
            assert torch.equal(h.stats["kept_indices"][0][0], kept[i][0])


@torch.no_grad()
def test_scores_equal_eager_last_row_attention():
    model, _, adapter = tiny_model("llava")
    batch = sample_batch("llava", n=3)
    K, ratio = 2, 0.75
    with vt.apply_method(model, "fastv", K=K, ratio=ratio) as h:
        model(**batch)
        kept = h.stats["kept_indices"]
    tc = model.config.text_config
    tc._attn_implementation = "eager"
    try:
        att = model(**batch, output_attentions=True).attentions[K - 1]
    finally:
        tc._attn_implementation = "sdpa"
    row = att[:, :, -1, :].mean(1)
    for b, sample in enumerate(adapter.image_spans(batch)):
        s = row[b, sample[0].positions]
        t = round((1 - ratio) * s.numel())
        assert torch.equal(kept[b][0], torch.topk(s, t).indices.sort().values)


def test_fastv_errors():
    model, _, _ = tiny_model("llava")
    with pytest.raises(ValueError, match="ratio"):
        vt.apply_method(model, "fastv", ratio=1.0)
    with pytest.raises(ValueError, match="K=9"):
        vt.apply_method(model, "fastv", K=9)
    with pytest.raises(ValueError, match="appears twice"):
        vt.apply_method(model, ["fastv", "none", ("fastv", {})])
    with pytest.raises(ValueError, match="both prune visual tokens"):
        vt.apply_method(model, [("fastervlm", {"keep_tokens": 16}), ("fastv", {"ratio": 0.5})])
    with vt.apply_method(model, "random"):
        with pytest.raises(ValueError, match="both prune visual tokens"):
            vt.apply_method(model, "fastv")
    with attn_implementation(model.config.text_config, "flash_attention_2"):
        with pytest.raises(ValueError, match="needs 'sdpa' or 'eager'"):
            vt.apply_method(model, "fastv")
    assert vt.active_handles(model) == []


@torch.no_grad()
def test_compose_with_identity():
    model, _, _ = tiny_model("llava")
    batch = sample_batch("llava", n=2)
    with vt.apply_method(model, [("fastv", {"ratio": 0.5}), "none"]) as h:
        model.generate(**batch, **GEN)
        assert h.stats["fastv"]["visual_tokens_after"] == [32, 32]
        assert h.stats["none"]["visual_tokens_before"] == [64, 64]


@torch.no_grad()
def test_eager_llm_masks(monkeypatch):
    """Layers >= K get additive float masks when the LLM runs eager attention."""

    def positional(query, key, mask, scaling):
        n = key.shape[2]
        return ((torch.arange(n) % 2 == 0).float() + torch.arange(n) * 1e-6).expand(query.shape[0], n)

    monkeypatch.setattr(fastv_mod, "last_query_scores", positional)
    model, _, _ = tiny_model("llava")
    batch = sample_batch("llava", n=3)
    tc = model.config.text_config
    tc._attn_implementation = "eager"
    try:
        with vt.apply_method(model, "fastv", K=1, ratio=0.5):
            cached = model.generate(**batch, **GEN)
            assert torch.equal(cached, model.generate(**batch, **GEN, use_cache=False))
        assert tc._attn_implementation == "eager"
    finally:
        tc._attn_implementation = "sdpa"
