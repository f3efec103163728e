"""Issue 10: VHR (vision-aware head reinforcement) through the stock generate, SDPA kept, batched, with its text-only
side stream run layer by layer in the same pass."""
import pytest
import torch

import vtoolkit as vt
from conftest import ARCHS, NEW_ARCHS, assert_same_continuation, attn_implementation, sample_batch, tiny_model
from vtoolkit.hooks.attention import interceptor_count
from vtoolkit.methods.vhr import default_layers
from vtoolkit.models.tiny import demo_image

GEN = dict(max_new_tokens=5, do_sample=False)
IMAGES = [((160, 120), "Is there a dog?"), ((200, 100), "Describe this image in detail, with every object you see.")]


def _one(adapter, proc, i):
    return adapter.prepare_inputs(proc, [demo_image(i, IMAGES[i][0])], [IMAGES[i][1]])


def _batch(adapter, proc):
    return adapter.prepare_inputs(proc, [demo_image(i, s) for i, (s, _) in enumerate(IMAGES)], [q for _, q in IMAGES])


@torch.no_grad()
@pytest.mark.parametrize("arch", ARCHS)
def test_alpha_one_is_the_baseline(arch):
    model, proc, adapter = tiny_model(arch)
    batch = _batch(adapter, proc)
    base = model.generate(**batch, **GEN)
    with vt.apply_method(model, "vhr", alpha=1.0) as h:
        assert torch.equal(model.generate(**batch, **GEN), base)
        assert h.stats["selected_heads"].shape == (2, adapter.num_layers, adapter.num_heads)
    with vt.apply_method(model, "vhr", alpha=3.0) as h:              # an active setting changes the model
        active = model(**batch).logits
        with h.disabled():
            assert not torch.equal(active, model(**batch).logits)


# -- independent references ----------------------------------------------------------------------------------------
def _text_only(adapter, inputs):
    ids = inputs["input_ids"][0]
    keep = ids != adapter.image_token_id
    for tid in getattr(adapter, "visual_marker_ids", ()):
        keep &= ids != tid
    ids = ids[keep][None]
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if "mm_token_type_ids" in inputs:
        out["mm_token_type_ids"] = torch.zeros_like(ids)
    return out


def _head_outputs(model, adapter, inputs, layer, scale=None):
    """o_proj input of ``layer`` at the last position, ``[H, d]``, from a plain forward; ``scale[l]`` (bool [H]) scales
    earlier layers' heads by alpha like a reinforced model would."""
    H, d = adapter.num_heads, adapter.head_dim
    got, handles = {}, []

    def grab(m, args):
        got["x"] = args[0][0, -1].view(H, d).clone()

    def scaler(sel, alpha):
        def hook(m, args):
            x = args[0]
            v = x.view(*x.shape[:2], H, d)
            return (torch.where(sel[None, None, :, None], v * alpha, v).view_as(x),)
        return hook

    handles.append(adapter.o_proj(layer).register_forward_pre_hook(grab))
    for lay, (sel, alpha) in (scale or {}).items():
        handles.append(adapter.o_proj(lay).register_forward_pre_hook(scaler(sel, alpha)))
    try:
        model(**inputs)
    finally:
        for h in handles:
            h.remove()
    return got["x"]


def _reference_selection(a_img, a_txt):
    """The paper's rule, written out: Euclidean VHD, outlier zeroing (both above mean + population std), > median."""
    H = a_img.shape[0]
    vhd = [float(torch.sqrt(((a_img[i] - a_txt[i]) ** 2).sum())) for i in range(H)]
    ta = [float((a_txt[i] ** 2).sum()) for i in range(H)]

    def thresh(xs):
        m = sum(xs) / len(xs)
        return m + (sum((x - m) ** 2 for x in xs) / len(xs)) ** 0.5

    tv, tt = thresh(vhd), thresh(ta)
    vhd = [0.0 if (v > tv and t > tt) else v for v, t in zip(vhd, ta)]
    s = sorted(vhd)
    median = (s[H // 2 - 1] + s[H // 2]) / 2 if H % 2 == 0 else s[H // 2]
    return torch.tensor(vhd), torch.tensor([v > median for v in vhd])


@torch.no_grad()
@pytest.mark.parametrize("arch", ARCHS + NEW_ARCHS)
def test_selection_equals_two_explicit_passes_layer_by_layer(arch):
    """First reinforced layer: equal to two plain forwards (with the image / visual tokens removed). Later layers:
    equal to plain forwards in which the test itself scales the heads chosen at earlier layers, and (for this model)
    different from a selection that ignores the earlier reinforcement - the pass is layer by layer."""
    model, proc, adapter = tiny_model(arch)
    alpha = 3.0
    with vt.apply_method(model, "vhr", alpha=alpha) as h:
        model(**_batch(adapter, proc))
        vhd, sel, layers = h.stats["vhd"], h.stats["selected_heads"], h.stats["layers"]
    assert layers == default_layers(adapter.num_layers) == [1, 2, 3]
    differs = False
    for b in range(2):
        one = _one(adapter, proc, b)
        txt = _text_only(adapter, one)
        scale = {}
        for lay in layers:
            a_img = _head_outputs(model, adapter, one, lay, scale)
            a_txt = _head_outputs(model, adapter, txt, lay, scale)
            ref_vhd, ref_sel = _reference_selection(a_img, a_txt)
            assert torch.equal(sel[b, lay], ref_sel), (arch, b, lay)
            assert torch.allclose(vhd[b, lay], ref_vhd, atol=1e-5)
            if lay != layers[0]:
                _, naive = _reference_selection(_head_outputs(model, adapter, one, lay),
                                                _head_outputs(model, adapter, txt, lay))
                differs |= not torch.equal(naive, ref_sel)
            scale[lay] = (ref_sel, alpha)
        assert not sel[b, 0].any()                                     # layer 0 is not reinforced
    assert differs, "on this model the earlier reinforcement changes a later layer's selection"


# -- generate ------------------------------------------------------------------------------------------------------
@torch.no_grad()
@pytest.mark.parametrize("arch", ARCHS)
def test_cache_equals_recompute_and_batch_equals_singles(arch):
    model, proc, adapter = tiny_model(arch)
    batch = sample_batch(arch, n=3, two_images=True)
    with vt.apply_method(model, "vhr", alpha=2.5) as h:
        cached = model.generate(**batch, **GEN)
        sel = h.stats["selected_heads"]
        assert torch.equal(model.generate(**batch, **GEN, use_cache=False), cached)
        assert torch.equal(h.stats["selected_heads"], sel)          # frozen at the first step
        n = batch["input_ids"].shape[1]
        pad = proc.tokenizer.pad_token_id
        for i in range(3):
            one = sample_batch(arch, n=3, two_images=True)
            imgs = [demo_image(i, [(160, 120), (200, 100), (120, 120)][i])]
            if i == 1:
                imgs = [[imgs[0], demo_image(7, (100, 150))]]
            q = ["Is there a dog?", "Describe this image in detail, please, with every object you see.", "Cat?"][i]
            one = adapter.prepare_inputs(proc, imgs, [q])
            single = model.generate(**one, **GEN)
            assert_same_continuation(cached[i, n:], single[0, one["input_ids"].shape[1]:], pad, f"sample {i}")
            assert torch.equal(h.stats["selected_heads"][0], sel[i])


@torch.no_grad()
def test_sampling_and_sdpa_kept():
    model, proc, adapter = tiny_model("qwen2_vl")
    batch = sample_batch("qwen2_vl", n=2)
    before = interceptor_count()
    with vt.apply_method(model, "vhr") as h:
        assert model.config.get_text_config()._attn_implementation == "sdpa"
        assert interceptor_count() == before                        # no attention function replaced anywhere
        torch.manual_seed(3)
        a = model.generate(**batch, max_new_tokens=4, do_sample=True, top_k=10)
        torch.manual_seed(3)
        b = model.generate(**batch, max_new_tokens=4, do_sample=True, top_k=10)
        assert torch.equal(a, b) and h.stats["selected_heads"].any()


@torch.no_grad()
@pytest.mark.parametrize("arch", ["llava", "qwen2_vl"])
def test_composes_with_fastervlm(arch):
    model, proc, adapter = tiny_model(arch)
    batch = sample_batch(arch, n=2)
    with vt.apply_method(model, "vhr", alpha=2.0) as h:
        alone = model.generate(**batch, **GEN)
    with vt.apply_method(model, [("fastervlm", {"keep_ratio": 1.0}), ("vhr", {"alpha": 2.0})]):
        assert torch.equal(model.generate(**batch, **GEN), alone)
    with vt.apply_method(model, [("fastervlm", {"keep_ratio": 0.25}), ("vhr", {"alpha": 2.0})]) as h:
        model.generate(**batch, **GEN)
        assert h.stats["fastervlm"]["visual_tokens_after"] < h.stats["fastervlm"]["visual_tokens_before"]
        assert h.stats["vhr"]["selected_heads"].any()


@torch.no_grad()
def test_composes_with_var_which_leaves_the_side_stream_alone():
    model, proc, adapter = tiny_model("llava")
    batch = sample_batch("llava", n=2)
    var = {"sink_dims": list(range(8)), "tau": 2.5}
    with vt.apply_method(model, "vhr", alpha=2.0):
        alone = model.generate(**batch, **GEN)
    with vt.apply_method(model, [("var", {"p": 1.0, **var}), ("vhr", {"alpha": 2.0})]):
        assert torch.equal(model.generate(**batch, **GEN), alone)
    with vt.apply_method(model, [("var", var), ("vhr", {"alpha": 2.0})]) as h:
        out = model.generate(**batch, **GEN)
        assert torch.equal(model.generate(**batch, **GEN, use_cache=False), out)
        assert h.stats["vhr"]["selected_heads"].any()


def test_bad_options_name_the_option():
    model, _, _ = tiny_model("llava")
    for bad, match in [({"alpha": 0}, "alpha"), ({"alpha": -1.0}, "alpha"), ({"layers": []}, "layers"),
                       ({"layers": [0, 9]}, r"layers \[9\] out of range"), ({"layers": [-5]}, "out of range"),
                       ({"layers": "1"}, "layers")]:
        with pytest.raises(ValueError, match=match):
            vt.apply_method(model, "vhr", **bad)
    with vt.apply_method(model, "vhr", layers=[-1, 1]) as h:
        assert h.methods[0].layers == [1, 3]
    with attn_implementation(model.config.text_config, "flash_attention_2"):
        with pytest.raises(NotImplementedError, match="vhr: its text-only side stream needs 'sdpa' or 'eager'"):
            vt.apply_method(model, "vhr")
    with pytest.raises(ValueError, match="both act at stage 'llm'"):
        vt.apply_method(model, ["fastv", "vhr"])


def test_default_layers_rule():
    assert default_layers(32) == [1] + list(range(18, 32))
    assert default_layers(28) == [1] + list(range(16, 28))
    assert default_layers(4) == [1, 2, 3]
