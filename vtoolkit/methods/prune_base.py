"""Template for pre-LLM visual-token pruning: score -> select top-T per budget unit -> gather (hooks/sequence.py).

Subclasses supply ``token_scores(ctx)``: for each image (batch order) a list with one score tensor per crop over
the crop's full raster (``ImageSpan.crop_patches`` index into it). The template owns the budget rules, shared by
every score-based pruner so they are comparable:

- ``keep_ratio`` r: T = max(1, round(r * N)) tokens per budget unit of N tokens (half up: 576 * 0.1 -> 58, as the
  FasterVLM scripts' 144 / 58 / 29 for 75 / 90 / 95 % reduction); ``keep_tokens`` T: exactly T per unit.
- ``budget_scope="per_crop"`` (official FasterVLM on LLaVA-NeXT): every crop keeps its own T; N = the crop's full
  grid; an unpadded tile with fewer tokens keeps at most what it has. ``"global"``: one budget per image over all
  its crops, N = the image's patch tokens in the sequence.
- LLaVA-NeXT ``image_newline`` tokens are always kept and never counted in the budget (HF packs one per row; the
  model was trained with them).
- Kept tokens stay in their original order (:func:`select_top` can also rank them by score, for DAMRO).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vtoolkit.config import MethodConfig
from vtoolkit.hooks.sequence import SequencePruner
from vtoolkit.methods.base import Method
from vtoolkit_core.selection import budget, top_k

SCOPES = ("per_crop", "global")


@dataclass(frozen=True)
class BudgetConfig(MethodConfig):
    """How many visual tokens a pruner keeps, the same way for every pruner: ``keep_ratio`` (the KEPT share, in
    (0, 1]) xor ``keep_tokens`` (tokens kept per budget unit); neither: ``default_keep_ratio``."""

    keep_ratio: float | None = None
    keep_tokens: int | None = None

    default_keep_ratio = 0.1

    def validate(self) -> None:
        if self.keep_ratio is not None and self.keep_tokens is not None:
            raise ValueError("give keep_ratio or keep_tokens, not both")
        if self.keep_ratio is None and self.keep_tokens is None:
            object.__setattr__(self, "keep_ratio", self.default_keep_ratio)
        if self.keep_ratio is not None and not (0 < float(self.keep_ratio) <= 1):
            raise ValueError(f"keep_ratio (the share of visual tokens KEPT) must be in (0, 1], got {self.keep_ratio}")
        if self.keep_tokens is not None and (not isinstance(self.keep_tokens, int) or self.keep_tokens < 1):
            raise ValueError(f"keep_tokens must be a positive integer, got {self.keep_tokens!r}")

    def budget(self, n: int, what: str) -> int:
        return budget(n, self.keep_ratio, self.keep_tokens, what)

    def budget_units(self, span) -> list[tuple[int, str]]:
        """``(visual tokens, what)`` of each budget unit of one image (an :class:`~vtoolkit.models.base.ImageSpan`):
        here the whole image (its ``num_tokens``), as FastV counts it."""
        return [(span.num_tokens, f"image {span.image_index}")]

    def check_model(self, adapter, spans=None) -> None:
        """``keep_tokens`` must fit every budget unit of the images in ``spans`` (the budget rule's own error)."""
        super().check_model(adapter, spans)
        if self.keep_tokens is None or not spans:
            return
        for b, sample in enumerate(spans):
            for span in sample:
                for n, what in self.budget_units(span):
                    self.budget(n, f"{what} (sample {b})")


@dataclass(frozen=True)
class PruneConfig(BudgetConfig):
    budget_scope: str = "per_crop"
    positions: str | None = None

    def validate(self) -> None:
        super().validate()
        if self.budget_scope not in SCOPES:
            raise ValueError(f"budget_scope must be one of {SCOPES}, got {self.budget_scope!r}")
        if self.positions not in (None, "contiguous", "original"):
            raise ValueError(f"positions must be 'contiguous', 'original' or None (family default), got "
                             f"{self.positions!r}")

    def budget_units(self, span) -> list[tuple[int, str]]:
        """Per crop (``per_crop`` or a one-crop image): the crop's full grid; ``global``: the image's patch tokens
        (as :func:`select_top` counts them)."""
        full = span.grid[0] * span.grid[1] if span.grid else None
        if self.budget_scope == "per_crop" or len(span.crops) == 1:
            return [(full or int(c.numel()), f"crop {i} of image {span.image_index}") for i, c in enumerate(span.crops)]
        return [(sum(int(c.numel()) for c in span.crops), f"image {span.image_index}")]


class ScorePrune(Method):
    """Base of score-based pre-LLM pruners."""

    rewrites_sequence = True

    default_positions = {"rope1d": "contiguous", "mrope": "original"}

    def positions_policy(self) -> str:
        return self.config.positions or self.default_positions[self.adapter.position_kind]

    def check(self) -> None:
        super().check()
        SequencePruner(self.adapter, None, None, self.positions_policy())  # validates the policy for this model

    def install(self, hooks, ctx) -> None:
        self.ctx = ctx
        ctx.listeners.append(self)
        self.install_scorer(hooks, ctx)
        SequencePruner(self.adapter, ctx, self.select, self.positions_policy(), owner=self.name).install(hooks)

    def install_scorer(self, hooks, ctx) -> None:
        return None

    def token_scores(self, ctx) -> list[list[torch.Tensor]]:
        raise NotImplementedError

    def select(self, ctx) -> list[torch.Tensor]:
        cfg = self.config
        sel = select_top(ctx, self.token_scores(ctx), cfg.budget, per_crop=cfg.budget_scope == "per_crop",
                         newlines="all")
        rows = ctx.sample_rows
        self._stats = {"kept_indices": [sel.indices[r] for r in rows],
                       "visual_tokens_before": [sel.before[r] for r in rows],
                       "visual_tokens_after": [sel.after[r] for r in rows], "positions": self.positions_policy()}
        return sel.keep


@dataclass
class Selection:
    """Per LLM row: ``keep`` (sorted sequence positions of the chosen visual tokens, or None when the row has none),
    ``ranked`` (the same positions, image by image, in the order ``select_top`` was asked for), ``indices`` (per
    image, the chosen tokens' indices within that image's visual tokens, in that order), token counts."""

    keep: list
    indices: list
    before: list
    after: list
    ranked: list


ORDERS = ("spatial", "score")


def select_top(ctx, scores, count, per_crop: bool = True, newlines: str = "all", order: str = "spatial") -> Selection:
    """The top-scored visual tokens of every image of every row.

    ``scores[image_index]``: one score tensor per crop over the crop's full raster (``ImageSpan.crop_patches``
    index into it). ``count(n, what) -> T``: tokens to keep out of a unit of ``n`` (a crop when ``per_crop`` or the
    image has one crop - an unpadded LLaVA-NeXT tile keeps at most what it has -, else the image's patch tokens).
    ``newlines``: LLaVA-NeXT ``image_newline`` tokens kept: ``"all"`` (never counted in the budget), ``"last"`` (the
    image block's final one), or ``"none"``. ``order`` (of ``ranked`` / ``indices``; ``keep`` is always sorted):
    ``"spatial"`` (sequence order) or ``"score"`` (per unit by descending score, as ``torch.topk`` returns them, units
    in crop order, the kept newlines after them)."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    keep_all, kept_idx, before, after, ranked_all = [], [], [], [], []
    for b, sample in enumerate(ctx.spans):
        keep_b, idx_b, ranked_b = [], [], []
        for span in sample:
            crop_scores = scores[span.image_index]
            if len(crop_scores) != len(span.crops):
                raise RuntimeError(f"{len(crop_scores)} score rows for {len(span.crops)} crops of image "
                                   f"{span.image_index}")
            present = [s.to(span.positions.device)[p] for s, p in zip(crop_scores, span.crop_patches)]
            chosen = []
            if per_crop or len(span.crops) == 1:
                for c, (s, pos) in enumerate(zip(present, span.crops)):
                    t = min(count(crop_scores[c].numel(), f"crop {c} of image {span.image_index} (sample {b})"),
                            s.numel())
                    chosen.append(pos[top_k(s, t, by_score=order == "score")])
            else:
                s, pos = torch.cat(present), torch.cat(span.crops)
                t = count(s.numel(), f"image {span.image_index} (sample {b})")
                chosen.append(pos[top_k(s, t, by_score=order == "score")])
            if span.newlines is not None and span.newlines.numel() and newlines != "none":
                chosen.append(span.newlines if newlines == "all" else span.newlines[-1:])
            by_score = torch.cat(chosen)
            kept = by_score.sort().values
            ranked = kept if order == "spatial" else by_score
            keep_b.append(kept)
            ranked_b.append(ranked)
            idx_b.append(torch.searchsorted(span.positions, ranked).cpu())
        keep_all.append(torch.cat(keep_b) if keep_b else None)
        ranked_all.append(torch.cat(ranked_b) if ranked_b else None)
        kept_idx.append(idx_b)
        before.append(sum(s.num_tokens for s in sample))
        after.append(sum(k.numel() for k in keep_b))
    return Selection(keep_all, kept_idx, before, after, ranked_all)
