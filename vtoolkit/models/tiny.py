"""Offline tiny random models for tests, examples and the demo.

``build(arch, seed=0)`` returns ``(model, processor)`` for ``llava``, ``llava_next``, ``qwen2_vl``, ``qwen2_5_vl``,
``qwen3_vl``, ``llava_onevision`` and ``internvl``, built from configs with a locally trained byte-level BPE tokenizer and a local image processor: no
network, no weights on disk, deterministic for a seed.

The models are small but keep the structure that methods depend on: a CLIP tower with a CLS token and several layers
(features from layer -2, as LLaVA), LLaVA-NeXT anyres crops with ``image_newline``, Qwen ViTs with 2x2 patch merging
(Qwen2.5-VL with window attention and one full-attention block; Qwen3-VL with DeepStack features of two ViT layers
added after the first two LLM layers and interleaved M-RoPE), LLaVA-OneVision (SigLIP without CLS, features of the
last layer, anyres-max tiling with unpadding and ``image_newline``, a Qwen2 LLM), InternVL (InternViT with a CLS token,
dynamic tiles plus a thumbnail, 2x2 pixel shuffle -> one token, ``<img><IMG_CONTEXT>...</img>``, a Qwen2 LLM), GQA in
the Qwen LLMs, and >= 4 LLM layers.

Weights use a larger initializer range than HF's default (0.02) so that random logits are well separated: greedy
decoding of a near-uniform distribution would turn float round-off into token flips and make equivalence tests flaky.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

ARCHS = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_onevision", "internvl")

_TRAIN_TEXTS = [
    "USER: <image>\nIs there a dog in the image? Answer the question using a single word or phrase. ASSISTANT: Yes",
    "Is there a cat in the image? No. Describe this image in detail. A man riding a bike on the street.",
    "The quick brown fox jumps over the lazy dog. 0123456789 person car chair table bottle cup",
    "Please describe this image in detail. Generate a short caption of this image. Is there a person?",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWhat is this?<|im_end|>\n"
    "<|im_start|>assistant\n",
]
QWEN_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
QWEN_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class TinySpec:
    """Sizes of a tiny model. Defaults keep one forward in the tens of milliseconds on 2 CPU cores."""

    image_size: int = 112          # CLIP input (LLaVA / NeXT base crop); 8 x 8 = 64 patches with patch 14
    patch: int = 14
    vision_layers: int = 3
    vision_hidden: int = 64
    vision_heads: int = 4
    text_layers: int = 4
    text_hidden: int = 64
    text_heads: int = 4
    text_kv_heads: int | None = None   # None: MHA for LLaVA, GQA (heads // 2) for Qwen
    intermediate: int = 128
    init_range: float = 0.2
    qwen_max_pixels: int = 224 * 224
    qwen_min_pixels: int = 56 * 56


@functools.cache
def _tokenizer_json(specials: tuple[str, ...], bos: str | None, eos: str, pad: str, add_bos: bool) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    base = [t for t in dict.fromkeys([bos, eos, pad]) if t]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=base + list(specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_TRAIN_TEXTS * 10, trainer=trainer)
    if add_bos and bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    return tok.to_str()


def build_tokenizer(specials, bos="<s>", eos="</s>", pad="<pad>", add_bos=True):
    """A byte-level BPE tokenizer trained on a few prompts: encodes any text, special tokens are single ids."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_str(_tokenizer_json(tuple(specials), bos, eos, pad, add_bos))
    kw = dict(tokenizer_object=tok, eos_token=eos, pad_token=pad)
    if bos:
        kw["bos_token"] = bos
    hf = PreTrainedTokenizerFast(**kw)
    hf.padding_side = "left"
    return hf


def _image_only(proc_cls):
    """Qwen processor without a video processor (the video processor needs torchvision; images do not)."""

    class ImageOnly(proc_cls):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            kwargs.pop("video_processor", None)
            super().__init__(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                             chat_template=chat_template, **kwargs)

    ImageOnly.__name__ = ImageOnly.__qualname__ = "ImageOnly" + proc_cls.__name__
    return ImageOnly


def _clip_config(s: TinySpec):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=s.vision_hidden, intermediate_size=s.vision_hidden * 4,
                            num_hidden_layers=s.vision_layers, num_attention_heads=s.vision_heads,
                            image_size=s.image_size, patch_size=s.patch, projection_dim=s.vision_hidden,
                            initializer_range=s.init_range)


def _llama_config(s: TinySpec, tok, max_pos=8192):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tok), hidden_size=s.text_hidden, intermediate_size=s.intermediate,
                       num_hidden_layers=s.text_layers, num_attention_heads=s.text_heads,
                       num_key_value_heads=s.text_kv_heads or s.text_heads, max_position_embeddings=max_pos,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                       initializer_range=s.init_range)


def _build_llava(s: TinySpec):
    from transformers import CLIPImageProcessorPil, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tok = build_tokenizer(["<image>"])
    cfg = LlavaConfig(vision_config=_clip_config(s), text_config=_llama_config(s, tok),
                      image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
                      vision_feature_select_strategy="default", initializer_range=s.init_range)
    model = LlavaForConditionalGeneration(cfg)
    ip = CLIPImageProcessorPil(size={"shortest_edge": s.image_size},
                               crop_size={"height": s.image_size, "width": s.image_size})
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=s.patch,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1)
    return model, proc


def _build_llava_next(s: TinySpec):
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
    )

    tok = build_tokenizer(["<image>"])
    n = s.image_size
    pinpoints = [[n, 2 * n], [2 * n, n], [2 * n, 2 * n]]
    cfg = LlavaNextConfig(vision_config=_clip_config(s), text_config=_llama_config(s, tok),
                          image_token_index=tok.convert_tokens_to_ids("<image>"), image_grid_pinpoints=pinpoints,
                          vision_feature_layer=-2, vision_feature_select_strategy="default",
                          image_seq_length=(n // s.patch) ** 2, initializer_range=s.init_range)
    model = LlavaNextForConditionalGeneration(cfg)
    ip = LlavaNextImageProcessorPil(size={"shortest_edge": n}, crop_size={"height": n, "width": n},
                                    image_grid_pinpoints=pinpoints)
    proc = LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=s.patch,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1)
    return model, proc


def _build_qwen(arch: str, s: TinySpec):
    from transformers import Qwen2VLImageProcessorPil

    tok = build_tokenizer(QWEN_SPECIALS, bos=None, eos="<|endoftext|>", pad="<|endoftext|>", add_bos=False)
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    heads = s.text_heads
    kv = s.text_kv_heads or max(1, heads // 2)
    head_dim = s.text_hidden // heads
    half = head_dim // 2
    section = [half - 2 * (half // 4), half // 4, half // 4]   # (t, h, w), sums to head_dim / 2
    text = dict(vocab_size=len(tok), hidden_size=s.text_hidden, intermediate_size=s.intermediate,
                num_hidden_layers=s.text_layers, num_attention_heads=heads, num_key_value_heads=kv,
                max_position_embeddings=32768, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                initializer_range=s.init_range)
    common = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    patch = 14
    if arch == "qwen2_vl":
        from transformers import Qwen2VLConfig as Config
        from transformers import Qwen2VLForConditionalGeneration as Model
        from transformers import Qwen2VLProcessor as Proc

        text.update(rope_parameters={"rope_type": "default", "mrope_section": section, "rope_theta": 1e6},
                    bos_token_id=None)
        vision = dict(depth=s.vision_layers, embed_dim=s.vision_hidden, hidden_size=s.text_hidden,
                      num_heads=s.vision_heads, patch_size=patch, spatial_merge_size=2, temporal_patch_size=2,
                      initializer_range=s.init_range)
    elif arch == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig as Config
        from transformers import Qwen2_5_VLForConditionalGeneration as Model
        from transformers import Qwen2_5_VLProcessor as Proc

        text.update(rope_parameters={"rope_type": "default", "mrope_section": section, "rope_theta": 1e6},
                    bos_token_id=None)
        vision = dict(depth=s.vision_layers, hidden_size=s.vision_hidden, out_hidden_size=s.text_hidden,
                      intermediate_size=s.vision_hidden * 2, num_heads=s.vision_heads, patch_size=patch,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                      fullatt_block_indexes=[s.vision_layers - 1], initializer_range=s.init_range)
    elif arch == "qwen3_vl":
        from transformers import Qwen3VLConfig as Config
        from transformers import Qwen3VLForConditionalGeneration as Model
        from transformers import Qwen3VLProcessor as Proc

        patch = 16
        text.update(head_dim=head_dim, rope_parameters={"rope_type": "default", "mrope_section": section,
                                                         "mrope_interleaved": True, "rope_theta": 5e6})
        vision = dict(depth=s.vision_layers, hidden_size=s.vision_hidden, intermediate_size=s.vision_hidden * 2,
                      num_heads=s.vision_heads, patch_size=patch, spatial_merge_size=2, temporal_patch_size=2,
                      out_hidden_size=s.text_hidden, num_position_embeddings=576,
                      deepstack_visual_indexes=list(range(min(2, s.vision_layers))),
                      initializer_range=s.init_range)
    else:  # pragma: no cover - guarded by build()
        raise ValueError(arch)
    cfg = Config(text_config=text, vision_config=vision, **common)
    model = Model(cfg)
    ip = Qwen2VLImageProcessorPil(min_pixels=s.qwen_min_pixels, max_pixels=s.qwen_max_pixels, patch_size=patch,
                                  temporal_patch_size=2, merge_size=2)
    proc = _image_only(Proc)(image_processor=ip, tokenizer=tok, chat_template=QWEN_CHAT_TEMPLATE)
    return model, proc


def _qwen2_text(s: TinySpec, tok) -> dict:
    heads = s.text_heads
    return dict(model_type="qwen2", vocab_size=len(tok), hidden_size=s.text_hidden, intermediate_size=s.intermediate,
                num_hidden_layers=s.text_layers, num_attention_heads=heads,
                num_key_value_heads=s.text_kv_heads or max(1, heads // 2), max_position_embeddings=32768,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None,
                initializer_range=s.init_range, tie_word_embeddings=False)


ONEVISION_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
INTERNVL_CHAT_TEMPLATE = ONEVISION_CHAT_TEMPLATE.replace("<image>\n", "<IMG_CONTEXT>\n")


def _build_llava_onevision(s: TinySpec):
    """SigLIP (no CLS, features of the last layer, ``vision_feature_select_strategy="full"``), anyres-max tiling over
    pinpoints of 1x1 .. 2x2 base crops, unpadding and ``image_newline``, a Qwen2 LLM: as llava-onevision-qwen2."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessorPil,
        LlavaOnevisionProcessor,
        SiglipVisionConfig,
    )

    specials = ["<|im_start|>", "<|im_end|>", "<image>", "<video>"]
    tok = build_tokenizer(specials, bos=None, eos="<|im_end|>", pad="<|endoftext|>", add_bos=False)
    n = s.image_size
    patch = 2 * s.patch      # 4 x 4 patches per crop: the tiled, unpadded sequences stay short (suite time)
    pinpoints = [[n, n], [n, 2 * n], [2 * n, n], [2 * n, 2 * n]]
    vision = SiglipVisionConfig(hidden_size=s.vision_hidden, intermediate_size=s.vision_hidden * 4,
                                num_hidden_layers=s.vision_layers, num_attention_heads=s.vision_heads,
                                image_size=n, patch_size=patch, vision_use_head=False)
    cfg = LlavaOnevisionConfig(vision_config=vision, text_config=_qwen2_text(s, tok),
                               image_token_index=tok.convert_tokens_to_ids("<image>"),
                               video_token_index=tok.convert_tokens_to_ids("<video>"),
                               vision_feature_layer=-1, vision_feature_select_strategy="full",
                               image_grid_pinpoints=pinpoints, vision_aspect_ratio="anyres_max_9")
    cfg.initializer_range = s.init_range
    cfg.text_config.initializer_range = s.init_range
    model = LlavaOnevisionForConditionalGeneration(cfg)
    _reinit(model, s.init_range)
    ip = LlavaOnevisionImageProcessorPil(size={"height": n, "width": n}, image_grid_pinpoints=pinpoints,
                                         image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    proc = _image_only(LlavaOnevisionProcessor)(image_processor=ip, tokenizer=tok,
                                                num_image_tokens=(n // patch) ** 2,
                                                vision_feature_select_strategy="full",
                                                vision_aspect_ratio="anyres_max_9",
                                                chat_template=ONEVISION_CHAT_TEMPLATE)
    return model, proc


def _build_internvl(s: TinySpec):
    """InternViT (CLS token; features of the last layer without it), dynamic tiles of ``image_size`` px (448 in
    InternVL3, 112 here) plus a thumbnail, pixel shuffle 2x2 -> 1 token (``downsample_ratio=0.5``), an MLP projector,
    ``<img><IMG_CONTEXT>*n</img>`` placeholders and a Qwen2 LLM: as InternVL3-1B-hf."""
    from tokenizers import Tokenizer
    from transformers import (
        GotOcr2ImageProcessorPil,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLProcessor,
        InternVLVisionConfig,
        PreTrainedTokenizerFast,
    )

    specials = ["<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"]
    tok_obj = Tokenizer.from_str(_tokenizer_json(tuple(specials), None, "<|im_end|>", "<|endoftext|>", False))
    tok = PreTrainedTokenizerFast(tokenizer_object=tok_obj, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  extra_special_tokens={"start_image_token": "<img>", "end_image_token": "</img>",
                                                        "context_image_token": "<IMG_CONTEXT>",
                                                        "video_token": "<video>"})
    n = s.image_size
    vision = InternVLVisionConfig(hidden_size=s.vision_hidden, intermediate_size=s.vision_hidden * 4,
                                  num_hidden_layers=s.vision_layers, num_attention_heads=s.vision_heads,
                                  image_size=[n, n], patch_size=[s.patch, s.patch], initializer_range=s.init_range,
                                  use_mean_pooling=False)
    seq = (n // s.patch) ** 2 // 4
    cfg = InternVLConfig(vision_config=vision, text_config=_qwen2_text(s, tok),
                         image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"), image_seq_length=seq,
                         downsample_ratio=0.5, vision_feature_layer=-1, vision_feature_select_strategy="default",
                         tie_word_embeddings=False)
    model = InternVLForConditionalGeneration(cfg)
    _reinit(model, s.init_range)
    ip = GotOcr2ImageProcessorPil(size={"height": n, "width": n}, crop_to_patches=True, min_patches=1,
                                  max_patches=4, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    proc = _image_only(InternVLProcessor)(image_processor=ip, tokenizer=tok, image_seq_length=seq,
                                          chat_template=INTERNVL_CHAT_TEMPLATE)
    return model, proc


def _reinit(model, std: float) -> None:
    """Normal(0, std) weights for every Linear / Embedding (HF's init uses each sub-config's own 0.02)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)):
                m.weight.normal_(0.0, std)


def build(arch: str = "llava", seed: int = 0, spec: TinySpec | None = None, dtype: torch.dtype = torch.float32):
    """Build ``(model, processor)`` for a tiny random ``arch`` offline; identical weights for identical ``seed``.

    >>> model, processor = build("llava")
    """
    if arch not in ARCHS:
        import difflib

        close = difflib.get_close_matches(arch, ARCHS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"Unknown tiny architecture {arch!r}.{hint} Choose one of {', '.join(ARCHS)}.")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    s = spec or TinySpec()
    rng_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        if arch == "llava":
            model, proc = _build_llava(s)
        elif arch == "llava_next":
            model, proc = _build_llava_next(s)
        elif arch == "llava_onevision":
            model, proc = _build_llava_onevision(s)
        elif arch == "internvl":
            model, proc = _build_internvl(s)
        else:
            model, proc = _build_qwen(arch, s)
    finally:
        torch.random.set_rng_state(rng_state)
    proc.tokenizer.padding_side = "left"
    model = model.to(dtype).eval()
    return model, proc


_VIDEO_PROCESSORS = {"qwen2_vl": "Qwen2VLVideoProcessor", "qwen2_5_vl": "Qwen2VLVideoProcessor",
                     "qwen3_vl": "Qwen3VLVideoProcessor", "llava_onevision": "LlavaOnevisionVideoProcessor",
                     "internvl": "InternVLVideoProcessor"}


def save_checkpoint(arch: str, path, seed: int = 0) -> None:
    """Write a tiny model as a checkpoint folder laid out like a hub one: ``save_pretrained`` of the model and of the
    family's stock processor class (with its video processor, which needs torchvision), so that
    ``AutoModelForImageTextToText`` / ``AutoProcessor.from_pretrained(path)`` - the code path of a real checkpoint,
    ``vtoolkit eval --model PATH`` - load it offline. (``build`` returns an image-only processor subclass that
    ``AutoProcessor`` could not resolve by name.)"""
    import transformers

    model, proc = build(arch, seed=seed)
    if arch in _VIDEO_PROCESSORS:
        stock = type(proc).__mro__[1]
        kw = {k: getattr(proc, k) for k in ("num_image_tokens", "vision_feature_select_strategy",
                                            "vision_aspect_ratio", "image_seq_length") if hasattr(proc, k)}
        video = getattr(transformers, _VIDEO_PROCESSORS[arch])()
        proc = stock(image_processor=proc.image_processor, tokenizer=proc.tokenizer, video_processor=video,
                     chat_template=proc.chat_template, **kw)
    model.save_pretrained(path)
    proc.save_pretrained(path)


def demo_image(seed: int = 0, size: tuple[int, int] = (160, 120)):
    """A deterministic synthetic RGB image (PIL), so demos and tests need no data download."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * (3 + seed) + yy) % 256, (yy * (2 + seed)) % 256, (xx ^ yy) % 256], -1)
    noise = rng.integers(0, 64, size=(h, w, 3))
    return Image.fromarray(((base + noise) % 256).astype("uint8"), "RGB")
