"""Backdoor triggers (docs/methods.md §2): pure functions on image batches in [0, 1].

Every trigger takes images (B, 3, H, W) and one integer seed per sample, and returns the triggered
images clamped to [0, 1] (the original code wraps out-of-range patch values through uint8; we clamp).
Sizes are given at 224 px and scale with H unless set explicitly.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
import difflib
from typing import Callable, Sequence

import torch
import torch.nn.functional as F


def scaled(px_at_224: float, side: int) -> int:
    """A size given at 224 px, scaled to an image side (at least 1 px)."""
    return max(1, round(px_at_224 * side / 224))


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def _patch_corner(seed: int, side: int, patch: int) -> tuple[int, int]:
    g = _generator(seed)
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
        sign = torch.randint(0, 2, (3, width), generator=_generator(seed)).float() * 2 - 1
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
        top, left = _patch_corner(seed, side, p)
        out[i, :, top:top + p, left:left + p] = fill(i, seed, p)
    return out.clamp_(0, 1)


def badnet(images: torch.Tensor, seeds: Sequence[int], patch: int | None = None) -> torch.Tensor:
    """A square patch at a per-sample random place: the image's mean colour + N(0, 1) noise."""
    def mean_plus_noise(i, seed, p):
        noise = torch.randn((3, p, p), generator=_generator(seed + 1))
        return images[i].mean(dim=(1, 2), keepdim=True) + noise
    return paste_patches(images, seeds, patch, mean_plus_noise)


def badnet_stripes(images: torch.Tensor, seeds: Sequence[int], patch: int | None = None,
                   fixed: bool = False) -> torch.Tensor:
    """A square patch of 1-px vertical +-1 stripes (clamped: white/black columns) at a per-sample random place;
    the signs per column and channel are drawn per sample (`fixed`: one alternating pattern for all)."""
    return paste_patches(images, seeds, patch, lambda i, seed, p: stripes(p, p, None if fixed else seed + 1))


def blended(images: torch.Tensor, seeds: Sequence[int], alpha: float = 0.2) -> torch.Tensor:
    """x' = (1 - a) x + a u, u uniform noise over the whole image, drawn per sample."""
    noise = torch.stack([torch.rand(images.shape[1:], generator=_generator(s)) for s in seeds])
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


def warp_field(side: int, strength: float, grid: int = 4, seed: int = 1234) -> torch.Tensor:
    """A fixed smooth flow field (1, H, W, 2) for grid_sample: random control points, upsampled."""
    ctrl = torch.rand((1, 2, grid, grid), generator=_generator(seed)) * 2 - 1
    ctrl = ctrl / ctrl.abs().mean()
    flow = F.interpolate(ctrl, size=(side, side), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    lin = torch.linspace(-1, 1, side)
    identity = torch.stack(torch.meshgrid(lin, lin, indexing="xy"), dim=-1).unsqueeze(0)
    return (identity + strength * flow / side).clamp(-1, 1)


def wanet(images: torch.Tensor, seeds: Sequence[int], strength: float = 0.5, grid: int = 4) -> torch.Tensor:
    """Warp every image with the same fixed smooth flow field (WaNet, without noise mode)."""
    field = warp_field(images.shape[-1], strength * 2, grid).to(images)
    return F.grid_sample(images, field.expand(images.shape[0], -1, -1, -1), align_corners=True).clamp_(0, 1)


@dataclass(frozen=True)
class Trigger:
    name: str
    fn: Callable[..., torch.Tensor]
    options: tuple[str, ...]


TRIGGERS = {t.name: t for t in (
    Trigger("badnet", badnet, ("patch",)),
    Trigger("badnet_stripes", badnet_stripes, ("patch",)),
    Trigger("blended", blended, ("alpha",)),
    Trigger("blended_stripes", blended_stripes, ("alpha",)),
    Trigger("badnet_stripes_fixed", partial(badnet_stripes, fixed=True), ("patch",)),
    Trigger("blended_stripes_fixed", partial(blended_stripes, fixed=True), ("alpha",)),
    Trigger("blended_triangles", blended_triangles, ("alpha", "tile")),
    Trigger("wanet", wanet, ("strength", "grid")),
)}


def get_trigger(name: str) -> Trigger:
    if name not in TRIGGERS:
        raise ValueError(f"unknown trigger {name!r}; valid triggers: {', '.join(TRIGGERS)}")
    return TRIGGERS[name]


# attack.options values: (check, what is allowed); `size` is data.image_size (None: unknown)
_WHOLE = lambda x: isinstance(x, int) and not isinstance(x, bool)
_NUMBER = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool)
TRIGGER_OPTION_RULES = {
    "alpha": (lambda x, size: _NUMBER(x) and 0 < x < 1, "a blend weight: use a number in (0, 1), e.g. 0.2"),
    "patch": (lambda x, size: _WHOLE(x) and 1 <= x <= (size or x), "a side in pixels: use a whole number from 1 to data.image_size ({size})"),
    "tile": (lambda x, size: _WHOLE(x) and 1 <= x <= (size or x), "a side in pixels: use a whole number from 1 to data.image_size ({size})"),
    "strength": (lambda x, size: _NUMBER(x) and x > 0, "a warp strength: use a number > 0, e.g. 0.5"),
    "grid": (lambda x, size: _WHOLE(x) and x >= 2, "control points per side: use a whole number >= 2"),
}


def option_problems(trigger: str, options, size: int | None) -> list[str]:
    """What is wrong with params.yaml's attack.options.<trigger> (empty: nothing): names the trigger takes (from its
    registry entry), values in range; `size` is data.image_size (None: unknown)."""
    allowed = TRIGGERS[trigger].options
    where = f"attack.options.{trigger}"
    if not isinstance(options, dict):
        return [f"`{where}` = {options!r} must be a mapping of option: value, e.g. {{{', '.join(f'{o}: ...' for o in allowed)}}}"]
    out = []
    for key, value in options.items():
        if key not in allowed:
            near = difflib.get_close_matches(str(key), allowed, n=1)
            out.append(f"unknown option `{where}.{key}`; " + (f"did you mean `{where}.{near[0]}`?" if near else
                       f"{trigger} takes: {', '.join(allowed) or 'no options'}"))
        elif key in TRIGGER_OPTION_RULES and value is not None and not TRIGGER_OPTION_RULES[key][0](value, size):
            why = TRIGGER_OPTION_RULES[key][1].format(size=size if size else "the image side")
            out.append(f"`{where}.{key}` = {value!r} is not allowed; {why}")
    return out


def apply_trigger(name: str, images: torch.Tensor, seeds: Sequence[int], **options) -> torch.Tensor:
    """Apply trigger `name`; `options` not used by this trigger (e.g. `patch` for blended) are ignored,
    so one params section can hold the strengths of every trigger."""
    trigger = get_trigger(name)
    if len(seeds) != images.shape[0]:
        raise ValueError(f"{len(seeds)} seeds for {images.shape[0]} images")
    kwargs = {k: v for k, v in options.items() if k in trigger.options and v is not None}
    return trigger.fn(images, seeds, **kwargs)
