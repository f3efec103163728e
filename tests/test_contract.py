"""The contract every registered method must meet, on every architecture it supports (peft-style shared tester).

Add a new method to CASES: a test fails until it is listed. For each case:
- neutral settings give the baseline exactly (logits and greedy tokens), and remove() gives it back after an active run;
- an active setting through generate: a padded batch gives the same tokens as each prompt alone;
- an exception inside ``with`` leaves no hooks and no attention interceptors;
- ``generate(use_cache=False)`` equals the cached run where the method's decisions do not depend on the decoded
  tokens (pre-LLM pruning; VAR, whose sinks are the prompt's); FastV re-ranks with each new last token without a cache, so its cache semantics are
  tested with a query-independent score in test_fastv.py.
"""
import pytest
import torch

import vtoolkit as vt
from conftest import ARCHS, NEW_ARCHS, assert_same_continuation, tiny_model
from vtoolkit.hooks import count_hooks
from vtoolkit.hooks.attention import interceptor_count
from vtoolkit.hooks.sequence import force_rewrite
from vtoolkit.models.tiny import demo_image

# name -> (neutral overrides, active overrides, decisions independent of decoded tokens)
CASES = {
    "none": ({}, {}, True),
    "fastervlm": ({"keep_ratio": 1.0}, {"keep_ratio": 0.3}, True),
    "random": ({"keep_ratio": 1.0}, {"keep_ratio": 0.3, "seed": 3}, True),
    "fastv": ({"keep_ratio": 1.0}, {"K": 2, "keep_ratio": 0.5}, False),
    "dart": ({"keep_ratio": 1.0}, {"K": 2, "keep_ratio": 0.3, "image_pivots": 2, "text_pivots": 2}, True),
    "dyvte": ({"exit_layer": -1}, {"exit_layer": 1}, True),
    "vhr": ({"alpha": 1.0}, {"alpha": 2.5}, True),
    "damro": ({"alpha": 0.0, "beta": 0.0}, {"alpha": 1.0, "beta": 0.1, "topk": 3, "topk_rule": "fixed"}, True),
    "vcd": ({"alpha": 0.0, "beta": 0.0}, {"alpha": 1.0, "beta": 0.1}, True),
    # random tiny models have no massive activations: explicit sink dims and a low tau make sinks (see test_var.py)
    "var": ({"p": 1.0, "sink_dims": list(range(8)), "tau": 2.5}, {"sink_dims": list(range(8)), "tau": 2.5}, True),
}
GEN = dict(max_new_tokens=4, do_sample=False)
IMAGES = [((160, 120), "Is there a dog?"), ((200, 100), "Describe this image in detail, with every object you see."),
          ((120, 120), "Cat?")]


def _supported(name, arch):
    spec = vt.get_method(name)
    return "*" in spec.architectures or arch in spec.architectures


PAIRS = [(m, a) for m in CASES for a in ARCHS + NEW_ARCHS]


def test_every_registered_method_is_in_the_contract():
    assert {r["name"] for r in vt.list_methods()} == set(CASES)


def _batch(adapter, proc, idx=(0, 1, 2)):
    return adapter.prepare_inputs(proc, [demo_image(i, IMAGES[i][0]) for i in idx], [IMAGES[i][1] for i in idx])


@torch.no_grad()
@pytest.mark.parametrize("name,arch", PAIRS)
def test_contract(name, arch):
    if not _supported(name, arch):
        with pytest.raises(NotImplementedError):
            vt.apply_method(tiny_model(arch)[0], name)
        return
    neutral, active, static = CASES[name]
    model, proc, adapter = tiny_model(arch)
    batch = _batch(adapter, proc)
    base_logits = model(**batch).logits
    base = model.generate(**batch, **GEN)
    hooks, ics = count_hooks(model), interceptor_count()

    with vt.apply_method(model, name, **neutral):                     # neutral == baseline
        assert torch.equal(model(**batch).logits, base_logits)
        assert torch.equal(model.generate(**batch, **GEN), base)
        with force_rewrite():                                          # ... also through the rewrite path
            assert torch.equal(model.generate(**batch, **GEN), base)

    h = vt.apply_method(model, name, **active)                         # active: batch == singles
    try:
        out = model.generate(**batch, **GEN)
        pad = model.generation_config.pad_token_id if model.generation_config.pad_token_id is not None \
            else proc.tokenizer.pad_token_id
        n = batch["input_ids"].shape[1]
        if static:
            assert torch.equal(model.generate(**batch, **GEN, use_cache=False), out)
        for i in range(3):
            one = _batch(adapter, proc, (i,))
            single = model.generate(**one, **GEN)
            assert_same_continuation(out[i, n:], single[0, one["input_ids"].shape[1]:], pad, f"sample {i}")
        with h.disabled():
            assert torch.equal(model.generate(**batch, **GEN), base)
    finally:
        h.remove()
    assert torch.equal(model(**batch).logits, base_logits)             # remove() == baseline
    assert (count_hooks(model), interceptor_count()) == (hooks, ics)

    with pytest.raises(KeyError):                                      # exceptions inside `with` leak nothing
        with vt.apply_method(model, name, **active):
            model.generate(**batch, max_new_tokens=1)
            raise KeyError("boom")
    assert (count_hooks(model), interceptor_count()) == (hooks, ics)
    assert vt.active_handles(model) == []
