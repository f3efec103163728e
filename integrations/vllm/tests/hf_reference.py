"""HF side of the equivalence test (runs in vtoolkit's environment, not vLLM's).

    python integrations/vllm/tests/hf_reference.py OUT

Writes once, for LLaVA and Qwen2-VL, a tiny random model with head_dim 32 (vLLM's CPU attention needs >= 32:
``TinySpec(text_heads=2)``) with ``save_pretrained`` in the layout vLLM loads (CLIP keys under
``vision_tower.vision_model``; Qwen2-VL's processor with its video processor), three test images, and
``expected.json``: for each method, the prompt, the kept indices (``h.stats["kept_indices"]``) and the first greedy
tokens of vtoolkit's HF path (``apply_method``) per image.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

import vtoolkit as vt
from vtoolkit.models import tiny
from vtoolkit.models.base import get_adapter

ARCHS = ("llava", "qwen2_vl")
METHODS = {"fastervlm": {"keep_tokens": 8}, "random": {"keep_tokens": 8, "seed": 3}}
SIZES = [(160, 120), (200, 100), (120, 120)]
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
    if arch == "llava":
        from safetensors.torch import load_file, save_file

        f = d / "model.safetensors"
        sd = load_file(f)
        sd = {clip_key(k): v for k, v in sd.items()}
        save_file(sd, f, metadata={"format": "pt"})
        proc.save_pretrained(d)
    else:
        from transformers import Qwen2VLProcessor, Qwen2VLVideoProcessor

        real = Qwen2VLProcessor(image_processor=proc.image_processor, tokenizer=proc.tokenizer,
                                video_processor=Qwen2VLVideoProcessor(), chat_template=proc.chat_template)
        real.save_pretrained(d)
    return model, proc


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
                with vt.apply_method(model, method, **opts) as h, torch.no_grad():
                    gen = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
                    (kept,) = h.stats["kept_indices"][0]
                    before = h.stats["visual_tokens_before"][0]
                rows.append({"image": str(p), "prompt": prompt, "kept": kept.tolist(), "before": int(before),
                             "tokens": gen[0, inputs["input_ids"].shape[1]:].tolist(),
                             "prompt_len": int(inputs["input_ids"].shape[1]) - int(before) + len(kept)})
            expected[arch][method] = {"options": opts, "rows": rows}
    (out / "expected.json").write_text(json.dumps(expected, indent=1))
    print("wrote", out / "expected.json")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
