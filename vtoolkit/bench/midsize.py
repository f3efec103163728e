"""A random-weight LLaVA-1.5-shaped model built offline: CLIP-L/336 tower + a Llama LLM (default 16 x 2048, bf16).

Weights are drawn with ``no_init_weights`` and one ``normal_`` per tensor in the target dtype (HF's per-module init
is ~2x slower on CPU). Shapes, not weights, decide latency, so this is what the pruning benchmark runs on.
"""
from __future__ import annotations

import torch


def config(llm_layers: int = 16, hidden: int = 2048, heads: int = 16, kv_heads: int = 16, intermediate: int = 5632,
           vocab: int = 32000, vision_layers: int = 24, vision_hidden: int = 1024, image_size: int = 336):
    """``(LlavaConfig, tokenizer)`` of the shape (nothing allocated)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    from vtoolkit.models.tiny import build_tokenizer

    tok = build_tokenizer(["<image>"])
    vcfg = CLIPVisionConfig(hidden_size=vision_hidden, intermediate_size=vision_hidden * 4,
                            num_hidden_layers=vision_layers, num_attention_heads=vision_hidden // 64,
                            image_size=image_size, patch_size=14, projection_dim=768)
    tcfg = LlamaConfig(vocab_size=max(vocab, len(tok)), hidden_size=hidden, intermediate_size=intermediate,
                       num_hidden_layers=llm_layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       max_position_embeddings=4096, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id)
    cfg = LlavaConfig(vision_config=vcfg, text_config=tcfg, image_token_id=tok.convert_tokens_to_ids("<image>"),
                      vision_feature_layer=-2, vision_feature_select_strategy="default")
    return cfg, tok


def build(llm_layers: int = 16, hidden: int = 2048, heads: int = 16, kv_heads: int = 16, intermediate: int = 5632,
          vocab: int = 32000, vision_layers: int = 24, vision_hidden: int = 1024, image_size: int = 336,
          dtype=torch.bfloat16, seed: int = 0, device="cpu"):
    """The random-weight model (``.eval()``) and its processor, allocated directly on ``device`` in ``dtype``."""
    from transformers import CLIPImageProcessorPil, LlavaForConditionalGeneration, LlavaProcessor

    cfg, tok = config(llm_layers, hidden, heads, kv_heads, intermediate, vocab, vision_layers, vision_hidden,
                      image_size)
    # allocated directly in ``dtype`` on ``device`` (no fp32 copy); rotary inv_freq stays fp32 as when loaded
    model = _allocate(LlavaForConditionalGeneration, cfg, dtype, seed, device)
    ip = CLIPImageProcessorPil(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1)
    return model.eval(), proc


def _allocate(model_cls, cfg, dtype, seed: int, device="cpu"):
    """``model_cls`` of ``cfg`` allocated directly in ``dtype`` on ``device`` (no fp32 copy), random weights: norm
    weights 1, other 1-D parameters 0, matrices N(0, 0.02) in place (no fp32 temporary); rotary inv_freq stays fp32."""
    from transformers.initialization import no_init_weights

    with no_init_weights(), torch.device(device):
        model = model_cls._from_config(cfg, dtype=dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0 if "norm" in name and "weight" in name else 0.0)
            else:   # in place in the target dtype: no fp32 temporary (the 65M-entry embedding alone is 262 MB)
                p.normal_(0.0, 0.02, generator=gen)
    return model.eval()


def tiny_shape():
    """A small stand-in with the same structure, for smoke tests of the benchmark itself."""
    return build(llm_layers=4, hidden=128, heads=4, kv_heads=2, intermediate=256, vocab=600, vision_layers=3,
                 vision_hidden=64, image_size=112, dtype=torch.float32)


# LLaVA-1.5-7B: CLIP ViT-L/14-336 (24 x 1024, 16 heads, MLP 4096) + Llama-2-7B (32 x 4096, 32 heads, MLP 11008)
LLAVA7B = dict(llm_layers=32, hidden=4096, heads=32, kv_heads=32, intermediate=11008, vocab=32000, vision_layers=24,
               vision_hidden=1024, image_size=336)


def llava7b_config():
    """``(LlavaConfig, tokenizer)`` with LLaVA-1.5-7B's dimensions (nothing allocated)."""
    return config(**LLAVA7B)


def llava7b(device="cuda", dtype=torch.bfloat16, seed: int = 0):
    """LLaVA-1.5-7B dims with random weights, in bf16 on a CUDA device (~14 GB). Refuses a CPU: building and running
    7B random weights there takes most of a small machine's memory and minutes per prefill."""
    if torch.device(device).type != "cuda":
        raise ValueError(f"llava7b is built on a CUDA device only, not {device!r} (use the midsize shape on a CPU)")
    return build(**LLAVA7B, dtype=dtype, seed=seed, device=device)


# -- the issue-19 families (`vtoolkit bench --arch ARCH`) ------------------------------------------------------------
# Each: the family's real vision tower layer shapes, a random LLM of the bench's size (default 16 x 2048, GQA with half
# the heads as key/value heads, as the families' 1-4B LLMs), bf16. The image side is reduced so that one prefill runs
# on a 2-core CPU in seconds (stated per family); the tower's layers, widths and merging are the real ones.
# - qwen3_vl: Qwen3-VL-2B/4B's ViT: 24 x 1024 (MLP 4096, 16 heads), patch 16, 2x2 merger, DeepStack at blocks
#   5, 11, 17; images resized to at most 384 x 384 px (144 LLM tokens; real: up to 16384 per image).
# - llava_onevision: llava-onevision-qwen2's SigLIP-so400m: 26 x 1152 (MLP 4304, 16 heads), patch 14, no CLS,
#   crops of 224 px (real 384) and pinpoints of 1x1 / 1x2 / 2x1 crops (real: up to 6x6, anyres_max_9), so an image
#   is a base crop + up to 2 tiles, unpadded, with image_newline.
# - internvl: InternVL3-1B/2B's InternViT-300M: 24 x 1024 (MLP 4096, 16 heads), patch 14, 448-px tiles with CLS,
#   pixel shuffle 2x2 -> 1 (256 tokens per tile); one tile per image (real: up to 12 + a thumbnail).
FAMILIES = ("qwen3_vl", "llava_onevision", "internvl")


def family(arch: str, llm_layers: int = 16, hidden: int = 2048, intermediate: int | None = None, vocab: int = 32000,
           dtype=torch.bfloat16, seed: int = 0, device="cpu", small: bool = False):
    """``(model, processor)`` of ``arch`` (one of :data:`FAMILIES`) at the bench's mid size; ``small``: a tiny stand-in
    with the same structure (smoke tests of the benchmark itself, fp32, seconds)."""
    if arch not in FAMILIES:
        raise ValueError(f"--arch must be one of {', '.join(FAMILIES)}, got {arch!r}")
    if small:
        llm_layers, hidden, intermediate, vocab, dtype = 4, 128, 256, 600, torch.float32
    heads = max(2, hidden // 128) if not small else 4
    text = dict(hidden=hidden, layers=llm_layers, heads=heads, kv=max(1, heads // 2),
                intermediate=intermediate or int(hidden * 2.75), vocab=vocab)
    build_fn = {"qwen3_vl": _qwen3_vl, "llava_onevision": _llava_onevision, "internvl": _internvl}[arch]
    cls, cfg, proc = build_fn(text, small)
    return _allocate(cls, cfg, dtype, seed, device), proc


def _qwen3_vl(t: dict, small: bool):
    from transformers import Qwen2VLImageProcessorPil, Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor

    from vtoolkit.models import tiny as T

    tok = T.build_tokenizer(T.QWEN_SPECIALS, bos=None, eos="<|endoftext|>", pad="<|endoftext|>", add_bos=False)
    ids = {x: tok.convert_tokens_to_ids(x) for x in T.QWEN_SPECIALS}
    head_dim = t["hidden"] // t["heads"]
    half = head_dim // 2
    section = [half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8]     # 128-dim heads: [24, 20, 20] as real
    text = dict(vocab_size=max(t["vocab"], len(tok)), hidden_size=t["hidden"], intermediate_size=t["intermediate"],
                num_hidden_layers=t["layers"], num_attention_heads=t["heads"], num_key_value_heads=t["kv"],
                head_dim=head_dim, max_position_embeddings=32768, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id, rope_parameters={"rope_type": "default", "mrope_section": section,
                                                                "mrope_interleaved": True, "rope_theta": 5e6})
    vdepth, vh, vheads = (3, 64, 4) if small else (24, 1024, 16)
    vision = dict(depth=vdepth, hidden_size=vh, intermediate_size=4 * vh, num_heads=vheads, patch_size=16,
                  spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=t["hidden"],
                  num_position_embeddings=2304, deepstack_visual_indexes=[0, 1] if small else [5, 11, 17])
    cfg = Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                        vision_end_token_id=ids["<|vision_end|>"])
    px = 128 if small else 384
    ip = Qwen2VLImageProcessorPil(min_pixels=64 * 64, max_pixels=px * px, patch_size=16, temporal_patch_size=2,
                                  merge_size=2)
    proc = T._image_only(Qwen3VLProcessor)(image_processor=ip, tokenizer=tok, chat_template=T.QWEN_CHAT_TEMPLATE)
    return Qwen3VLForConditionalGeneration, cfg, proc


def _qwen2_text(t: dict, tok) -> dict:
    return dict(model_type="qwen2", vocab_size=max(t["vocab"], len(tok)), hidden_size=t["hidden"],
                intermediate_size=t["intermediate"], num_hidden_layers=t["layers"], num_attention_heads=t["heads"],
                num_key_value_heads=t["kv"], max_position_embeddings=32768, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id, bos_token_id=None, tie_word_embeddings=False)


def _llava_onevision(t: dict, small: bool):
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessorPil,
        LlavaOnevisionProcessor,
        SiglipVisionConfig,
    )

    from vtoolkit.models import tiny as T

    tok = T.build_tokenizer(["<|im_start|>", "<|im_end|>", "<image>", "<video>"], bos=None, eos="<|im_end|>",
                            pad="<|endoftext|>", add_bos=False)
    n, patch = (56, 14) if small else (224, 14)
    layers, vh, mlp, vheads = (3, 64, 256, 4) if small else (26, 1152, 4304, 16)
    pinpoints = [[n, n], [n, 2 * n], [2 * n, n]]
    vision = SiglipVisionConfig(hidden_size=vh, intermediate_size=mlp, num_hidden_layers=layers,
                                num_attention_heads=vheads, image_size=n, patch_size=patch, vision_use_head=False)
    cfg = LlavaOnevisionConfig(vision_config=vision, text_config=_qwen2_text(t, tok),
                               image_token_index=tok.convert_tokens_to_ids("<image>"),
                               video_token_index=tok.convert_tokens_to_ids("<video>"),
                               vision_feature_layer=-1, vision_feature_select_strategy="full",
                               image_grid_pinpoints=pinpoints, vision_aspect_ratio="anyres_max_9")
    ip = LlavaOnevisionImageProcessorPil(size={"height": n, "width": n}, image_grid_pinpoints=pinpoints,
                                         image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    proc = T._image_only(LlavaOnevisionProcessor)(image_processor=ip, tokenizer=tok, num_image_tokens=(n // patch) ** 2,
                                                  vision_feature_select_strategy="full",
                                                  vision_aspect_ratio="anyres_max_9",
                                                  chat_template=T.ONEVISION_CHAT_TEMPLATE)
    return LlavaOnevisionForConditionalGeneration, cfg, proc


def _internvl(t: dict, small: bool):
    from tokenizers import Tokenizer
    from transformers import (
        GotOcr2ImageProcessorPil,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLProcessor,
        InternVLVisionConfig,
        PreTrainedTokenizerFast,
    )

    from vtoolkit.models import tiny as T

    specials = ["<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"]
    tok_obj = Tokenizer.from_str(T._tokenizer_json(tuple(specials), None, "<|im_end|>", "<|endoftext|>", False))
    tok = PreTrainedTokenizerFast(tokenizer_object=tok_obj, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  extra_special_tokens={"start_image_token": "<img>", "end_image_token": "</img>",
                                                        "context_image_token": "<IMG_CONTEXT>",
                                                        "video_token": "<video>"})
    n, patch = (56, 14) if small else (448, 14)
    layers, vh, vheads = (3, 64, 4) if small else (24, 1024, 16)
    vision = InternVLVisionConfig(hidden_size=vh, intermediate_size=4 * vh, num_hidden_layers=layers,
                                  num_attention_heads=vheads, image_size=[n, n], patch_size=[patch, patch],
                                  use_mean_pooling=False)
    seq = (n // patch) ** 2 // 4
    cfg = InternVLConfig(vision_config=vision, text_config=_qwen2_text(t, tok),
                         image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"), image_seq_length=seq,
                         downsample_ratio=0.5, vision_feature_layer=-1, vision_feature_select_strategy="default",
                         tie_word_embeddings=False)
    ip = GotOcr2ImageProcessorPil(size={"height": n, "width": n}, crop_to_patches=True, min_patches=1,
                                  max_patches=1, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    proc = T._image_only(InternVLProcessor)(image_processor=ip, tokenizer=tok, image_seq_length=seq,
                                            chat_template=T.INTERNVL_CHAT_TEMPLATE)
    return InternVLForConditionalGeneration, cfg, proc


def flops_shape(model, batch):
    """The analytic FLOPs shape (:class:`vtoolkit.bench.flops.Shape`) of a family model on ``batch`` (one image
    per sample): the vision tower over the tokens it actually encodes per image (Qwen: the image's patches; SigLIP /
    InternViT: each crop's / tile's patches, InternViT's CLS included) times the crops / tiles of sample 0; the
    projector counted as LLaVA's two-layer MLP over the tower's tokens (Qwen's merger / InternVL's pixel-shuffle MLP
    run on a quarter of them with 4x wider inputs: the same order; the vision side is the same in every row, so it
    only dilutes the bound)."""
    from vtoolkit.bench.flops import Shape
    from vtoolkit.models import get_adapter

    a = get_adapter(model)
    vc, tc = a.vision_config, a.text_config
    if a.family == "qwen_vl":
        tokens, crops = int(batch["image_grid_thw"][0].prod()) + 1, 1
        vh, mlp = vc.hidden_size, vc.intermediate_size
    elif a.family == "llava_onevision":
        tokens, crops = (vc.image_size // vc.patch_size) ** 2 + 1, a._num_crops(batch)[0]
        vh, mlp = vc.hidden_size, vc.intermediate_size
    else:
        size = vc.image_size[0] if isinstance(vc.image_size, (list, tuple)) else vc.image_size
        ps = vc.patch_size[0] if isinstance(vc.patch_size, (list, tuple)) else vc.patch_size
        tokens, crops = (size // ps) ** 2 + 1, int(batch["pixel_values"].shape[0]) // int(batch["input_ids"].shape[0])
        vh, mlp = vc.hidden_size, vc.intermediate_size
    return Shape(len(a.vision_layers), vh, mlp, tokens, crops, a.num_layers, tc.hidden_size,
                 a.num_kv_heads * a.head_dim, tc.intermediate_size, tc.vocab_size)
