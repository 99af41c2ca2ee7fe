"""BadNet-style triggers: a square patch at a per-sample random place (docs/methods.md §2)."""
from __future__ import annotations

from functools import partial
from typing import Sequence

import torch

from .base import PIXELS, Trigger
from .draw import generator, paste_patches, stripes


def badnet(images: torch.Tensor, seeds: Sequence[int], patch: int | None = None) -> torch.Tensor:
    """A square patch at a per-sample random place: the image's mean colour + N(0, 1) noise."""
    def mean_plus_noise(i, seed, p):
        noise = torch.randn((3, p, p), generator=generator(seed + 1))
        return images[i].mean(dim=(1, 2), keepdim=True) + noise
    return paste_patches(images, seeds, patch, mean_plus_noise)


def badnet_stripes(images: torch.Tensor, seeds: Sequence[int], patch: int | None = None,
                   fixed: bool = False) -> torch.Tensor:
    """A square patch of 1-px vertical +-1 stripes (clamped: white/black columns) at a per-sample random place;
    the signs per column and channel are drawn per sample (`fixed`: one alternating pattern for all)."""
    return paste_patches(images, seeds, patch, lambda i, seed, p: stripes(p, p, None if fixed else seed + 1))


BADNET = Trigger("badnet", badnet, ("patch",), {"patch": PIXELS})
BADNET_STRIPES = Trigger("badnet_stripes", badnet_stripes, ("patch",), {"patch": PIXELS})
BADNET_STRIPES_FIXED = Trigger("badnet_stripes_fixed", partial(badnet_stripes, fixed=True), ("patch",),
                               {"patch": PIXELS}, variant_of="badnet_stripes")
