"""VCD: visual contrastive decoding (Leng et al., "Mitigating object hallucinations in large vision-language models
through visual contrastive decoding", CVPR 2024; official code ``DAMO-NLP-SG/VCD``; docs/methods.md section 7.2).

The contrast stream sees the same prompt with a noised image: the processor's (normalised) pixel tensor ``x0`` of
each image is diffused for ``noise_step`` steps of the official schedule (1000 steps, sigmoid betas)::

    beta_t = sigmoid(linspace(-6, 6, 1000))_t * (5e-3 - 1e-5) + 1e-5,    abar_t = prod_{s <= t} (1 - beta_s)
    x_t    = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * eps,                  eps ~ N(0, I)

(not clamped back into the pixel range, as official; ``vcd_utils/vcd_add_noise.py`` L3-27, applied to the
transformed image in ``experiments/eval/object_hallucination_vqa_*.py``, e.g. ``..._qwenvl.py`` L50-54). The noise is
drawn once per still image: where the processor repeats a still image into several frames (Qwen2-VL / 2.5-VL:
``temporal_patch_size = 2`` copies in every patch row) all copies get the same noised frame, as if the image had been
noised before the processor (the adapter's ``image_frames`` gives the layout). The contrast stream is the stock
model on the noised image: on Qwen3-VL its visual positions get the noised image's own DeepStack features (from the
same encoder pass; the adapter's ``side_llm_inputs``), not the clean image's. Then, per step
(:mod:`vtoolkit.methods.contrastive`)::

    l = (1 + alpha) * l_full - alpha * l_noised,   tokens with p_full < beta * max p_full removed

Official defaults: ``alpha = 1``, ``beta = 0.1``, ``noise_step = 500``; the official sampler applies generate's
processors after the contrast (``processors="standard"``, the default here; ``"direct"`` bypasses them).

Noise is drawn per image from a generator seeded with ``seed`` and the image's pixels (as the random-pruning baseline
does), so it is reproducible and a padded batch draws exactly what single runs draw. The noised image is encoded in
a side stream: the vision-tower hooks of other methods (e.g. a co-applied FasterVLM's scores) do not see it. Cost:
one more vision-encoder pass and a contrast prefill as long as the prompt (the contrast stream is not shorter than
the main one, unlike DAMRO's); decode steps are batched with the main stream. A prompt without an image is refused
(there is nothing to noise); in a batch with images, a row without one contrasts with itself (``l = l_full``, with the
plausibility cutoff).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vtoolkit.hooks.sidestream import side_active
from vtoolkit.methods.contrastive import ContrastiveConfig, ContrastiveDecoding
from vtoolkit.registry import register_method
from vtoolkit_core.selection import image_seed

NUM_STEPS = 1000


@dataclass(frozen=True)
class VCDConfig(ContrastiveConfig):
    """alpha: contrast strength; beta: plausibility cutoff (0 = off); noise_step: diffusion step of the noised image
    (0..999); processors: standard (official VCD) | direct; seed: noise seed (mixed with each image's pixels)."""

    alpha: float = 1.0
    beta: float = 0.1
    noise_step: int = 500
    processors: str = "standard"
    seed: int = 0

    def validate(self) -> None:
        super().validate()
        if isinstance(self.noise_step, bool) or not isinstance(self.noise_step, int) or not 0 <= self.noise_step \
                < NUM_STEPS:
            raise ValueError(f"noise_step must be an integer in [0, {NUM_STEPS - 1}], got {self.noise_step!r}")


def diffusion_noise(x0: torch.Tensor, step: int, generator: torch.Generator) -> torch.Tensor:
    """``x_t`` of the official VCD schedule (see the module docstring), computed in float64, returned in x0's dtype."""
    betas = torch.sigmoid(torch.linspace(-6, 6, NUM_STEPS, dtype=torch.float64)) * (0.5e-2 - 1e-5) + 1e-5
    abar = torch.cumprod(1 - betas, dim=0)[step]
    eps = torch.randn(x0.shape, dtype=torch.float64, generator=generator)
    return (abar.sqrt() * x0.detach().cpu().double() + (1 - abar).sqrt() * eps).to(x0.device, x0.dtype)


@register_method("vcd", config=VCDConfig, kind="mitigate", stage="decode",
                 architectures=("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_onevision",
                                "internvl"),
                 requires=("a second vision-encoder pass", "a contrast stream batched with the prompt's"),
                 description="Visual contrastive decoding against the same prompt with a noised image (VCD)")
class VCD(ContrastiveDecoding):
    def noised_pixels(self, inputs) -> torch.Tensor:
        """The call's pixel tensor with every image diffused by its own seeded noise (one draw per still frame,
        ``eps ~ N(0, I)`` of the frame's shape from a generator seeded with ``seed`` and the image's pixels)."""
        pixels = inputs.get("pixel_values")
        if pixels is None:
            raise ValueError("vcd needs this call's pixel_values to noise the image; precomputed image features are "
                             "not supported")
        noised = pixels.clone()
        view_inputs = {**inputs, "pixel_values": noised}
        for i in range(len(self.adapter.image_token_counts(inputs, encoded=True))):
            view = self.adapter.image_pixels(view_inputs, i)
            gen = torch.Generator().manual_seed(image_seed(view, self.config.seed))   # the random pruner's seed rule
            frames = self.adapter.image_frames(view_inputs, i)        # [F, ...] copies of one frame, a view into
            if frames.shape[0] > 1 and not bool((frames == frames[:1]).all()):     # ``noised``
                raise RuntimeError(f"image {i}: the processor's {frames.shape[0]} frames of a still image differ; "
                                   f"vcd noises one still frame and gives every copy the same noise")
            frames.copy_(diffusion_noise(frames[0], self.config.noise_step, gen).expand_as(frames))
        return noised

    def contrast_rows(self, ctx, kwargs, n):
        if not ctx.has_visual:   # text-only prompts (e.g. image-free benchmark questions): nothing to contrast
            return self.unchanged_rows(ctx, kwargs, n)
        inputs = ctx.inputs
        noised = self.noised_pixels(inputs)
        names = ("image_sizes", "image_grid_thw", "batch_num_images")
        extra = {k: inputs[k] for k in names if inputs.get(k) is not None}
        with side_active(self.adapter.model):         # not this call's encoder pass: scorers and the context skip it
            encoding = self.adapter.core.get_image_features(pixel_values=noised, **extra)
        ids = inputs["input_ids"][:, :n].to(kwargs["inputs_embeds"].device)
        by_image = self.adapter.features_by_image(encoding.pooler_output, inputs)
        rows = ctx.merged_embeddings(ids, by_image=by_image).to(kwargs["inputs_embeds"].dtype)
        mask = inputs.get("attention_mask")
        valid = (mask[:, :n].bool().to(ids.device) if mask is not None and mask.dim() == 2
                 else torch.ones_like(ids, dtype=torch.bool))
        pos = ctx.rope_positions()[..., :n].to(ids.device) if self.adapter.position_kind == "mrope" else None
        columns = torch.arange(n, device=ids.device).expand(ids.shape[0], -1)
        return rows, valid, pos, (columns, encoding)    # Qwen3-VL: the noised image's DeepStack features
