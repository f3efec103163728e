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
    from transformers.initialization import no_init_weights

    cfg, tok = config(llm_layers, hidden, heads, kv_heads, intermediate, vocab, vision_layers, vision_hidden,
                      image_size)
    # allocated directly in ``dtype`` on ``device`` (no fp32 copy); rotary inv_freq stays fp32 as when loaded
    with no_init_weights(), torch.device(device):
        model = LlavaForConditionalGeneration._from_config(cfg, dtype=dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0 if "norm" in name and "weight" in name else 0.0)
            else:   # in place in the target dtype: no fp32 temporary (the 65M-entry embedding alone is 262 MB)
                p.normal_(0.0, 0.02, generator=gen)
    ip = CLIPImageProcessorPil(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1)
    return model.eval(), proc


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
