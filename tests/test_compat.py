"""Issue 7: one compatibility place for transformers internals, a declared tested range, and no silent no-op when a
method's hooks do not run (a renamed argument, a bypassed code path)."""
import re
import sys
import warnings
from pathlib import Path

import pytest
import torch

import vtoolkit as vt
from conftest import sample_batch, tiny_model
from vtoolkit import compat

REPO = Path(__file__).resolve().parents[1]
GEN = dict(max_new_tokens=3, do_sample=False)


def _pyproject():
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_pyproject_declares_the_tested_range():
    deps = _pyproject()["project"]["dependencies"]
    (spec,) = [d for d in deps if re.match(r"transformers\b", d)]
    assert spec.replace(" ", "") == "transformers" + compat.TESTED_RANGE


def test_installed_transformers_is_in_the_tested_range():
    import transformers

    assert compat.in_tested_range(transformers.__version__), transformers.__version__


@pytest.mark.parametrize("version,ok", [("5.23.0", True), ("5.24.3", True), ("5.25.0", True), ("5.22.2", False),
                                        ("5.26.0", False), ("5.26.0rc1", False), ("6.0.0", False), (None, False)])
def test_range_membership(version, ok):
    assert compat.in_tested_range(version) is ok


def test_outside_the_range_warns_once_naming_the_range(monkeypatch):
    monkeypatch.setattr(compat, "transformers_version", lambda: "5.31.0")
    monkeypatch.setattr(compat, "_warned", False)
    model, _, _ = tiny_model("llava")
    with pytest.warns(RuntimeWarning, match=re.escape(f"transformers 5.31.0 is outside the tested range "
                                                      f"{compat.TESTED_RANGE}")):
        vt.apply_method(model, "none").remove()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vt.apply_method(model, "none").remove()     # once per process


def test_cache_is_found_under_either_name_and_an_unknown_name_raises():
    from transformers import DynamicCache

    c = DynamicCache()
    assert compat.get_cache({"cache": c}) is c
    assert compat.get_cache({"past_key_values": c}) is c
    assert compat.get_cache({"input_ids": torch.ones(1)}) is None
    with pytest.raises(compat.UnsupportedTransformersError, match="'kv_cache'.*does not know"):
        compat.get_cache({"kv_cache": c})


def test_output_fields_under_either_name():
    from transformers.modeling_outputs import BaseModelOutputWithPast

    o = BaseModelOutputWithPast(last_hidden_state=torch.zeros(1))
    assert compat.output_cache(o) is None
    assert compat.output_cache({"past_key_values": 3}) == 3 and compat.output_cache({"cache": 4}) == 4
    assert compat.output_image_features({"image_hidden_states": 1}) == 1
    assert compat.output_image_features({"image_outputs": 2}) == 2


def test_cache_param_of_the_installed_version():
    model, _, adapter = tiny_model("llava")
    assert compat.cache_param(adapter.language_model) in compat.CACHE_KWARGS


@torch.no_grad()
def test_a_renamed_cache_argument_raises_instead_of_pruning_silently(monkeypatch):
    """What transformers 5.24 did to vtoolkit 0.1.0: simulate the next rename by forgetting the current name."""
    model, _, _ = tiny_model("llava")
    batch = sample_batch("llava", n=2)
    monkeypatch.setattr(compat, "CACHE_KWARGS", ("kv_cache_of_the_future",))
    with vt.apply_method(model, "fastervlm", keep_ratio=0.25):
        with pytest.raises(compat.UnsupportedTransformersError, match="does not know"):
            model.generate(**batch, **GEN)


class _Bypass(torch.nn.Module):
    """Calls the wrapped module's ``forward`` directly, so the hooks registered on it do not run (after ``hooked``
    calls that went through them)."""

    def __init__(self, inner, hooked: int = 0):
        super().__init__()
        object.__setattr__(self, "inner", inner)    # not a child: the model's module tree is unchanged
        self.hooked = hooked

    def __getattr__(self, name):     # everything else (embeddings, config, ...) is the wrapped module's
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)

    def forward(self, *args, **kwargs):
        if self.hooked > 0:
            self.hooked -= 1
            return self.inner(*args, **kwargs)
        return self.inner.forward(*args, **kwargs)


def _swap(parent, name, new):
    old = parent._modules[name]
    parent._modules[name] = new
    return old


@torch.no_grad()
@pytest.mark.parametrize("arch", ["llava", "qwen2_vl"])
def test_bypassed_prefill_hook_raises_and_working_hooks_do_not(arch):
    model, _, adapter = tiny_model(arch)
    batch = sample_batch(arch, n=2)
    with vt.apply_method(model, "fastervlm", keep_ratio=0.25) as h:
        pruned = model.generate(**batch, **GEN)                        # hooks working: no error
        assert h.stats["visual_tokens_after"] < h.stats["visual_tokens_before"]
        lm = _swap(adapter.core, "language_model", _Bypass(adapter.language_model))
        try:
            with pytest.raises(RuntimeError, match="fastervlm: the language-model pre-hook did not see this call's "
                                                   "prefill.*tested with transformers"):
                model.generate(**batch, **GEN)
            with pytest.raises(RuntimeError, match="fastervlm: .*prefill"):
                model(**batch)
        finally:
            _swap(adapter.core, "language_model", lm)
        assert torch.equal(model.generate(**batch, **GEN), pruned)


@torch.no_grad()
def test_bypassed_decode_hook_raises():
    model, _, adapter = tiny_model("llava")
    batch = sample_batch("llava", n=2)
    with vt.apply_method(model, "fastervlm", keep_ratio=0.25):
        lm = _swap(adapter.core, "language_model", _Bypass(adapter.language_model, hooked=1))
        try:
            with pytest.raises(RuntimeError, match="did not see this decode step.*decode step 1"):
                model.generate(**batch, **GEN)
        finally:
            _swap(adapter.core, "language_model", lm)


@torch.no_grad()
def test_bypassed_midstack_layer_raises():
    model, _, adapter = tiny_model("llava")
    batch = sample_batch("llava", n=2)
    layers = adapter.language_model.layers
    with vt.apply_method(model, "fastv", K=2, ratio=0.5):
        model.generate(**batch, **GEN)
        layer = _swap(layers, "2", _Bypass(layers[2]))
        try:
            with pytest.raises(RuntimeError, match="fastv: the pre-hook of decoder layer 2 did not see"):
                model.generate(**batch, **GEN)
        finally:
            _swap(layers, "2", layer)
        model.generate(**batch, **GEN)


@torch.no_grad()
def test_text_only_calls_expect_nothing():
    model, proc, adapter = tiny_model("llava")
    ids = proc.tokenizer(["USER: hello there ASSISTANT:"], return_tensors="pt")
    with vt.apply_method(model, "fastervlm", keep_ratio=0.25) as h:
        model.generate(**ids, **GEN)
        assert h.stats == {}
