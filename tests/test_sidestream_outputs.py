"""Issue 17, item 2: a side stream's rows never reach what the user gets back.

DAMRO and VCD decode main + contrast rows as one batch of 2B rows (one joined KV cache); VHR runs its text-only rows
through the decoder layers in lockstep with the prompt's. Every field ``generate(return_dict_in_generate=True)``
returns (sequences, scores, logits, hidden states, attentions, the cache) and every field of a plain forward must
have the user's rows (times num_beams), as stock transformers gives them; the tokens stay what they were.

Attentions: all three methods accept eager attention (their side streams build masks for it), so every test
requests ``output_attentions`` under eager attention in the LLM.
"""
import pytest
import torch

import vtoolkit as vt
from conftest import ARCHS, attn_implementation, sample_batch, tiny_model
from vtoolkit import compat

ACTIVE = {"damro": {"alpha": 1.0, "beta": 0.1, "topk": 3, "topk_rule": "fixed"},
          "vcd": {"alpha": 1.0, "beta": 0.1},
          "vhr": {"alpha": 2.5}}
# DAMRO's default processors="direct" neutralises generate's processors; "standard" leaves them as stock has them
NEUTRAL = {"damro": {"alpha": 0.0, "beta": 0.0, "topk": 3, "topk_rule": "fixed", "processors": "standard"},
           "vcd": {"alpha": 0.0, "beta": 0.0},
           "vhr": {"alpha": 1.0}}
MODES = {"greedy": {"do_sample": False}, "sample": {"do_sample": True}, "beams": {"num_beams": 2, "do_sample": False}}
# min_new_tokens: no early EOS, so every run has the same number of steps as the stock one it is compared with
ALL = dict(max_new_tokens=3, min_new_tokens=3, return_dict_in_generate=True, output_scores=True, output_logits=True,
           output_hidden_states=True, output_attentions=True)


def _tensors(x, path=""):
    """``{path: tensor}`` of one output field: nested tuples flattened, a KV cache as its layers' keys and values."""
    if torch.is_tensor(x):
        return {path: x}
    if isinstance(x, (tuple, list)):
        out = {}
        for i, t in enumerate(x):
            out.update(_tensors(t, f"{path}[{i}]"))
        return out
    if hasattr(x, "layers"):
        out = {}
        for i, (k, v) in enumerate(compat.cache_layer_tensors(x)):
            out[f"{path}.layers[{i}].keys"], out[f"{path}.layers[{i}].values"] = k, v
        return out
    return {path: x}


def _fields(out) -> dict:
    found = {}
    for key in out.keys():
        found.update(_tensors(out[key], key))
    return found


def _same_layout(got, stock, what, compact=True):
    g, s = _fields(got), _fields(stock)
    assert g.keys() == s.keys(), f"{what}: fields {sorted(g.keys() ^ s.keys())[:6]} differ from stock generate's"
    wrong = [(k, tuple(g[k].shape), tuple(s[k].shape)) for k in s
             if torch.is_tensor(s[k]) and tuple(g[k].shape) != tuple(s[k].shape)]
    assert not wrong, f"{what}: {len(wrong)} tensors shaped unlike stock's, e.g. {wrong[:3]}"
    cache = compat.output_cache(got)
    if cache is not None:
        ref = compat.output_cache(stock)
        assert cache.get_seq_length() == ref.get_seq_length(), what
        assert "reorder_cache" not in vars(cache), f"{what}: the returned cache still reorders the contrast rows"
        if compact:     # generate is over: the contrast rows' memory must not live on in the returned cache
            held = [k.untyped_storage().nbytes() for k, _ in compat.cache_layer_tensors(cache)]
            assert held == [k.untyped_storage().nbytes() for k, _ in compat.cache_layer_tensors(ref)], \
                f"{what}: the returned cache keeps the contrast rows' memory"


def _generate(model, batch, seed=0, **kw):
    torch.manual_seed(seed)
    return model.generate(**batch, **kw)


_STOCK: dict = {}


def _stock(arch, mode):
    """Stock generate (no handle), eager attention, every output requested; computed once per (arch, mode)."""
    if (arch, mode) not in _STOCK:
        model, _, _ = tiny_model(arch)
        assert not vt.active_handles(model), "the stock reference must run without a handle"
        with attn_implementation(model.config.get_text_config(), "eager"):
            _STOCK[arch, mode] = _generate(model, sample_batch(arch, n=2), **ALL, **MODES[mode])
    return _STOCK[arch, mode]


def _equal_values(got, stock, what):
    g, s = _fields(got), _fields(stock)
    assert torch.equal(g["sequences"], s["sequences"]), f"{what}: tokens differ from stock's"
    far = [k for k in s if torch.is_tensor(s[k]) and s[k].is_floating_point()
           and not torch.allclose(g[k], s[k], atol=1e-4, rtol=1e-4)]
    assert not far, f"{what}: {len(far)} tensors differ from stock's, e.g. {far[:4]}"


@torch.no_grad()
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", list(ACTIVE))
def test_generate_returns_the_users_rows_only(method, arch):
    """Two prompts of different lengths (left padding), eager attention, every output requested.

    Neutral settings (the side stream still runs), greedy and beams: every returned tensor equals stock generate's
    (so the rows kept are the user's, not the contrast / text-only ones, the cache and the attention weights hold
    the user's key slots, and beams reorder them right), and the returned cache no longer reorders contrast rows.
    Active settings, seeded sampling: every field shaped as stock generate's, and requesting every output changes
    neither the tokens nor the scores."""
    model, proc, adapter = tiny_model(arch)
    batch = sample_batch(arch, n=2)
    stock = {mode: _stock(arch, mode) for mode in MODES}
    with attn_implementation(model.config.get_text_config(), "eager"):
        with vt.apply_method(model, method, **NEUTRAL[method]):
            for mode in ("greedy", "beams"):
                got = _generate(model, batch, **ALL, **MODES[mode])
                _same_layout(got, stock[mode], f"{method}/{arch}/{mode}, neutral")
                _equal_values(got, stock[mode], f"{method}/{arch}/{mode}, neutral")
        with vt.apply_method(model, method, **ACTIVE[method]):
            got = _generate(model, batch, **ALL, **MODES["sample"])
            _same_layout(got, stock["sample"], f"{method}/{arch}/sample, active")
            lean = _generate(model, batch, max_new_tokens=3, min_new_tokens=3, return_dict_in_generate=True,
                             output_scores=True, **MODES["sample"])
            assert torch.equal(got.sequences, lean.sequences)
            assert all(torch.equal(a, b) for a, b in zip(got.scores, lean.scores, strict=True))


@torch.no_grad()
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", list(ACTIVE))
def test_plain_forward_returns_the_users_rows_and_decodes_by_hand(method, arch):
    """model(**batch, output_hidden_states=True, output_attentions=True, use_cache=True): every field shaped as the
    stock forward's (the cache too). LLaVA archs: one decode step by hand with the returned cache (no position ids:
    the stock model continues its cache) gives generate's second-step logits - the contrast rows come back for the
    step and leave again - and again the user's rows only. (Stock Qwen2-VL / 2.5-VL in transformers 5.25 do not decode
    by hand from input_ids + cache alone - they fail without any handle too - so Qwen checks the prefill only.)"""
    model, proc, adapter = tiny_model(arch)
    batch = sample_batch(arch, n=2)
    flags = dict(output_hidden_states=True, output_attentions=True, use_cache=True)
    with attn_implementation(model.config.get_text_config(), "eager"), \
            vt.apply_method(model, method, **ACTIVE[method]) as h:
        with h.disabled():
            stock = model(**batch, **flags)
        out = model(**batch, **flags)
        _same_layout(out, stock, f"{method}/{arch} prefill", compact=False)   # side rows parked: views
        if adapter.position_kind == "mrope":
            return
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([batch["attention_mask"], torch.ones_like(nxt)], 1)
        step = model(input_ids=nxt, attention_mask=mask, **{compat.cache_param(model): compat.output_cache(out)},
                     **flags)
        cache = compat.output_cache(step)
        assert cache is compat.output_cache(out)
        assert cache.get_seq_length() == compat.output_cache(stock).get_seq_length() + 1
        assert {k.shape[0] for k, _ in compat.cache_layer_tensors(cache)} == {2}
        assert {t.shape[0] for t in step.hidden_states + step.attentions} == {2}
        gen = _generate(model, batch, max_new_tokens=2, min_new_tokens=2, do_sample=False,
                        return_dict_in_generate=True, output_logits=True)
    assert torch.allclose(out.logits[:, -1], gen.logits[0], atol=1e-4)
    assert torch.equal(nxt[:, 0], gen.sequences[:, batch["input_ids"].shape[1]])
    assert torch.allclose(step.logits[:, -1], gen.logits[1], atol=1e-4)


@torch.no_grad()
def test_contrast_stream_longer_than_the_pruned_prompt():
    """FasterVLM keeps 3 visual tokens, DAMRO's contrast prompt has 10: the joined cache left-pads the MAIN rows
    (main_pad = 7). The returned cache and attention weights hold only the main stream's keys, as FasterVLM alone
    returns them (neutral DAMRO: the same values)."""
    model, proc, adapter = tiny_model("llava")
    batch = sample_batch("llava", n=2)
    pruned = ("fastervlm", {"keep_ratio": 3 / 64})
    with attn_implementation(model.config.get_text_config(), "eager"):
        with vt.apply_method(model, [pruned]):
            stock = _generate(model, batch, **ALL, **MODES["greedy"])
        with vt.apply_method(model, [pruned, ("damro", {"alpha": 0.0, "beta": 0.0, "topk": 10,
                                                        "topk_rule": "fixed"})]) as h:
            got = _generate(model, batch, **ALL, **MODES["greedy"])
            assert h.methods[1].side.main_pad > 0
    _same_layout(got, stock, "fastervlm + damro")
    _equal_values(got, stock, "fastervlm + damro")


@torch.no_grad()
@pytest.mark.parametrize("method", ["damro", "vcd"])
def test_a_cache_passed_in_comes_back_with_the_users_rows(method):
    """generate(past_key_values=<the user's empty cache>), tokens only: the user's object holds the user's rows at
    the stock length afterwards (VCD: the batched prefill writes the joined cache into it; DAMRO: the join)."""
    from transformers import DynamicCache

    model, proc, adapter = tiny_model("llava")
    batch = sample_batch("llava", n=2)
    caches = []
    for active in (False, True):
        cache = DynamicCache(config=model.config.get_text_config())
        if active:
            with vt.apply_method(model, method, **ACTIVE[method]):
                model.generate(**batch, max_new_tokens=3, min_new_tokens=3, **{compat.cache_param(model): cache})
        else:
            model.generate(**batch, max_new_tokens=3, min_new_tokens=3, **{compat.cache_param(model): cache})
        caches.append(cache)
    stock, got = caches
    assert [tuple(k.shape) for k, _ in compat.cache_layer_tensors(got)] == \
        [tuple(k.shape) for k, _ in compat.cache_layer_tensors(stock)]
    assert "reorder_cache" not in vars(got)
