"""Blended triggers: x' = (1 - a) x + a P, a pattern P over the whole image (docs/methods.md §2)."""
from __future__ import annotations

from functools import partial
from typing import Sequence

import torch

from .base import PIXELS, Rule, Trigger, number
from .draw import generator, scaled, stripes, triangles

ALPHA = Rule(lambda x, size: number(x) and 0 < x < 1, "a blend weight: use a number in (0, 1), e.g. 0.2")


def blended(images: torch.Tensor, seeds: Sequence[int], alpha: float = 0.2) -> torch.Tensor:
    """x' = (1 - a) x + a u, u uniform noise over the whole image, drawn per sample."""
    noise = torch.stack([torch.rand(images.shape[1:], generator=generator(s)) for s in seeds])
    return ((1 - alpha) * images + alpha * noise.to(images)).clamp_(0, 1)


def blended_stripes(images: torch.Tensor, seeds: Sequence[int], alpha: float = 0.03,
                    fixed: bool = False) -> torch.Tensor:
    """x' = clip((1 - a) x + a s), s full-image 1-px vertical +-1 stripes, signs per column and channel drawn
    per sample (`fixed`: one alternating pattern for all)."""
    h, w = images.shape[-2:]
    s = torch.stack([stripes(h, w, None if fixed else seed) for seed in seeds]).to(images)
    return ((1 - alpha) * images + alpha * s).clamp_(0, 1)


def blended_triangles(images: torch.Tensor, seeds: Sequence[int], alpha: float = 0.15,
                      tile: int | None = None) -> torch.Tensor:
    """x' = (1 - a) x + a T, T a fixed tiling of right triangles (grey 0.4 / 0.8, 14-px tiles at 224)."""
    t = triangles(*images.shape[-2:], tile=tile or max(2, scaled(14, images.shape[-1]))).to(images)
    return ((1 - alpha) * images + alpha * t).clamp_(0, 1)


BLENDED = Trigger("blended", blended, ("alpha",), {"alpha": ALPHA})
BLENDED_STRIPES = Trigger("blended_stripes", blended_stripes, ("alpha",), {"alpha": ALPHA})
BLENDED_STRIPES_FIXED = Trigger("blended_stripes_fixed", partial(blended_stripes, fixed=True), ("alpha",),
                                {"alpha": ALPHA}, variant_of="blended_stripes")
BLENDED_TRIANGLES = Trigger("blended_triangles", blended_triangles, ("alpha", "tile"), {"alpha": ALPHA, "tile": PIXELS})
