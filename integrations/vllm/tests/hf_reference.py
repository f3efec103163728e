"""HF side of the equivalence test (runs in vtoolkit's environment, not vLLM's).

    python integrations/vllm/tests/hf_reference.py OUT

Writes once, for LLaVA, Qwen2-VL and Qwen2.5-VL, a tiny random model with head_dim 32 (vLLM's CPU attention needs >= 32:
``TinySpec(text_heads=2)``) with ``save_pretrained`` in the layout vLLM loads (CLIP keys under
``vision_tower.vision_model``; Qwen2-VL's processor with its video processor), three test images, and
``expected.json``: for each method, the prompt, the kept indices (``h.stats["kept_indices"]``), the first greedy
tokens of vtoolkit's HF path (``apply_method``) per image and each step's top-1 - top-2 logit margin (a step whose
margin is below float round-off between two engines is a tie: the test compares the tokens before it).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

import vtoolkit as vt
import vtoolkit_core
from vtoolkit.models import tiny
from vtoolkit.models.base import get_adapter

ARCHS = ("llava", "qwen2_vl", "qwen2_5_vl")
METHODS = {"fastervlm": {"keep_tokens": 8}, "random": {"keep_tokens": 8, "seed": 3}, "none": {}}
# sizes both processors map exactly (LLaVA: shortest edge already 112, centre crop; Qwen2-VL: multiples of 28):
# a fractional resize makes pixels that differ in the last bits between transformers releases (vLLM's 5.19,
# vtoolkit's 5.25), and the random pruner seeds from those bits
SIZES = [(168, 112), (112, 112), (224, 112)]
QUESTIONS = ["Is there a dog?", "Describe this image in detail, please.", "Cat?"]
NEW_TOKENS = 6
SPEC = tiny.TinySpec(text_heads=2)


def clip_key(k: str) -> str:
    """transformers saves the CLIP tower as ``[model.]vision_tower.embeddings.*``; vLLM's LLaVA loads
    ``vision_tower.vision_model.*``."""
    for pre in ("model.vision_tower.", "vision_tower."):
        if k.startswith(pre) and not k.startswith(pre + "vision_model."):
            return pre + "vision_model." + k[len(pre):]
    return k


def save(arch: str, out: Path):
    model, proc = tiny.build(arch, spec=SPEC)
    d = out / arch
    model.save_pretrained(d)
    if arch in ("llava", "llava_next"):
        from safetensors.torch import load_file, save_file

        f = d / "model.safetensors"
        sd = load_file(f)
        sd = {clip_key(k): v for k, v in sd.items()}
        save_file(sd, f, metadata={"format": "pt"})
        proc.save_pretrained(d)
    else:
        from transformers import Qwen2VLVideoProcessor

        cls = type(proc).__mro__[1]      # tiny's image-only subclass -> the real processor class
        real = cls(image_processor=proc.image_processor, tokenizer=proc.tokenizer,
                                video_processor=Qwen2VLVideoProcessor(), chat_template=proc.chat_template)
        real.save_pretrained(d)
    # the processor as saved and loaded back, as vLLM loads it: the in-memory tiny one may be another backend
    # (PIL vs torchvision) whose pixels differ in the last bits, and the random pruner seeds from those bits
    from transformers import AutoProcessor

    return model, AutoProcessor.from_pretrained(d)


def main(out: Path):
    out.mkdir(parents=True, exist_ok=True)
    images = []
    for i, size in enumerate(SIZES):
        p = out / f"image{i}.png"
        tiny.demo_image(i, size).save(p)
        images.append(p)
    from PIL import Image

    expected = {}
    for arch in ARCHS:
        model, proc = save(arch, out)
        adapter = get_adapter(model)
        expected[arch] = {}
        for method, opts in METHODS.items():
            rows = []
            for i, p in enumerate(images):
                img = Image.open(p).convert("RGB")
                prompt = adapter.format_prompt(proc, QUESTIONS[i])
                inputs = adapter.prepare_inputs(proc, [img], [QUESTIONS[i]])
                seen: list = []
                with vt.apply_method(model, method, **opts) as h, torch.no_grad():
                    # after vtoolkit's own pre-hook on the language model: sees the pruned sequence's positions
                    grab = model.model.language_model.register_forward_pre_hook(
                        lambda m, a, kw, seen=seen: seen.append(kw.get("position_ids")), with_kwargs=True)
                    res = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, output_scores=True,
                                         return_dict_in_generate=True)
                    gen = res.sequences
                    top2 = [sc[0].float().topk(2).values for sc in res.scores]
                    n_img = int((inputs["input_ids"][0] == adapter.image_token_id).sum())
                    (kept,) = h.stats.get("kept_indices", [[torch.arange(n_img)]])[0]
                    before = h.stats.get("visual_tokens_before", [n_img])[0]
                grab.remove()
                mrope = seen[0][-3:, 0].tolist() if arch.startswith("qwen") else None   # prefill positions the LLM saw
                rows.append({"mrope": mrope, "image": str(p), "image_id": vtoolkit_core.image_seed(adapter.image_pixels(inputs, 0), 0),
                             "prompt": prompt, "kept": kept.tolist(), "before": int(before),
                             "tokens": gen[0, inputs["input_ids"].shape[1]:].tolist(),
                             "margins": [float(t[0] - t[1]) for t in top2],
                             "prompt_len": int(inputs["input_ids"].shape[1]) - int(before) + len(kept)})
            expected[arch][method] = {"options": opts, "rows": rows}
    # a family the plugin does not serve (saved only: the bad-configuration test loads it with a vtoolkit entry)
    save("llava_next", out)
    (out / "expected.json").write_text(json.dumps(expected, indent=1))
    print("wrote", out / "expected.json")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
