"""Issue 21: DART (duplication-aware in-LLM pruning) against an independent reference of the official rule.

The reference below is written from the released code (``get_retained_image_token``): rankings from stock tensors of
a baseline run (the stock cache's post-RoPE keys of layer K-1, ``output_hidden_states[K]`` through the LLM's final
norm), then a re-run with slicing pre-hooks on the stock decoder layers. The tiny models' norm weights are 1.0 in
``tiny.build``; here they are randomised, so a wrong norm (input_layernorm of layer K, no norm) changes the answer.
"""
import math

import pytest
import torch

import vtoolkit as vt
from conftest import assert_same_continuation, attn_implementation, sample_batch, tiny_model
from vtoolkit.models.tiny import demo_image
from vtoolkit_core.selection import dart_per_pivot

GEN = dict(max_new_tokens=3, do_sample=False)
_RANDOM_NORM = {}


def random_norm_model(arch):
    """A tiny model of ``arch`` whose LLM norm weights (input / post-attention norms of every layer, the final norm)
    are random instead of 1.0 (built once per test session)."""
    if arch not in _RANDOM_NORM:
        model, proc = vt.models.tiny.build(arch, seed=0)
        adapter = vt.models.get_adapter(model)
        gen = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for name, p in adapter.language_model.named_parameters():
                if "norm" in name:
                    p.copy_(torch.rand(p.shape, generator=gen) * 1.5 + 0.25)
        _RANDOM_NORM[arch] = (model, proc, adapter)
    return _RANDOM_NORM[arch]


def official_keep(keys, hidden, start, n, per, p_img, p_txt):
    """The released rule for one unpadded sequence (absolute positions): ``keys [H, L, d]`` post-RoPE of layer K-1,
    ``hidden [L, D]`` its output through the final norm; the image at ``[start, start + n)``."""
    flat = keys.permute(1, 0, 2).reshape(keys.shape[1], -1)
    img_norm = torch.norm(flat[start:start + n], p=1, dim=-1)
    txt_norm = torch.norm(flat[start + n:], p=1, dim=-1)
    image_indices = (img_norm.topk(p_img).indices + start).tolist()
    query_indices = (txt_norm.topk(p_txt).indices + start + n).tolist()
    indices_set = set(image_indices + query_indices)
    valid = set(range(start, start + n)) - set(image_indices)
    valid_list = list(valid)
    for item in list(indices_set):
        cos = -torch.nn.functional.cosine_similarity(hidden[item], hidden[valid_list], dim=-1)
        top = [valid_list[i] for i in cos.topk(per).indices]
        indices_set.update(top)
        valid.difference_update(top)
        valid_list = list(valid)
    indices_set.difference_update(query_indices)
    return sorted(indices_set), image_indices, query_indices


def reference_run(model, adapter, one, K, keep):
    """generate(max_new_tokens=2) with pre-hooks on the stock decoder layers that keep only ``keep`` (absolute
    positions) from layer K on, original positions; batch of one, no padding (causal masks = None)."""
    L = one["input_ids"].shape[1]
    idx = torch.as_tensor(keep)
    state = {}

    def hook(i):
        def pre(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            kwargs = dict(kwargs, attention_mask=None)
            if hidden.shape[1] == L:                  # prefill at layer K: slice the rows
                hidden = hidden[:, idx]
            if hidden.shape[1] == idx.numel() and kwargs.get("position_embeddings") is not None \
                    and kwargs["position_embeddings"][0].shape[-2] == L:
                kwargs["position_embeddings"] = tuple(t[..., idx, :] for t in kwargs["position_embeddings"])
                pos = kwargs.get("position_ids")
                if pos is not None and pos.shape[-1] == L:
                    kwargs["position_ids"] = pos[..., idx]
            state[i] = True
            return (hidden, *args[1:]) if args else (), (kwargs if args else dict(kwargs, hidden_states=hidden))
        return pre

    handles = [adapter.decoder_layers[i].register_forward_pre_hook(hook(i), with_kwargs=True)
               for i in range(K, adapter.num_layers)]
    try:
        out = model.generate(**one, max_new_tokens=2, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    finally:
        for h in handles:
            h.remove()
    return out


@torch.no_grad()
@pytest.mark.parametrize("arch", ["llava", "qwen2_vl"])
def test_equals_official_reference(arch):
    model, proc, adapter = random_norm_model(arch)
    K, p_img, p_txt, keep_ratio = 2, 4, 4, 0.45
    for i, (size, q) in enumerate([((160, 120), "Is there a dog in the picture?"), ((120, 160), "Cat?")]):
        one = adapter.prepare_inputs(proc, [demo_image(i, size)], [q])
        ids = one["input_ids"][0]
        vis = (ids == adapter.image_token_id).nonzero().flatten()
        start, n = int(vis[0]), vis.numel()
        assert torch.equal(vis, torch.arange(start, start + n))
        base = model(**one, use_cache=True, output_hidden_states=True)
        keys = base.past_key_values.layers[K - 1].keys[0]               # stock cache: post-RoPE keys
        hidden = adapter.language_model.norm(base.hidden_states[K])[0]  # layer K-1's output, final norm
        per = math.floor(n * keep_ratio // (p_img + p_txt))
        keep_img, img_piv, txt_piv = official_keep(keys, hidden, start, n, per, p_img, p_txt)
        keep = list(range(start)) + keep_img + list(range(start + n, ids.numel()))
        ref = reference_run(model, adapter, one, K, keep)

        with vt.apply_method(model, "dart", K=K, keep_ratio=keep_ratio) as h:
            got = model.generate(**one, max_new_tokens=2, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
            s = h.stats
            assert s["layer"] == K and s["per_pivot"] == [[per]]
            assert s["kept_indices"][0][0].tolist() == [k - start for k in keep_img]
            assert s["pivots"][0] == {"image": [[p - start for p in img_piv]], "text": [[p - start - n
                                                                                           for p in txt_piv]]}
            assert s["visual_tokens_before"] == [n] and s["visual_tokens_after"] == [p_img + (p_img + p_txt) * per]
            pre = model(**one).logits
        for step in range(2):                                            # prefill's last row, first decode step
            torch.testing.assert_close(got.logits[step], ref.logits[step], rtol=1e-5, atol=1e-5)
        assert torch.equal(got.sequences, ref.sequences)
        ref_pre = _reference_prefill(model, adapter, one, K, keep)
        assert pre.shape == ref_pre.shape
        torch.testing.assert_close(pre, ref_pre, rtol=1e-5, atol=1e-5)
        # the official set order matters: ascending pivot order picks other tokens here (LLaVA: 64 tokens, 2 per pivot)
        if arch == "llava" and i == 0:
            assert keep_img != _ascending_variant(keys, hidden, start, n, per, p_img, p_txt)


def _reference_prefill(model, adapter, one, K, keep):
    out = {}
    L = one["input_ids"].shape[1]
    idx = torch.as_tensor(keep)

    def pre(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        kwargs = dict(kwargs, attention_mask=None)
        if hidden.shape[1] == L:
            hidden = hidden[:, idx]
        kwargs["position_embeddings"] = tuple(t[..., idx, :] if t.shape[-2] == L else t
                                              for t in kwargs["position_embeddings"])
        pos = kwargs.get("position_ids")
        if pos is not None and pos.shape[-1] == L:
            kwargs["position_ids"] = pos[..., idx]
        return (hidden, *args[1:]) if args else (), (kwargs if args else dict(kwargs, hidden_states=hidden))

    handles = [adapter.decoder_layers[i].register_forward_pre_hook(pre, with_kwargs=True)
               for i in range(K, adapter.num_layers)]
    try:
        out = model(**one, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()
    return out


def _ascending_variant(keys, hidden, start, n, per, p_img, p_txt):
    flat = keys.permute(1, 0, 2).reshape(keys.shape[1], -1)
    img = (torch.norm(flat[start:start + n], p=1, dim=-1).topk(p_img).indices + start).tolist()
    txt = (torch.norm(flat[start + n:], p=1, dim=-1).topk(p_txt).indices + start + n).tolist()
    pool, kept = [p for p in range(start, start + n) if p not in img], set(img)
    for item in sorted(img + txt):
        cos = -torch.nn.functional.cosine_similarity(hidden[item], hidden[pool], dim=-1)
        top = [pool[i] for i in cos.topk(per).indices]
        kept.update(top)
        pool = [p for p in pool if p not in top]
    return sorted(kept)


@torch.no_grad()
def test_batch_cache_and_neutral_on_random_norms():
    """Left-padded batch (one row with two images) == each prompt alone through generate (tokens, kept indices,
    pivots); generate(use_cache=False) == the cached run; keep_ratio=1.0 == the baseline."""
    model, proc, adapter = random_norm_model("llava")
    images = [demo_image(0), [demo_image(1, (200, 100)), demo_image(7, (100, 150))], demo_image(2, (120, 120))]
    qs = ["Is there a dog?", "Describe both images in detail, please, with every object you see.", "Cat?"]
    batch = adapter.prepare_inputs(proc, images, qs)
    n = batch["input_ids"].shape[1]
    base = model.generate(**batch, **GEN)
    with vt.apply_method(model, "dart", keep_ratio=1.0):
        assert torch.equal(model.generate(**batch, **GEN), base)
    with vt.apply_method(model, "dart", keep_tokens=24) as h:
        out = model.generate(**batch, **GEN)
        stats = h.stats
        assert stats["visual_tokens_after"] == [28, 56, 28]          # 4 + 8 * (24 // 8) per image
        assert torch.equal(model.generate(**batch, **GEN, use_cache=False), out)
        assert _lists(h.stats["kept_indices"]) == _lists(stats["kept_indices"])
        for i in range(3):
            one = adapter.prepare_inputs(proc, [images[i]], [qs[i]])
            single = model.generate(**one, **GEN)
            assert_same_continuation(out[i, n:], single[0, one["input_ids"].shape[1]:], proc.tokenizer.pad_token_id,
                                     f"sample {i}")
            assert _lists(h.stats["kept_indices"])[0] == _lists(stats["kept_indices"])[i]
            assert h.stats["pivots"][0] == stats["pivots"][i]
    assert not torch.equal(out, base)


def _lists(kept):
    return [[t.tolist() for t in row] for row in kept]


def test_budget_rule_matches_official_counts():
    assert dart_per_pivot(576, 8, keep_tokens=128, image_pivots=4) == 16      # -> 4 + 128 = 132 kept
    assert dart_per_pivot(576, 8, keep_tokens=64, image_pivots=4) == 8        # -> 68
    assert dart_per_pivot(576, 8, keep_tokens=192, image_pivots=4) == 24      # -> 196
    assert dart_per_pivot(576, 8, keep_ratio=0.222) == 15                     # -> 124, not 16
    assert dart_per_pivot(576, 8, keep_ratio=1 - 0.778) == 15
    assert dart_per_pivot(2000, 8, keep_tokens=320, image_pivots=4) == 40     # NeXT's 320 -> 324
    assert dart_per_pivot(576, 8, keep_ratio=1.0) is None
    cfg = vt.get_method("dart").config_cls(ratio=0.778)
    assert cfg.keep_ratio == pytest.approx(0.222) and cfg.ratio is None


def test_errors_and_composition():
    model, _, _ = tiny_model("llava")
    cls = vt.get_method("dart").config_cls
    for bad, match in [({"K": 0}, "K must be"), ({"keep_ratio": 0.2, "ratio": 0.5}, "not several"),
                       ({"keep_tokens": 8, "ratio": 0.5}, "not several"), ({"keep_tokens": 8, "keep_ratio": 0.5},
                                                                          "not both"),
                       ({"ratio": 1.0}, "ratio"), ({"keep_ratio": 1.5}, "keep_ratio"),
                       ({"image_pivots": 0, "text_pivots": 0}, "image_pivots \\+ text_pivots"),
                       ({"text_pivots": -1}, "text_pivots")]:
        with pytest.raises(ValueError, match=match):
            cls(**bad)
    with pytest.raises(ValueError, match="K=4 must be < the 4 LLM layers"):
        vt.apply_method(model, "dart", K=4)
    batch = sample_batch("llava", n=2)
    for opts, match in [({"keep_tokens": 65}, "keep_tokens=65 exceeds the 64 visual tokens"),
                        ({"image_pivots": 65}, "image_pivots=65 exceeds")]:
        with vt.apply_method(model, "dart", **opts):
            with pytest.raises(ValueError, match=match):
                model(**batch)
        spans = vt.models.get_adapter(model).image_spans(batch)
        with pytest.raises(ValueError, match=match):
            cls(**opts).check_model(vt.models.get_adapter(model), spans)
    with pytest.raises(ValueError, match="both prune visual tokens"):
        vt.apply_method(model, [("fastervlm", {"keep_tokens": 16}), "dart"])
    with pytest.raises(ValueError, match="cannot be composed"):
        vt.apply_method(model, ["dart", "vcd"])
    assert vt.active_handles(model) == []


@torch.no_grad()
def test_composes_with_var_and_lists_flash():
    model, _, _ = tiny_model("llava")
    batch = sample_batch("llava", n=2)
    with vt.apply_method(model, ["dart", ("var", {"sink_dims": list(range(8)), "tau": 2.5})]) as h:
        model.generate(**batch, **GEN)
        assert h.stats["dart"]["visual_tokens_after"] == [12, 12] and h.stats["var"]   # 4 + 8 * (64 * 0.222 // 8)
    row = next(r for r in vt.list_methods() if r["name"] == "dart")
    assert "flash" in " ".join(row["requires"]) and row["stage"] == "llm"


def _flash_emulation():
    """A CPU stand-in for flash attention with its mask contract: 2-D padding mask [B, Lk] (True = real key) or None,
    causal with the queries at the end; computed with SDPA. Registered under a name with 'flash' in it."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import flash_attention_mask

    def attn(module, q, k, v, mask, scaling=None, dropout=0.0, **kw):
        assert mask is None or mask.dim() == 2, "flash takes a 2-D padding mask"
        n_rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(n_rep, 1), v.repeat_interleave(n_rep, 1)
        Lq, Lk = q.shape[2], k.shape[2]
        allowed = torch.ones(Lq, Lk, dtype=torch.bool).tril(Lk - Lq)[None].expand(q.shape[0], -1, -1)
        if mask is not None:
            allowed = allowed & mask.bool()[:, None, :]
            allowed = allowed | ~allowed.any(-1, keepdim=True)          # pad queries: anything (ignored)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None], scale=scaling)
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register("flash_emulated", attn)
    AttentionMaskInterface.register("flash_emulated", flash_attention_mask)
    return "flash_emulated"


@torch.no_grad()
def test_flash_mask_contract():
    """On flash attention (emulated on the CPU with flash's 2-D mask contract) DART gives the SDPA run's tokens."""
    model, _, _ = tiny_model("llava")
    batch = sample_batch("llava", n=3)
    with vt.apply_method(model, "dart", keep_ratio=0.3) as h:
        sdpa = model.generate(**batch, **GEN)
        kept = h.stats["kept_indices"]
    name = _flash_emulation()
    with attn_implementation(model.config.text_config, name):
        with vt.apply_method(model, "dart", keep_ratio=0.3) as h:
            flash = model.generate(**batch, **GEN)
            assert _lists(h.stats["kept_indices"]) == _lists(kept)
    assert torch.equal(flash, sdpa)


@torch.no_grad()
def test_bench_oracle_computes_what_dart_computes():
    """``vtoolkit bench``'s oracle row for dart (stock layers, the first K on the full sequence, then the kept rows at
    their original positions) gives DART's prefill logits."""
    from vtoolkit.bench import midsize
    from vtoolkit.bench import oracle as O
    from vtoolkit.bench.run import make_batch

    model, proc = midsize.tiny_shape()
    batch = make_batch(model, proc, 2)
    with vt.apply_method(model, "dart", keep_tokens=16) as h:
        want = model(**batch).logits[:, -1]
        stats = h.stats
    assert stats["visual_tokens_after"] == [4 + 16, 4 + 16]
    gen, decodes = O.build(model, batch, "dart", stats)
    assert not decodes
    keep_idx = torch.stack(O.kept_positions(model, batch, stats))
    got = O.midstack_forward(model, O.merged_embeds(model, batch), stats["layer"], keep_idx)[:, -1]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    gen(1)


@torch.no_grad()
def test_qwen3_vl_removal_before_the_last_deepstack_layer():
    """K=1 on Qwen3-VL (DeepStack features added after layers 0 and 1): the kept rows get their own features after
    the removal; padded batch == singles, cache == recompute."""
    model, proc, adapter = tiny_model("qwen3_vl")
    assert adapter.num_deepstack == 2
    sizes = [(160, 120), (200, 100), (120, 120)]
    qs = ["Is there a dog?", "Describe this image in detail, please, with every object you see.", "Cat?"]
    batch = adapter.prepare_inputs(proc, [demo_image(i, s) for i, s in enumerate(sizes)], qs)
    n = batch["input_ids"].shape[1]
    with vt.apply_method(model, "dart", K=1, keep_ratio=0.5, image_pivots=2, text_pivots=2) as h:
        out = model.generate(**batch, **GEN)
        assert all(a < b for a, b in zip(h.stats["visual_tokens_after"], h.stats["visual_tokens_before"]))
        assert torch.equal(model.generate(**batch, **GEN, use_cache=False), out)
        for i in range(3):
            one = adapter.prepare_inputs(proc, [demo_image(i, sizes[i])], [qs[i]])
            single = model.generate(**one, **GEN)
            assert_same_continuation(out[i, n:], single[0, one["input_ids"].shape[1]:], proc.tokenizer.pad_token_id,
                                     f"sample {i}")
