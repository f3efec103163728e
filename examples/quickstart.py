"""Quickstart: apply a method to a (tiny, offline) LLaVA, generate, inspect what it did, remove it.

Run: python examples/quickstart.py [--arch llava|llava_next|qwen2_vl|qwen2_5_vl] [--method fastervlm] [--set keep_ratio=0.25]
An architecture the method does not support (``vtoolkit list``), or a bad option, is refused before building.
With a real checkpoint, replace the tiny build by
    model = AutoModelForImageTextToText.from_pretrained("llava-hf/llava-1.5-7b-hf", dtype=torch.float16, device_map="auto")
    processor = AutoProcessor.from_pretrained("llava-hf/llava-1.5-7b-hf")
"""
from __future__ import annotations

import argparse
import time

import torch

import vtoolkit as vt
from vtoolkit.config import ConfigError, parse_overrides
from vtoolkit.eval.validate import check_method_model, method_config, method_name


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="llava", choices=vt.models.tiny.ARCHS,
                    help="tiny model architecture (the model types each method supports: vtoolkit list)")
    ap.add_argument("--method", default="fastervlm")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--max-new-tokens", type=int, default=8)
    args = ap.parse_args(argv)
    try:   # everything the registry can tell, before building the model
        method = method_name(args.method)
        check_method_model(method, args.arch)
        overrides = parse_overrides(args.set)
        method_config(method, overrides)
    except ConfigError as e:
        ap.error(str(e))

    model, processor = vt.models.tiny.build(args.arch)
    adapter = vt.models.get_adapter(model)
    images = [vt.models.tiny.demo_image(i, (160 + 20 * i, 120)) for i in range(3)]
    questions = ["Is there a dog in the image?", "Describe this image in detail.", "Is there a car?"]
    batch = adapter.prepare_inputs(processor, images, questions)
    n_prompt = batch["input_ids"].shape[1]

    with torch.inference_mode():
        t0 = time.perf_counter()
        base = model.generate(**batch, max_new_tokens=args.max_new_tokens, do_sample=False)
        t_base = time.perf_counter() - t0
        with vt.apply_method(model, method, **overrides) as handle:
            t0 = time.perf_counter()
            out = model.generate(**batch, max_new_tokens=args.max_new_tokens, do_sample=False)
            t_method = time.perf_counter() - t0
            stats = handle.stats
        again = model.generate(**batch, max_new_tokens=args.max_new_tokens, do_sample=False)

    print(f"model: tiny {args.arch} (random weights), batch of {len(questions)}, method {handle!r}")
    print(f"visual tokens per sample before -> after: {stats.get('visual_tokens_before')} -> "
          f"{stats.get('visual_tokens_after')}")
    agree = (base[:, n_prompt:] == out[:, n_prompt:]).float().mean().item()
    print(f"generate: baseline {t_base * 1e3:.1f} ms, {method} {t_method * 1e3:.1f} ms; token agreement with "
          f"baseline {agree:.0%} (random weights: text is noise, agreement is the signal)")
    print("after remove(), generate is identical to the baseline:", torch.equal(again, base))


if __name__ == "__main__":
    main()
