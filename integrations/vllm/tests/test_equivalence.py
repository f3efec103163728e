"""vLLM side of the equivalence test (runs in the vLLM environment).

``VTOOLKIT_VLLM_FIXTURES=DIR`` (written by ``hf_reference.py`` in vtoolkit's environment; conftest.py writes it
when it is not given): for LLaVA, Qwen2-VL and Qwen2.5-VL and each served method, a batch of 3 requests with different images
through ``LLM.generate`` with ``hf_overrides={"vtoolkit": ...}`` keeps the same tokens (the plugin's trace) and
generates the same first greedy tokens as vtoolkit's HF path; the prompt is pruned to the same length. ``none``:
the same models without a ``vtoolkit`` entry are stock vLLM and equal HF's unpruned run.
"""
from __future__ import annotations

import json

import pytest
from PIL import Image

from conftest import make_llm

TIE = 1e-2   # logit margin below which two engines' float round-off may pick either token


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("method", ["fastervlm", "random", "none"])
def test_vllm_plugin_equals_hf_path(fixtures, trace_file, arch, method):
    from vllm import SamplingParams

    exp = json.loads((fixtures / "expected.json").read_text())[arch][method]
    # random seeds from the processor's normalised pixels: Qwen2-VL's in-model normalisation must be off
    kw = {"mm_device_do_normalize": False} if arch.startswith("qwen") and method == "random" else {}
    llm = make_llm(fixtures / arch, None if method == "none" else {"method": method, **exp["options"]}, **kw)
    rows = exp["rows"]
    images = [Image.open(r["image"]).convert("RGB") for r in rows]
    reqs = [{"prompt": r["prompt"], "multi_modal_data": {"image": im}} for r, im in zip(rows, images)]
    trace_file.write_text("")
    outs = llm.generate(reqs, SamplingParams(temperature=0, max_tokens=len(rows[0]["tokens"]), ignore_eos=True))
    lines = [json.loads(line) for line in trace_file.read_text().splitlines()]
    traced = [t for t in lines if "kept" in t]
    mrope = {len(t["mrope"][0]): t["mrope"] for t in lines if "mrope" in t}    # last repair per prompt length
    if arch.startswith("qwen") and method != "none":
        # the M-RoPE positions the LLM gets: each kept token keeps its unpruned (t, h, w), text after the image
        # continues after the whole image, exactly as vtoolkit's HF path (``positions="original"``)
        for r in rows:
            assert mrope[r["prompt_len"]] == r["mrope"], (r["image"], mrope[r["prompt_len"]], r["mrope"])
    by_image = {t["image"]: t for t in traced}
    if method == "none":        # no vtoolkit entry: stock vLLM (the plugin's classes prune nothing, record nothing)
        assert traced == []
    else:
        assert len(by_image) == 3, traced
    for r, out in zip(rows, outs):
        assert len(out.prompt_token_ids) == r["prompt_len"], (r["image"], len(out.prompt_token_ids), r["prompt_len"])
        got = list(out.outputs[0].token_ids)
        j = next((i for i, (a, b) in enumerate(zip(got, r["tokens"])) if a != b), None)
        # equal greedy tokens; a difference only at a step where HF's top-2 logits were a near tie (float round-off
        # between two engines may pick either), after which the continuations are not comparable
        assert j is None or r["margins"][j] < TIE, (r["image"], got, r["tokens"], r["margins"])
    # kept indices, matched by image: the plugin fingerprints vLLM's pixels as the HF side did its own (a missing
    # key means the two processors made different pixels)
    # (fastervlm on Qwen2-VL: vLLM normalises in the model by default, so its pixels differ in the last bits and
    # images are matched by their token count and pixel sum instead; the scores do not depend on those bits)
    for r in rows if method != "none" else []:
        if r["image_id"] in by_image:
            got = by_image[r["image_id"]]
        else:
            assert arch.startswith("qwen") and method == "fastervlm", f"{r['image']}: vLLM's pixels differ from HF's"
            (got,) = [t for t in traced if t["before"] == r["before"]]
        assert got["kept"] == r["kept"], (r["image"], got["kept"], r["kept"])
        assert got["before"] == r["before"]
