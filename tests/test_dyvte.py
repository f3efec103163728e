"""Issue 14: DyVTE inference (routers or a fixed exit layer) on the four architectures, batched, KV-cached."""
import pytest
import torch

import vtoolkit as vt
from conftest import assert_same_continuation, attn_implementation, layer0_inputs, sample_batch, tiny_model
from vtoolkit.bench.flops import llm_layer_flops
from vtoolkit.compat import cache_layer_kv, output_cache
from vtoolkit.config import ConfigError
from vtoolkit.methods.dyvte import DyVTEConfig, DyVTERouters, fingerprint, router_features
from vtoolkit.models.tiny import demo_image

GEN = dict(max_new_tokens=4, do_sample=False)


def _pad_id(model, proc):
    pid = model.generation_config.pad_token_id
    return pid if pid is not None else proc.tokenizer.pad_token_id


class ScriptedRouters(DyVTERouters):
    """Test routers: sample ``b`` of a call votes "exit" at layer ``exits[b]`` (None: never), whatever the features."""

    def __init__(self, model, exits):
        fp = fingerprint(model)
        super().__init__(fp["hidden_size"], fp["num_layers"], 1, fp)
        self.exits = list(exits)
        self.seen = []

    def forward(self, layer, feats):
        assert feats.shape[0] == len(self.exits)
        self.seen.append(layer)
        ex = torch.tensor([e is not None and layer >= e for e in self.exits])
        return torch.stack([torch.zeros(len(ex)), ex.float() * 2 - 1], 1)


def always_keep(model):
    r = DyVTERouters.for_model(model, router_hidden=8)
    with torch.no_grad():
        for router in r.routers:
            router.fc2.weight.zero_()           # logits [0, 0]: "exit" needs logit[1] > logit[0]
    return r


# ----------------------------------------------------------------------------------------------- neutral settings
@torch.no_grad()
def test_always_keep_router_is_the_baseline(arch):
    model, _, _ = tiny_model(arch)
    batch = sample_batch(arch, n=3, two_images=True)
    base_logits, base = model(**batch).logits, model.generate(**batch, **GEN)
    with vt.apply_method(model, "dyvte", routers=always_keep(model)) as h:
        assert torch.equal(model(**batch).logits, base_logits)
        assert torch.equal(model.generate(**batch, **GEN), base)
        s = h.stats
        assert s["exit_layer"] == [None] * 3 and s["visual_tokens_removed"] == [0] * 3 and s["layer"] is None
        assert all(f < 0 for f in s["flops_saved"])            # the routers ran and saved nothing
    with vt.apply_method(model, "dyvte", exit_layer=-1) as h:
        assert torch.equal(model.generate(**batch, **GEN), base)
        assert h.stats["visual_tokens_removed"] == [0] * 3


# ----------------------------------------------------------------------------------------------- exit_layer=k


def _reference_logits(model, adapter, inputs, k):
    """Independent DyVTE with a fixed exit: layers 0..k on every position, layers k+1.. on the text positions only
    with their original rotary embeddings (M-RoPE included); causal attention, no cache, batch 1."""
    h, pe = layer0_inputs(model, adapter, inputs)
    keep = inputs["input_ids"][0] != adapter.image_token_id
    for i, layer in enumerate(adapter.decoder_layers):
        if i == k + 1:
            h, pe = h[:, keep], tuple(t[:, keep] for t in pe)
        h = layer(h, attention_mask=None, position_embeddings=pe, use_cache=False)
        h = h[0] if isinstance(h, tuple) else h
    return adapter.lm_head(adapter.language_model.norm(h))


@torch.no_grad()
@pytest.mark.parametrize("k", [0, 2])
def test_exit_layer_equals_an_independent_layer_by_layer_computation(arch, k):
    model, _, adapter = tiny_model(arch)
    batch = sample_batch(arch, n=1)
    L, steps = batch["input_ids"].shape[1], 3
    with vt.apply_method(model, "dyvte", exit_layer=k) as h:
        logits = model(**batch).logits
        cached = model.generate(**batch, max_new_tokens=steps, do_sample=False)
        assert h.stats["exit_layer"] == [k] and h.stats["layer"] == k + 1
    ref = _reference_logits(model, adapter, batch, k)
    assert logits.shape == ref.shape                   # the rows after the exit are the text rows only
    assert torch.allclose(logits, ref, atol=1e-5)
    seq, tokens = dict(batch), []                      # greedy, recomputed from scratch at every step
    for _ in range(steps):
        nxt = _reference_logits(model, adapter, seq, k)[:, -1].argmax(-1)
        tokens.append(int(nxt))
        seq = {**seq, "input_ids": torch.cat([seq["input_ids"], nxt[:, None]], 1),
               "attention_mask": torch.cat([seq["attention_mask"], torch.ones(1, 1, dtype=torch.long)], 1)}
        if "mm_token_type_ids" in seq:
            seq["mm_token_type_ids"] = torch.cat([seq["mm_token_type_ids"], torch.zeros(1, 1, dtype=torch.long)], 1)
    assert cached[0, L:].tolist() == tokens[: cached.shape[1] - L]


@torch.no_grad()
def test_exit_layer_cache_equals_recompute_and_batch_equals_singles(arch):
    model, proc, adapter = tiny_model(arch)
    batch = sample_batch(arch, n=3, two_images=True)
    n = batch["input_ids"].shape[1]
    # a random model may emit a placeholder token, which a no-cache recompute would then read as an image / a video
    gen = dict(GEN, suppress_tokens=[t for t in (adapter.image_token_id, adapter.video_token_id) if t is not None])
    with vt.apply_method(model, "dyvte", exit_layer=0):
        out = model.generate(**batch, **gen)
        assert torch.equal(out, model.generate(**batch, **gen, use_cache=False))
        for i in range(3):
            images = [demo_image(i, s) for s in [(160, 120), (200, 100), (120, 120)]][i]
            if i == 1:
                images = [images, demo_image(7, (100, 150))]
            q = ["Is there a dog?", "Describe this image in detail, please, with every object you see.", "Cat?"][i]
            one = adapter.prepare_inputs(proc, [images], [q])
            single = model.generate(**one, **gen)
            assert_same_continuation(out[i, n:], single[0, one["input_ids"].shape[1]:], _pad_id(model, proc),
                                     f"sample {i}")


@torch.no_grad()
def test_the_cache_after_the_exit_holds_text_only():
    model, _, adapter = tiny_model("qwen2_vl")
    batch = sample_batch("qwen2_vl", n=2)
    L = batch["input_ids"].shape[1]
    vis = (batch["input_ids"] == adapter.image_token_id).sum(1)
    text = int((batch["attention_mask"].sum(1) - vis).max())
    k = 1
    with vt.apply_method(model, "dyvte", exit_layer=k):
        out = model.generate(**batch, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                             return_dict_in_generate=True)
    cache = output_cache(out)
    lengths = [cache_layer_kv(cache, i)[0].shape[-2] for i in range(adapter.num_layers)]
    assert lengths == [L + 2] * (k + 1) + [text + 2] * (adapter.num_layers - k - 1)


# ----------------------------------------------------------------------------------------------- routers, per sample
def _single(adapter, proc, i):
    q = ["Is there a dog?", "Describe this image in detail, please, with every object you see.", "Cat?"][i]
    return adapter.prepare_inputs(proc, [demo_image(i, [(160, 120), (200, 100), (120, 120)][i])], [q])


@torch.no_grad()
@pytest.mark.parametrize("exits", [(2, 0, None), (1, 0, 2)])
def test_per_sample_exit_layers_batch_equals_singles(arch, exits):
    """Sample 1 (the longest prompt) exits first: until the others exit its visual keys are masked; with (1, 0, 2)
    every sample exits and the batch sheds the tokens from layer 3 on. Each row equals its sample run alone with
    exit_layer = its own exit, and the cache equals a recompute."""
    model, proc, adapter = tiny_model(arch)
    batch = sample_batch(arch, n=3)
    n = batch["input_ids"].shape[1]
    with vt.apply_method(model, "dyvte", routers=ScriptedRouters(model, exits)) as h:
        out = model.generate(**batch, **GEN)
        assert h.stats["exit_layer"] == list(exits)
        assert h.stats["layer"] == (None if None in exits else max(exits) + 1)
        assert torch.equal(out, model.generate(**batch, **GEN, use_cache=False))
        last = model(**batch).logits[:, -1]
    for i, e in enumerate(exits):
        one = _single(adapter, proc, i)
        if e is None:
            single, ref = model.generate(**one, **GEN), model(**one).logits[:, -1]
        else:
            with vt.apply_method(model, "dyvte", exit_layer=e):
                single, ref = model.generate(**one, **GEN), model(**one).logits[:, -1]
        assert_same_continuation(out[i, n:], single[0, one["input_ids"].shape[1]:], _pad_id(model, proc),
                                 f"sample {i}")
        assert torch.allclose(last[i], ref[0], atol=1e-4), f"sample {i}"


@torch.no_grad()
def test_masked_layers_cache_is_compacted_when_shorter():
    """Sample 1 (longest prompt) exits after layer 0, the others after layer 2: layers 1-2 mask its visual keys at
    prefill, and at the first decode step their caches are compacted (compact_kv) to the positions still attended,
    which is shorter than the prompt; layers 3+ hold text only."""
    model, proc, adapter = tiny_model("llava")
    batch = sample_batch("llava", n=3)
    L = batch["input_ids"].shape[1]
    nonpad = batch["attention_mask"].sum(1).tolist()
    vis = (batch["input_ids"] == adapter.image_token_id).sum(1).tolist()
    assert nonpad[1] == L
    with vt.apply_method(model, "dyvte", routers=ScriptedRouters(model, (2, 0, 2))) as h:
        out = model.generate(**batch, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                             return_dict_in_generate=True)
        pruner = h.methods[0].pruner
        assert sorted(pruner.masked) == [1, 2] and sorted(pruner.cache_layout) == [1, 2]
    cache = output_cache(out)
    lengths = [cache_layer_kv(cache, i)[0].shape[-2] for i in range(adapter.num_layers)]
    masked = max(nonpad[0], nonpad[1] - vis[1], nonpad[2])
    text = max(p - v for p, v in zip(nonpad, vis))
    assert masked < L
    assert lengths == [L + 2, masked + 2, masked + 2, text + 2]


@torch.no_grad()
def test_beam_search_with_per_sample_exits_equals_singles():
    model, proc, adapter = tiny_model("llava")
    batch = sample_batch("llava", n=2)
    beams = dict(max_new_tokens=3, num_beams=2, do_sample=False)
    with vt.apply_method(model, "dyvte", routers=ScriptedRouters(model, (1, 0))) as h:
        out = model.generate(**batch, **beams)
        assert h.stats["exit_layer"] == [1, 0]
    n = batch["input_ids"].shape[1]
    for i, e in enumerate((1, 0)):
        one = _single(adapter, proc, i)
        with vt.apply_method(model, "dyvte", exit_layer=e):
            single = model.generate(**one, **beams)
        assert_same_continuation(out[i, n:], single[0, one["input_ids"].shape[1]:], _pad_id(model, proc),
                                 f"sample {i}")


@torch.no_grad()
def test_eager_llm_masks_with_per_sample_exits():
    model, proc, adapter = tiny_model("llava")
    batch = sample_batch("llava", n=3)
    with attn_implementation(model.config.text_config, "eager"):
        with vt.apply_method(model, "dyvte", routers=ScriptedRouters(model, (2, 0, 1))):
            cached = model.generate(**batch, **GEN)
            assert torch.equal(cached, model.generate(**batch, **GEN, use_cache=False))
    with vt.apply_method(model, "dyvte", routers=ScriptedRouters(model, (2, 0, 1))):
        assert torch.equal(cached, model.generate(**batch, **GEN))


@torch.no_grad()
def test_router_features_and_real_routers():
    """The router input is [mean of the text after the last visual token, excluding the last prompt token; the last
    prompt token]; an empty slice gives zeros. Random routers run end to end and the calls are independent."""
    h = torch.arange(2 * 6 * 2, dtype=torch.float32).view(2, 6, 2)
    vis = torch.tensor([[0, 1, 1, 0, 0, 0], [0, 0, 0, 0, 1, 0]], dtype=torch.bool)
    f = router_features(h, vis, torch.tensor([5, 5]))
    assert torch.equal(f[0], torch.cat([h[0, 3:5].mean(0), h[0, 5]]))
    assert torch.equal(f[1], torch.cat([torch.zeros(2), h[1, 5]]))
    model, _, _ = tiny_model("llava_next")
    batch = sample_batch("llava_next", n=2)
    torch.manual_seed(0)
    with vt.apply_method(model, "dyvte", routers=DyVTERouters.for_model(model, 16)) as h:
        out = model.generate(**batch, **GEN)
        first = h.stats
        model.generate(**sample_batch("llava_next", n=1), **GEN)
        assert len(h.stats["exit_layer"]) == 1
        # without a cache the routers still decide once per call, on the prompt
        assert torch.equal(model.generate(**batch, **GEN, use_cache=False), out)
        assert {k: h.stats[k] for k in ("exit_layer", "layer")} == {k: first[k] for k in ("exit_layer", "layer")}


# ----------------------------------------------------------------------------------------------- stats, labels, errors
@torch.no_grad()
def test_stats_flops_saved_by_hand():
    model, _, adapter = tiny_model("llava")
    batch = sample_batch("llava", n=2)
    tc = model.config.text_config
    with vt.apply_method(model, "dyvte", exit_layer=1) as h:
        model(**batch)
        s = h.stats
    L = adapter.num_layers
    d, dkv, m = tc.hidden_size, adapter.num_kv_heads * adapter.head_dim, tc.intermediate_size
    for b in range(2):
        n = int(batch["attention_mask"][b].sum())
        v = 64
        assert s["flops_saved"][b] == (L - 2) * (llm_layer_flops(n, n, d, dkv, m) - llm_layer_flops(n - v, n - v, d,
                                                                                                    dkv, m))
    assert s["visual_tokens_removed"] == [64, 64] and s["visual_tokens_after"] == [0, 0]


@torch.no_grad()
def test_labels_are_realigned_with_the_text_rows():
    model, _, adapter = tiny_model("llava")
    batch = sample_batch("llava", n=1)
    labels = batch["input_ids"].masked_fill(batch["input_ids"] == adapter.image_token_id, -100)
    with vt.apply_method(model, "dyvte", exit_layer=1):
        out = model(**batch, labels=labels)
    text = labels[0][labels[0] != -100]
    ref = torch.nn.functional.cross_entropy(out.logits[0, :-1], text[1:])
    assert out.logits.shape[1] == text.numel() and torch.allclose(out.loss, ref, atol=1e-6)


def test_dyvte_errors(tmp_path):
    model, _, _ = tiny_model("llava")
    qwen, _, _ = tiny_model("qwen2_vl")
    with pytest.raises(ValueError, match="exit_layer=4 is out of range .*4-layer"):
        vt.apply_method(model, "dyvte", exit_layer=4)
    with pytest.raises(ValueError, match="exit_layer=-5 is out of range"):
        vt.apply_method(model, "dyvte", exit_layer=-5)
    with pytest.raises(ConfigError, match="'exit_layer' must be an integer or None, got float 1.5"):
        DyVTEConfig(exit_layer=1.5)
    with pytest.raises(ConfigError, match="routers must be a path"):
        DyVTEConfig(routers=3)
    with pytest.raises(ValueError, match="not both"):
        vt.apply_method(model, "dyvte", exit_layer=1, routers=always_keep(model))
    with pytest.raises(ValueError, match="needs routers=PATH .* or exit_layer=k"):
        vt.apply_method(model, "dyvte")
    with pytest.raises(FileNotFoundError, match="no routers at"):
        vt.apply_method(model, "dyvte", routers=str(tmp_path / "missing.safetensors"))
    path = always_keep(qwen).save(tmp_path / "qwen")
    with pytest.raises(ValueError, match="trained for another architecture.*model_type=qwen2_vl.*model_type=llava"):
        vt.apply_method(model, "dyvte", routers=path)
    with pytest.raises(ValueError, match="another architecture"):
        vt.apply_method(model, "dyvte", routers=always_keep(qwen))
    with pytest.raises(ValueError, match="both prune visual tokens"):
        vt.apply_method(model, [("dyvte", {"exit_layer": 1}), ("fastv", {})])
    with attn_implementation(model.config.text_config, "flash_attention_2"):
        with pytest.raises(ValueError, match="needs 'sdpa' or 'eager'"):
            vt.apply_method(model, "dyvte", exit_layer=1)
    assert vt.active_handles(model) == [] and vt.active_handles(qwen) == []


@torch.no_grad()
def test_routers_from_a_file_run_like_the_object(tmp_path):
    model, _, _ = tiny_model("qwen2_5_vl")
    batch = sample_batch("qwen2_5_vl", n=2)
    torch.manual_seed(3)
    routers = DyVTERouters.for_model(model, 16)
    path = routers.save(tmp_path)
    assert path.name == "routers.safetensors"
    with vt.apply_method(model, "dyvte", routers=routers) as h:
        a, sa = model.generate(**batch, **GEN), h.stats
    with vt.apply_method(model, "dyvte", routers=str(tmp_path)) as h:
        b, sb = model.generate(**batch, **GEN), h.stats
        assert h.config.to_dict()["routers"] == str(tmp_path)
    assert torch.equal(a, b) and sa == sb


def test_bench_counts_the_layers_after_the_exit_on_text_only(tmp_path):
    import json

    from typer.testing import CliRunner

    from vtoolkit.bench import flops as F
    from vtoolkit.bench.midsize import tiny_shape
    from vtoolkit.cli import app

    out = tmp_path / "rows.json"
    res = CliRunner().invoke(app, ["bench", "--shape", "tiny", "--method", "dyvte", "--keep-ratios", "",
                                   "--set", "exit_layer=1", "--decode-tokens", "1", "--repeats", "1", "--no-oracle",
                                   "--out", str(out)])
    assert res.exit_code in (0, 3), res.output      # 3: a timing did not measure (loaded machine); counts are checked
    base, row = json.loads(out.read_text())
    full = base["prompt_tokens"]
    assert (row["pruned_from_layer"], row["visual_tokens"], row["llm_tokens_after_pruning"]) == (2, 0, full - 64)
    shape = F.Shape.from_model(tiny_shape()[0])
    assert row["analytic_prefill_ratio"] == pytest.approx(F.prefill_ratio(shape, full, full - 64, from_layer=2))
    assert row["analytic_prefill_ratio"] < 1.0 and row["analytic_decode_ratio"] < 1.0


# ----------------------------------------------------------------------------------------------- real router features
def _expected_exits(routers, hidden_states, ids, image_token_id):
    """The official decision rule written out: after layer ``l`` (its OUTPUT, ``hidden_states[l + 1]`` of a stock
    forward), router ``l`` reads ``[mean of the tokens after the last visual token, excluding the last prompt token ;
    the last prompt token]`` and votes exit iff ``logit[1] > logit[0]`` with ``logits = W2 gelu(W1 feat)``; the earliest
    vote wins; the last layer's router is not evaluated. Left padding: the last prompt token is at ``T - 1``.
    Returns the exit layer per sample (None: never) and the smallest ``|logit[1] - logit[0]|`` evaluated."""
    B, T = ids.shape
    num_layers = len(hidden_states) - 1
    exits, margin = [], float("inf")
    for b in range(B):
        vis = (ids[b] == image_token_id).nonzero().flatten()
        text = list(range(int(vis.max()) + 1, T - 1))
        exits.append(None)
        for layer in range(num_layers - 1):
            h = hidden_states[layer + 1][b].float()
            mean = h[text].mean(0) if text else torch.zeros(h.shape[-1])
            feat = torch.cat([mean, h[T - 1]])
            r = routers.routers[layer]
            logits = torch.nn.functional.gelu(feat @ r.fc1.weight.T) @ r.fc2.weight.T
            margin = min(margin, abs(float(logits[1] - logits[0])))
            if logits[1] > logits[0]:
                exits[b] = layer
                break
    return exits, margin


@torch.no_grad()
def test_random_routers_decide_the_exit_from_the_layer_outputs(arch):
    """Seeded random routers on a left-padded batch of 3: the exit layer of each sample is predicted in the test from
    the stock hidden states (the official rule, above); the seed is the first one whose routers give the 3 samples 3
    different exits (so neither "all exit at layer 0" nor "never exit"). h.stats reports those exits, and each sample's
    last logits equal the by-hand removal of its visual tokens after its own exit layer, run alone."""
    model, proc, adapter = tiny_model(arch)
    batch = sample_batch(arch, n=3)
    ids = batch["input_ids"]
    assert (batch["attention_mask"] == 0).any()                    # padded
    hs = model(**batch, output_hidden_states=True).hidden_states
    assert len(hs) == adapter.num_layers + 1
    for seed in range(100):
        torch.manual_seed(seed)
        routers = DyVTERouters.for_model(model, router_hidden=16)
        exits, margin = _expected_exits(routers, hs, ids, adapter.image_token_id)
        if len(set(exits)) == 3 and margin > 1e-3:
            break
    else:
        pytest.fail("no seed in 0..99 gives three different exits")
    with vt.apply_method(model, "dyvte", routers=routers) as h:
        last = model(**batch).logits[:, -1]
        assert h.stats["exit_layer"] == exits, (seed, exits)
        assert h.stats["layer"] == (None if None in exits else max(exits) + 1)
    for b, e in enumerate(exits):
        ref = _reference_logits(model, adapter, _single(adapter, proc, b), adapter.num_layers if e is None else e)
        assert torch.allclose(last[b], ref[0, -1], atol=1e-4), f"sample {b} (exit {e})"
