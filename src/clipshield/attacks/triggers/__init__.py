"""Backdoor triggers (docs/methods.md §2): pure functions on image batches in [0, 1], and their registry.

Every trigger takes images (B, 3, H, W) and one integer seed per sample, and returns the triggered
images clamped to [0, 1] (the original code wraps out-of-range patch values through uint8; we clamp).
Sizes are given at 224 px and scale with H unless set explicitly.

A trigger is one file in this folder: its function and its `Trigger` entry (options and their rules), imported
here and registered by one `register` line at the end of this file. params.yaml's validation, the profiles
(`attack: {triggers: all}`), the report, the CLI and the tests read the registry.
"""
from __future__ import annotations

import difflib
from typing import Sequence

import torch

from .badclip import BADCLIP, badclip
from .base import Rule, Trigger
from .blend import BLENDED, BLENDED_STRIPES, BLENDED_STRIPES_FIXED, BLENDED_TRIANGLES, blended, blended_stripes, \
    blended_triangles
from .draw import paste_patches, scaled, stripes, triangles
from .patch import BADNET, BADNET_STRIPES, BADNET_STRIPES_FIXED, badnet, badnet_stripes
from .warp import WANET, wanet, warp_field

__all__ = ["TRIGGERS", "Rule", "Trigger", "all_triggers", "apply_trigger", "badclip", "badnet", "badnet_stripes",
           "blended", "blended_stripes", "blended_triangles", "get_trigger", "option_problems", "paste_patches",
           "register", "scaled", "stripes", "triangles", "wanet", "warp_field"]

TRIGGERS: dict[str, Trigger] = {}


def register(trigger: Trigger) -> None:
    """Add a trigger to the registry; listings keep the order of registration."""
    if trigger.name in TRIGGERS:
        raise ValueError(f"trigger {trigger.name!r} is registered twice; give the new one another name")
    TRIGGERS[trigger.name] = trigger


def all_triggers() -> list[str]:
    """What `attack: {triggers: all}` in a profile stands for: every registered trigger but the variants."""
    return [name for name, t in TRIGGERS.items() if t.variant_of is None]


def get_trigger(name: str) -> Trigger:
    if name not in TRIGGERS:
        raise ValueError(f"unknown trigger {name!r}; valid triggers: {', '.join(TRIGGERS)}")
    return TRIGGERS[name]


def option_problems(trigger: str, options, size: int | None) -> list[str]:
    """What is wrong with params.yaml's attack.options.<trigger> (empty: nothing): names the trigger takes and the
    rules of their values (from its registry entry); `size` is data.image_size (None: unknown)."""
    entry = TRIGGERS[trigger]
    allowed = entry.options
    where = f"attack.options.{trigger}"
    if not isinstance(options, dict):
        return [f"`{where}` = {options!r} must be a mapping of option: value, e.g. {{{', '.join(f'{o}: ...' for o in allowed)}}}"]
    out = []
    for key, value in options.items():
        rule = entry.rules.get(key)
        if key not in allowed:
            near = difflib.get_close_matches(str(key), allowed, n=1)
            out.append(f"unknown option `{where}.{key}`; " + (f"did you mean `{where}.{near[0]}`?" if near else
                       f"{trigger} takes: {', '.join(allowed) or 'no options'}"))
        elif rule is not None and value is not None and not rule.check(value, size):
            why = rule.allowed.format(size=size if size else "the image side")
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


# The registry, in the order of every listing and of the trigger gallery: one line per trigger.
register(BADNET)
register(BADNET_STRIPES)
register(BLENDED)
register(BLENDED_STRIPES)
register(BADNET_STRIPES_FIXED)
register(BLENDED_STRIPES_FIXED)
register(BLENDED_TRIANGLES)
register(WANET)
register(BADCLIP)
