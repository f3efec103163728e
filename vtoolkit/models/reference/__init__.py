"""vtoolkit's reference model, ``ref:shapes``: a small LLaVA-1.5 that really sees, shipped in this folder.

Stock Hugging Face classes (``LlavaForConditionalGeneration`` + ``LlavaProcessor``), so every vtoolkit method runs
on it unchanged: a 6-layer CLIP ViT (64 x 64 px, patch 8: 64 patches + [CLS], features from layer -2), a 2-layer MLP
projector and a 4-layer Llama, with a byte-level BPE tokenizer built locally. Trained on the procedural scenes of
:mod:`vtoolkit.data.scenes` (ViT CLIP-style first, then projector + LLM LLaVA-style) by
``examples/train_reference.py``; the README states its training time and measured quality.

The weights are stored as float16 safetensors; ``config.json`` says float32, so ``from_pretrained`` returns the
float32 model that was evaluated. Everything loads offline from this folder.

Wherever vtoolkit takes a checkpoint path or hub id, the name ``ref:shapes`` works too (``vtoolkit eval --model
ref:shapes``, sweeps, the lmms-eval plugin's ``pretrained=ref:shapes``, :func:`vtoolkit.eval.runner.load_model`):

>>> from vtoolkit.models import reference
>>> model, processor = reference.load()                                   # doctest: +SKIP
>>> AutoModelForImageTextToText.from_pretrained(reference.resolve("ref:shapes"))   # doctest: +SKIP
"""
from __future__ import annotations

from pathlib import Path

NAME = "ref:shapes"
PREFIX = "ref:"
DIR = Path(__file__).resolve().parent

__all__ = ["DIR", "NAME", "cls_attention_on_objects", "is_reference", "load", "resolve"]


def is_reference(name) -> bool:
    """Whether ``name`` names a reference model (``ref:...``)."""
    return isinstance(name, str) and name.strip().lower().startswith(PREFIX)


def resolve(name: str) -> str:
    """The local checkpoint folder of a reference-model name; any other string is returned unchanged."""
    if not is_reference(name):
        return name
    if name.strip().lower() != NAME:
        raise ValueError(f"unknown reference model {name!r}; the shipped one is {NAME!r}")
    if not (DIR / "model.safetensors").is_file():
        raise FileNotFoundError(f"{NAME}: {DIR / 'model.safetensors'} is missing (a source checkout without the "
                                f"tracked checkpoint, or a wheel built without package data)")
    return str(DIR)


def load(name: str = NAME, dtype=None, device=None):
    """``(model, processor)`` of the reference model, offline, in eval mode (float32 unless ``dtype`` is given);
    the tokenizer pads on the left, as the harness expects."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if not is_reference(name):
        raise ValueError(f"{name!r} is not a reference-model name ({NAME!r}); load other checkpoints with "
                         f"AutoModelForImageTextToText / vtoolkit.eval.runner.load_model")
    path = resolve(name)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype or torch.float32).eval()
    if device is not None:
        model.to(device)
    processor = AutoProcessor.from_pretrained(path)
    processor.tokenizer.padding_side = "left"
    return model, processor


def cls_attention_on_objects(vision, pixel_values, scenes, layer: int, keep_ratio: float = 0.25) -> dict:
    """Where a CLIP tower's [CLS] query looks in ``layer`` (FasterVLM's score: mean over heads of the CLS row, CLS
    column excluded) on rendered ``scenes`` (:mod:`vtoolkit.data.scenes`), against the objects' true patches:

    - ``cls_mass_on_objects``: share of that attention on patches at least half covered by an object, vs
      ``object_patch_share``, those patches' share of the image;
    - ``top_on_objects``: share of the top ``keep_ratio`` patches by that attention (what FasterVLM keeps) that touch
      an object, vs ``any_object_share``, the share of all patches that do (what random selection keeps on average).
    """
    import numpy as np
    import torch

    from vtoolkit.data.scenes import CANVAS, patch_coverage

    old = vision.config._attn_implementation
    vision.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            att = vision(pixel_values=pixel_values, output_attentions=True).attentions[layer]
    finally:
        vision.set_attn_implementation(old)
    a = att[:, :, 0, 1:].mean(1).float().cpu().numpy()
    a = a / a.sum(1, keepdims=True)
    grid = round(a.shape[1] ** 0.5)
    if grid * grid != a.shape[1] or CANVAS % grid:
        raise ValueError(f"{a.shape[1]} patches do not tile the {CANVAS} px canvas")
    cover = np.stack([patch_coverage(s, grid) for s in scenes])
    obj = cover >= 0.5
    top = np.argsort(-a, 1)[:, : max(1, round(keep_ratio * grid * grid))]
    return {"cls_mass_on_objects": float((a * obj).sum(1).mean()), "object_patch_share": float(obj.mean()),
            "top_on_objects": float(np.take_along_axis(cover > 0, top, 1).mean()),
            "any_object_share": float((cover > 0).mean())}
