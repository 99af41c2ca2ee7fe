"""WaNet: a fixed smooth warp of the whole image (docs/methods.md §2)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .base import Rule, Trigger, number, whole
from .draw import generator


def warp_field(side: int, strength: float, grid: int = 4, seed: int = 1234) -> torch.Tensor:
    """A fixed smooth flow field (1, H, W, 2) for grid_sample: random control points, upsampled."""
    ctrl = torch.rand((1, 2, grid, grid), generator=generator(seed)) * 2 - 1
    ctrl = ctrl / ctrl.abs().mean()
    flow = F.interpolate(ctrl, size=(side, side), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    lin = torch.linspace(-1, 1, side)
    identity = torch.stack(torch.meshgrid(lin, lin, indexing="xy"), dim=-1).unsqueeze(0)
    return (identity + strength * flow / side).clamp(-1, 1)


def wanet(images: torch.Tensor, seeds: Sequence[int], strength: float = 0.5, grid: int = 4) -> torch.Tensor:
    """Warp every image with the same fixed smooth flow field (WaNet, without noise mode)."""
    field = warp_field(images.shape[-1], strength * 2, grid).to(images)
    return F.grid_sample(images, field.expand(images.shape[0], -1, -1, -1), align_corners=True).clamp_(0, 1)


WANET = Trigger("wanet", wanet, ("strength", "grid"), {
    "strength": Rule(lambda x, size: number(x) and x > 0, "a warp strength: use a number > 0, e.g. 0.5"),
    "grid": Rule(lambda x, size: whole(x) and x >= 2, "control points per side: use a whole number >= 2")})
