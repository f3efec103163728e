"""Issue 2 contract: the identity method, the handle lifecycle, registry errors, adapters' visual positions."""
import pytest
import torch

import vtoolkit as vt
from conftest import sample_batch, tiny_model
from vtoolkit.hooks import count_hooks
from vtoolkit.hooks.attention import interceptor_count


@torch.no_grad()
def test_none_is_bit_exact_and_remove_restores(arch):
    model, proc, adapter = tiny_model(arch)
    batch = sample_batch(arch)
    base = model(**batch).logits
    base_gen = model.generate(**batch, max_new_tokens=4, do_sample=False)
    n_hooks = count_hooks(model)
    h = vt.apply_method(model, "none")
    assert count_hooks(model) > n_hooks
    assert torch.equal(model(**batch).logits, base)
    assert torch.equal(model.generate(**batch, max_new_tokens=4, do_sample=False), base_gen)
    assert h.stats["visual_tokens_before"] == [int((r == adapter.image_token_id).sum()) for r in batch["input_ids"]]
    h.remove()
    h.remove()  # idempotent
    assert count_hooks(model) == n_hooks
    assert torch.equal(model(**batch).logits, base)


def test_exception_inside_with_leaves_no_hooks(arch):
    model, _, _ = tiny_model(arch)
    before = count_hooks(model)
    with pytest.raises(ZeroDivisionError):
        with vt.apply_method(model, "none") as h:
            assert count_hooks(model) > before
            _ = 1 / 0
    assert count_hooks(model) == before
    assert not h.active
    assert vt.active_handles(model) == []


def test_failure_during_apply_removes_what_was_installed(monkeypatch):
    model, _, _ = tiny_model("llava")
    before, before_ic = count_hooks(model), interceptor_count()
    from vtoolkit.methods.none import NoneMethod

    def broken_install(self, hooks, ctx):
        hooks.forward_pre(self.adapter.language_model, lambda m, a, k: None)
        raise RuntimeError("boom")

    monkeypatch.setattr(NoneMethod, "install", broken_install)
    with pytest.raises(RuntimeError, match="boom"):
        vt.apply_method(model, "none")
    assert count_hooks(model) == before and interceptor_count() == before_ic
    assert vt.active_handles(model) == []


def test_unknown_method_suggests_closest_name():
    with pytest.raises(KeyError, match="Did you mean 'none'"):
        vt.apply_method(tiny_model("llava")[0], "nnoe")


def test_unknown_option_suggests_closest_field():
    from dataclasses import dataclass

    from vtoolkit.config import MethodConfig

    @dataclass(frozen=True)
    class C(MethodConfig):
        keep_ratio: float = 0.5

    with pytest.raises(TypeError, match="Did you mean 'keep_ratio'"):
        C().replace(keep_rato=0.1)


def test_applying_twice_is_a_clear_error():
    model, _, _ = tiny_model("llava")
    with vt.apply_method(model, "none"):
        with pytest.raises(RuntimeError, match="already applied.*remove"):
            vt.apply_method(model, "none")
    vt.apply_method(model, "none").remove()  # fine again after removal


@torch.no_grad()
def test_disabled_gives_baseline_and_reenables():
    model, _, _ = tiny_model("llava")
    batch = sample_batch("llava", n=2)
    with vt.apply_method(model, "none") as h:
        with h.disabled():
            model(**batch)
            assert h.stats == {}  # hooks were inactive: nothing recorded
        model(**batch)
        assert len(h.stats["visual_tokens_before"]) == 2


@torch.no_grad()
def test_per_call_state_resets_at_each_prefill():
    model, _, _ = tiny_model("llava")
    with vt.apply_method(model, "none") as h:
        model.generate(**sample_batch("llava", n=3), max_new_tokens=2)
        assert len(h.stats["visual_tokens_before"]) == 3
        model.generate(**sample_batch("llava", n=1), max_new_tokens=2)
        assert len(h.stats["visual_tokens_before"]) == 1


def test_visual_positions_match_processor_placeholders(arch):
    """Padded batch of 3 prompts of different lengths, one with 2 images; spans tile the placeholders exactly."""
    model, proc, adapter = tiny_model(arch)
    batch = sample_batch(arch, n=3, two_images=True)
    ids = batch["input_ids"]
    assert (batch["attention_mask"] == 0).any(), "the batch should be padded"
    spans = adapter.image_spans(batch)
    assert [len(s) for s in spans] == [1, 2, 1]
    for b, sample in enumerate(spans):
        got = torch.cat([s.positions for s in sample])
        expected = (ids[b] == adapter.image_token_id).nonzero().flatten()
        assert torch.equal(got, expected)
        for s in sample:
            crop_pos = torch.cat(s.crops + ([s.newlines] if s.newlines is not None else []))
            assert torch.equal(crop_pos.sort().values, s.positions)  # crops (+ newlines) partition the image
    assert [s.image_index for sample in spans for s in sample] == [0, 1, 2, 3]


def test_llava_next_crops_follow_hf_packing():
    model, proc, adapter = tiny_model("llava_next")
    batch = sample_batch("llava_next", n=1)
    (span,) = adapter.image_spans(batch)[0]
    n = adapter.tokens_per_crop
    assert span.crops[0].numel() == n  # base image is never unpadded
    assert torch.equal(span.crops[0], span.positions[:n])  # base crop comes first, in raster order
    assert span.newlines is not None and span.newlines.numel() > 0


def test_adapter_sites(arch):
    model, _, a = tiny_model(arch)
    assert a.num_layers >= 4 and len(a.attention_modules()) == a.num_layers
    assert a.num_heads * a.head_dim == a.o_proj(0).in_features
    assert len(a.vision_layers) >= 3
    if arch.startswith("qwen"):
        assert a.num_kv_heads < a.num_heads and a.position_kind == "mrope" and not a.has_cls
    else:
        assert a.has_cls and a.vision_feature_layer() == len(a.vision_layers) - 2


def test_tiny_build_is_deterministic():
    m1, _ = vt.models.tiny.build("qwen2_vl", seed=3)
    m2, _ = vt.models.tiny.build("qwen2_vl", seed=3)
    m3, _ = vt.models.tiny.build("qwen2_vl", seed=4)
    s1, s2, s3 = m1.state_dict(), m2.state_dict(), m3.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert not all(torch.equal(s1[k], s3[k]) for k in s1)
    with pytest.raises(ValueError, match="Did you mean 'llava'"):
        vt.models.tiny.build("lava")


@torch.no_grad()
def test_peft_wrapped_model_is_accepted():
    peft = pytest.importorskip("peft")
    model, proc = vt.models.tiny.build("llava", seed=1)
    cfg = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    pm = peft.get_peft_model(model, cfg)
    batch = sample_batch("llava", n=2)
    base = pm(**batch).logits
    assert vt.models.get_adapter(pm).model is model
    before = count_hooks(pm)
    with vt.apply_method(pm, "none") as h:
        assert torch.equal(pm(**batch).logits, base)
        pm.generate(**batch, max_new_tokens=2)
        assert len(h.stats["visual_tokens_before"]) == 2
    assert count_hooks(pm) == before


def test_list_methods_and_cli():
    rows = {r["name"]: r for r in vt.list_methods()}
    assert rows["none"]["kind"] == "identity" and rows["none"]["architectures"] == ["*"]
    from typer.testing import CliRunner

    from vtoolkit.cli import app

    res = CliRunner().invoke(app, ["list", "--json"])
    assert res.exit_code == 0, res.output
    assert "none" in res.output


def test_yaml_preset_and_overrides(tmp_path):
    from vtoolkit.config import load_method_preset, parse_overrides

    p = tmp_path / "p.yaml"
    p.write_text("method: none\n")
    assert load_method_preset(p, ["a=0.1", "b=true"]) == ("none", {"a": 0.1, "b": True})
    assert parse_overrides(["x.y=[1, 2]"]) == {"x": {"y": [1, 2]}}
    with pytest.raises(ValueError, match="key=value"):
        parse_overrides(["oops"])
    (tmp_path / "bad.yaml").write_text("!!python/object/apply:os.system ['echo hi']\n")
    from vtoolkit.config import ConfigError

    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML at line 1"):
        load_method_preset(tmp_path / "bad.yaml")


@torch.no_grad()
def test_bf16_and_device_map_loaded_model(tmp_path):
    """A model saved and reloaded with from_pretrained(dtype=bf16, device_map=...) takes a method like any other."""
    from transformers import AutoModelForImageTextToText

    model, proc = vt.models.tiny.build("llava", seed=2)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path, dtype=torch.bfloat16, device_map={"": "cpu"})
    assert next(loaded.parameters()).dtype == torch.bfloat16
    batch = vt.models.get_adapter(loaded).prepare_inputs(proc, [vt.models.tiny.demo_image(0)] * 2, ["Dog?", "Cat?"])
    batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
    base = loaded.generate(**batch, max_new_tokens=3, do_sample=False)
    with vt.apply_method(loaded, "fastervlm", keep_ratio=0.5) as h:
        out = loaded.generate(**batch, max_new_tokens=3, do_sample=False)
        assert out.shape == base.shape and h.stats["visual_tokens_after"] == [32, 32]
    with vt.apply_method(loaded, "none"):
        assert torch.equal(loaded.generate(**batch, max_new_tokens=3, do_sample=False), base)


@torch.no_grad()
def test_qwen3_vl_adapter_and_identity(vcd_without_qwen3_vl):   # the refusal path, on a narrowed vcd
    model, proc = vt.models.tiny.build("qwen3_vl")
    adapter = vt.models.get_adapter(model)
    batch = adapter.prepare_inputs(proc, [vt.models.tiny.demo_image(0), vt.models.tiny.demo_image(1, (90, 140))],
                                   ["Is there a dog?", "Describe it."])
    spans = adapter.image_spans(batch)
    for b, sample in enumerate(spans):
        assert torch.equal(sample[0].positions, (batch["input_ids"][b] == adapter.image_token_id).nonzero().flatten())
    base = model.generate(**batch, max_new_tokens=3, do_sample=False)
    with vt.apply_method(model, "none"):
        assert torch.equal(model.generate(**batch, max_new_tokens=3, do_sample=False), base)
    with pytest.raises(NotImplementedError, match="does not support 'qwen3_vl'"):
        vt.apply_method(model, "vcd")


def test_remove_leaves_no_instance_attributes(arch):
    model, _, adapter = tiny_model(arch)
    snapshot = {id(m): set(vars(m)) for m in model.modules()}
    with vt.apply_method(model, "none"):
        assert "get_image_features" in vars(adapter.core)
    assert {id(m): set(vars(m)) for m in model.modules()} == snapshot


@torch.no_grad()
def test_apply_with_a_config_object():
    model, _, _ = tiny_model("llava")
    cfg = vt.get_config_class("fastervlm")(keep_tokens=8)
    with vt.apply_method(model, cfg) as h:
        model(**sample_batch("llava", n=2))
        assert h.config is cfg and h.stats["visual_tokens_after"] == [8, 8]
    with vt.apply_method(model, cfg, keep_tokens=4) as h:   # overrides on top of a config object
        model(**sample_batch("llava", n=1))
        assert h.stats["visual_tokens_after"] == [4]
    with pytest.raises(TypeError, match="not the config of a registered method"):
        from vtoolkit.config import MethodConfig

        vt.apply_method(model, MethodConfig())
