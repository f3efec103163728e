"""vLLM side of the equivalence test (runs in the vLLM environment).

``VTOOLKIT_VLLM_FIXTURES=DIR`` (written by ``hf_reference.py`` in vtoolkit's environment; conftest.py writes it
when it is not given): for LLaVA and Qwen2-VL and each served method, a batch of 3 requests with different images
through ``LLM.generate`` with ``hf_overrides={"vtoolkit": ...}`` keeps the same tokens (the plugin's trace) and
generates the same first greedy tokens as vtoolkit's HF path; the prompt is pruned to the same length.
"""
from __future__ import annotations

import json

import pytest
from conftest import make_llm
from PIL import Image


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("method", ["fastervlm", "random"])
def test_vllm_plugin_equals_hf_path(fixtures, trace_file, arch, method):
    from vllm import SamplingParams
    import vtoolkit_core

    exp = json.loads((fixtures / "expected.json").read_text())[arch][method]
    llm = make_llm(fixtures / arch, {"method": method, **exp["options"]})
    rows = exp["rows"]
    images = [Image.open(r["image"]).convert("RGB") for r in rows]
    reqs = [{"prompt": r["prompt"], "multi_modal_data": {"image": im}} for r, im in zip(rows, images)]
    trace_file.write_text("")
    outs = llm.generate(reqs, SamplingParams(temperature=0, max_tokens=len(rows[0]["tokens"]), ignore_eos=True))
    traced = [json.loads(line) for line in trace_file.read_text().splitlines()]
    by_image = {t["image"]: t for t in traced}
    assert len(by_image) == 3, traced
    for r, out in zip(rows, outs):
        assert len(out.prompt_token_ids) == r["prompt_len"], (r["image"], len(out.prompt_token_ids), r["prompt_len"])
        assert list(out.outputs[0].token_ids) == r["tokens"], (r["image"], out.outputs[0].token_ids, r["tokens"])
    # kept indices, matched by image: the HF pixels' fingerprint is taken by the plugin on vLLM's pixels, so a
    # missing key means the two processors produced different pixels
    assert sorted(t["kept"] for t in traced) == sorted(r["kept"] for r in rows)
    del vtoolkit_core
