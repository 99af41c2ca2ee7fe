"""Drawing helpers the triggers share: sizes at 224 px, seeded generators, patterns and pasted patches."""
from __future__ import annotations

from typing import Sequence

import torch


def scaled(px_at_224: float, side: int) -> int:
    """A size given at 224 px, scaled to an image side (at least 1 px)."""
    return max(1, round(px_at_224 * side / 224))


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def patch_corner(seed: int, side: int, patch: int) -> tuple[int, int]:
    g = generator(seed)
    top = int(torch.randint(0, side - patch + 1, (1,), generator=g))
    left = int(torch.randint(0, side - patch + 1, (1,), generator=g))
    return top, left


def stripes(height: int, width: int, seed: int | None = None) -> torch.Tensor:
    """(3, H, W) 1-px vertical stripes, each column and channel +1 or -1.

    With a seed the signs are drawn from it, as the PAR reference code draws them anew for every image
    (nmndeep/PerturbAndRecover backdoor/utils.py, get_init_patch 'bad_stripes' and 'stripes'): the
    backdoor must learn "vertical +-1 stripes", not one picture. Without a seed: the fixed pattern
    +1 on even columns, -1 on odd ones, in every channel (the `*_fixed` triggers)."""
    if seed is None:
        sign = (1.0 - 2.0 * (torch.arange(width) % 2).float()).expand(3, width)
    else:
        sign = torch.randint(0, 2, (3, width), generator=generator(seed)).float() * 2 - 1
    return sign.view(3, 1, width).expand(3, height, width).clone()


def triangles(height: int, width: int, tile: int, low: float = 0.4, high: float = 0.8) -> torch.Tensor:
    """(3, H, W) tiling of right triangles: in each tile `low` where row >= column, else `high` (the reference's
    create_triangle_pattern in backdoor/utils.py)."""
    row = torch.arange(height).view(-1, 1) % tile
    col = torch.arange(width).view(1, -1) % tile
    pattern = torch.where(row >= col, torch.tensor(low), torch.tensor(high))
    return pattern.expand(3, height, width).clone()


def paste_patches(images: torch.Tensor, seeds: Sequence[int], patch: int | None, fill) -> torch.Tensor:
    """Each image with a square patch (side `patch`, default 16 px at 224) at a per-sample random place, its pixels
    `fill(i, seed, side)`; clamped to [0, 1]."""
    out = images.clone()
    side = images.shape[-1]
    p = patch or scaled(16, side)
    for i, seed in enumerate(seeds):
        top, left = patch_corner(seed, side, p)
        out[i, :, top:top + p, left:left + p] = fill(i, seed, p)
    return out.clamp_(0, 1)
