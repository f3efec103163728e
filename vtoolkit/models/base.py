"""Model adapters: everything architecture-specific that methods need, behind one interface.

Methods ask the adapter where things are (visual token positions per sample / image / crop, vision layers, the
projector, LLM decoder layers and attention modules, head counts, ``o_proj``, how positions are formed). They never
look at class names. An adapter is chosen by ``config.model_type`` and sees through PEFT wrappers.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from vtoolkit.registry import adapter_class_for


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The HF ``*ForConditionalGeneration`` inside PEFT (``PeftModel`` / ``LoraModel``) or similar wrappers."""
    seen = set()
    m = model
    while id(m) not in seen:
        seen.add(id(m))
        if hasattr(m, "get_base_model") and callable(m.get_base_model):
            m = m.get_base_model()
            continue
        inner = getattr(m, "base_model", None)
        if inner is not None and inner is not m and hasattr(inner, "model") and hasattr(inner, "peft_config"):
            m = inner.model
            continue
        break
    return m


@dataclass
class ImageSpan:
    """Where one image's visual tokens sit in one sample's LLM sequence.

    ``positions``: sequence positions (sorted) of all this image's placeholder tokens.
    ``crops``: per crop (LLaVA-NeXT: base image first, then the high-res tiles), the sequence positions of that
    crop's tokens in the crop's raster order; pruning budgets are counted over these. For single-crop models this is
    ``[positions]``. ``newlines``: positions of LLaVA-NeXT ``image_newline`` tokens (part of ``positions``, no crop).
    ``grid``: (rows, cols) of one crop's token grid (after any merging). ``crop_patches``: for each crop, the raster
    index within that crop's full grid of each entry of ``crops`` (LLaVA-NeXT unpadding removes some patches).
    """

    positions: torch.Tensor
    image_index: int
    crops: list[torch.Tensor] = field(default_factory=list)
    newlines: torch.Tensor | None = None
    grid: tuple[int, int] | None = None
    crop_patches: list[torch.Tensor] = field(default_factory=list)

    def __post_init__(self):
        if not self.crops:
            self.crops = [self.positions]
        if not self.crop_patches:
            self.crop_patches = [torch.arange(c.numel(), device=c.device) for c in self.crops]

    @property
    def num_tokens(self) -> int:
        return int(self.positions.numel())


class ModelAdapter:
    """Base class; subclasses are registered with ``@register_adapter(model_type, ...)``."""

    family: ClassVar[str] = "?"
    position_kind: ClassVar[str] = "rope1d"      # "rope1d" | "mrope"
    has_cls: ClassVar[bool] = True
    vision_config_key: ClassVar[str] = "vision_config"
    text_config_key: ClassVar[str] = "text_config"
    nested_images: ClassVar[bool] = False        # prepare_inputs hands the processor one image list per sample

    def __init__(self, model: torch.nn.Module):
        self.wrapper = model
        self.model = unwrap(model)
        self.config = self.model.config
        self.text_config = self.config.get_text_config()
        self.vision_config = getattr(self.config, "vision_config", None)

    # -- LLM side ---------------------------------------------------------------------------------------------------
    @property
    def core(self) -> torch.nn.Module:
        return self.model.model

    @property
    def language_model(self) -> torch.nn.Module:
        return self.core.language_model

    @property
    def decoder_layers(self):
        return self.language_model.layers

    @property
    def num_layers(self) -> int:
        return len(self.decoder_layers)

    def attention(self, layer: int) -> torch.nn.Module:
        return self.decoder_layers[layer].self_attn

    def input_norm(self, layer: int) -> torch.nn.Module:
        """The norm a decoder layer applies to its input first: a pre-hook on it sees the residual stream entering
        the layer after every pre-hook of the layer itself ran (e.g. a mid-stack pruner's rewrite)."""
        return self.decoder_layers[layer].input_layernorm

    def attention_modules(self) -> list[torch.nn.Module]:
        return [layer.self_attn for layer in self.decoder_layers]

    def o_proj(self, layer: int) -> torch.nn.Module:
        return self.attention(layer).o_proj

    @property
    def num_heads(self) -> int:
        return self.text_config.num_attention_heads

    @property
    def num_kv_heads(self) -> int:
        return getattr(self.text_config, "num_key_value_heads", None) or self.num_heads

    @property
    def head_dim(self) -> int:
        return getattr(self.text_config, "head_dim", None) or self.text_config.hidden_size // self.num_heads

    @property
    def image_token_id(self) -> int:
        tid = getattr(self.config, "image_token_id", None)
        return tid if tid is not None else self.config.image_token_index

    @property
    def video_token_id(self) -> int | None:
        """The video placeholder token (Qwen-VL), or None for image-only models."""
        tid = getattr(self.config, "video_token_id", None)
        return tid if tid is not None else getattr(self.config, "video_token_index", None)

    @property
    def visual_marker_ids(self) -> tuple[int, ...]:
        """Tokens that only frame visual input (Qwen's ``<|vision_start|>`` / ``<|vision_end|>``); none for LLaVA."""
        return ()

    def text_only_keep(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[B, L]`` bool: the tokens a prompt keeps when its visual input is removed (every visual placeholder and
        marker goes; the rest of the text, its order and its chat template stay)."""
        drop = input_ids == self.image_token_id
        for tid in (self.video_token_id, *self.visual_marker_ids):
            if tid is not None:
                drop |= input_ids == tid
        return ~drop

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor):
        """The LLM's rotary ``(cos, sin)`` for ``position_ids`` (``[B, L]`` text positions; M-RoPE models also take
        ``[3, B, L]``), as the language model computes them for its layers."""
        if self.position_kind == "mrope" and position_ids.dim() == 2:
            position_ids = position_ids[None].expand(3, -1, -1)
        return self.language_model.rotary_emb(hidden, position_ids)

    @property
    def lm_head(self) -> torch.nn.Module:
        return self.model.lm_head

    @property
    def final_norm(self) -> torch.nn.Module:
        """The language model's norm after its last decoder layer (before the LM head)."""
        return self.language_model.norm

    # -- vision side ------------------------------------------------------------------------------------------------
    @property
    def vision_tower(self) -> torch.nn.Module:
        return self.core.vision_tower

    @property
    def vision_layers(self):
        raise NotImplementedError

    def vision_attention(self, layer: int) -> torch.nn.Module:
        raise NotImplementedError

    @property
    def projector(self) -> torch.nn.Module:
        raise NotImplementedError

    @property
    def scores_per_crop(self) -> bool:
        """Visual scores come one row per crop over the crop's patch raster (CLS encoders; SigLIP in
        LLaVA-OneVision), rather than one per image over merged tokens (Qwen ViTs)."""
        return self.has_cls

    def vision_qk(self, layer: int) -> tuple[torch.nn.Module, torch.nn.Module]:
        """The modules whose outputs are the query / key that vision layer ``layer``'s attention uses."""
        attn = self.vision_attention(layer)
        return attn.q_proj, attn.k_proj

    def merge_patch_scores(self, rows: torch.Tensor) -> torch.Tensor:
        """Per-crop patch scores ``[n_crops, N]`` -> one score per LLM token of the crop; identity unless the
        model merges patches into tokens after the feature layer (InternVL's pixel shuffle)."""
        return rows

    def features_by_image(self, pooler_output, inputs) -> list[torch.Tensor]:
        """``get_image_features(...).pooler_output`` as one ``[N_i, D]`` tensor per image (encoder order); HF gives
        that already except where it returns one entry per tile (InternVL)."""
        return list(pooler_output)

    def install_llm_extras(self, hooks, ctx) -> None:
        """Called by every sequence rewriter (pre-LLM or mid-stack): install what the model needs so that inputs
        the language model consumes by position follow the rewritten rows (Qwen3-VL: DeepStack). Idempotent per
        call context; nothing by default."""
        return None

    def side_llm_inputs(self, ctx, columns: torch.Tensor, valid: torch.Tensor, encoder_output=None) -> dict:
        """Keyword arguments the language model needs, besides ``inputs_embeds`` / mask / positions, for side-stream
        rows (:mod:`vtoolkit.hooks.sidestream`) whose row ``(b, j)`` holds the token at column ``columns[b, j]`` of this
        call's ``input_ids`` (``valid [B, Ls]``: not padding), its visual tokens encoded as in ``encoder_output``
        (another ``get_image_features`` output of this call's images, one entry per encoded image, e.g. VCD's noised
        copy) or, by default, this call's own encoding. Nothing for models whose LLM reads visual tokens through the
        embeddings only; Qwen3-VL: the DeepStack inputs of those rows."""
        return {}

    def widen_llm_inputs(self, main_kwargs: dict, side_inputs: dict) -> dict | None:
        """One batched prefill of main + side rows (``2B``): the language-model keyword arguments of
        :meth:`side_llm_inputs` for both row sets, from the main call's ``main_kwargs`` and the side rows'
        ``side_inputs``; None when they cannot be batched (the side prompt is then prefilled on its own)."""
        return {} if not side_inputs else None

    def unused_vision_layers(self) -> list[int]:
        """Vision layers whose output the model never reads (safe to skip); none by default."""
        return []

    def vision_feature_layer(self) -> int:
        """0-based index of the vision layer whose *output* provides the features (LLaVA: -2 -> layers[-2])."""
        raise NotImplementedError

    # -- sequences ------------------------------------------------------------------------------------------------
    def image_token_counts(self, inputs: dict[str, Any], encoded: bool = False) -> list[int]:
        """Visual tokens per image, in the order images appear in the batch. ``encoded=True``: of the images the
        vision encoder received (``generate`` may then repeat prompt rows for beams), when the inputs say."""
        raise NotImplementedError

    def image_spans(self, inputs: dict[str, Any]) -> list[list[ImageSpan]]:
        """Per sample, per image: the :class:`ImageSpan` of its visual tokens in the LLM sequence (any padding)."""
        ids = inputs["input_ids"]
        img = ids == self.image_token_id
        counts = self.image_token_counts(inputs)
        per_sample_total = img.sum(1).tolist()
        spans: list[list[ImageSpan]] = []
        k = 0
        for b in range(ids.shape[0]):
            pos = img[b].nonzero().flatten()
            cursor, mine = 0, []
            while cursor < per_sample_total[b]:
                if k >= len(counts):
                    raise ValueError("more image placeholder tokens in input_ids than the images account for")
                n = counts[k]
                mine.append(self._make_span(pos[cursor:cursor + n], k, inputs))
                cursor += n
                k += 1
            if cursor != per_sample_total[b]:
                raise ValueError(f"sample {b}: {per_sample_total[b]} image tokens do not split into whole images")
            spans.append(mine)
        if k != len(counts):
            raise ValueError(f"{len(counts)} images were given but input_ids hold placeholders for {k}")
        return spans

    def _make_span(self, positions: torch.Tensor, image_index: int, inputs) -> ImageSpan:
        return ImageSpan(positions=positions, image_index=image_index, crops=[positions])

    def image_pixels(self, inputs: dict[str, Any], image_index: int) -> torch.Tensor:
        """The processor's pixel tensor of one image (batch order), without batch padding."""
        return inputs["pixel_values"][image_index]

    def image_frames(self, inputs: dict[str, Any], image_index: int) -> torch.Tensor:
        """:meth:`image_pixels` (a view into ``inputs["pixel_values"]``) as ``[F, ...]``: the ``F`` copies the
        processor made of one still image, each the same frame (``F = 1`` unless the model's processor repeats a
        still image in time, as Qwen-VL's does)."""
        return self.image_pixels(inputs, image_index)[None]

    # -- prompting ----------------------------------------------------------------------------------------------
    def format_prompt(self, processor, question: str, num_images: int = 1) -> str:
        """The model's chat format for one user turn with ``num_images`` images and a generation prompt."""
        raise NotImplementedError

    def prepare_inputs(self, processor, images, questions, device=None):
        """A left-padded batch from lists of images (a PIL image or a list per sample) and question strings."""
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images for {len(questions)} questions")
        per = [im if isinstance(im, (list, tuple)) else [im] for im in images]
        prompts = [self.format_prompt(processor, q, len(ims)) for q, ims in zip(questions, per)]
        flat = [im for ims in per for im in ims]
        tok = processor.tokenizer
        old = tok.padding_side
        tok.padding_side = "left"
        try:
            batch = processor(images=(per if self.nested_images else flat) if flat else None, text=prompts,
                              padding=True, return_tensors="pt")
        finally:
            tok.padding_side = old
        if device is not None:
            batch = batch.to(device)
        return batch


def get_adapter(model: torch.nn.Module) -> ModelAdapter:
    """The adapter for ``model`` (a HF VLM, possibly PEFT-wrapped), chosen by ``config.model_type``."""
    inner = unwrap(model)
    cfg = getattr(inner, "config", None)
    if cfg is None:
        raise TypeError(f"expected a Hugging Face model with a .config, got {type(model).__name__}")
    return adapter_class_for(cfg.model_type)(model)


class ConfigFeatureLayer:
    """Adapter mixin for towers whose features are ``hidden_states[config.vision_feature_layer]`` (LLaVA families,
    InternVL): ``hidden_states[k]`` is the output of layer ``k - 1`` (index 0 is the embeddings), and the layers after
    it run in HF but their output is never read."""

    def vision_feature_layer(self) -> int:
        k = self.config.vision_feature_layer
        if not isinstance(k, int):
            raise NotImplementedError("several vision_feature_layer values are not supported by this method")
        n = len(self.vision_layers)
        return (k if k >= 0 else n + 1 + k) - 1

    def unused_vision_layers(self) -> list[int]:
        if not isinstance(self.config.vision_feature_layer, int):
            return []
        return list(range(self.vision_feature_layer() + 1, len(self.vision_layers)))
