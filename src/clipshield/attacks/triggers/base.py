"""What a trigger file declares: its registry entry (`Trigger`) and the rule each of its options must follow."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch


@dataclass(frozen=True)
class Rule:
    """What an option's value may be: `check(value, size)`, where size is data.image_size (None: unknown), and
    what is allowed, said in the error message (`{size}` is filled in)."""
    check: Callable[[Any, int | None], bool]
    allowed: str


def whole(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


PIXELS = Rule(lambda x, size: whole(x) and 1 <= x <= (size or x),
              "a side in pixels: use a whole number from 1 to data.image_size ({size})")


@dataclass(frozen=True)
class Trigger:
    """A registry entry: the name params.yaml uses (attack.triggers), the function (images, seeds, **options) ->
    triggered images, the options it takes from attack.options.<name>, and the rules their values follow (an
    option without a rule takes any value). `variant_of`: the trigger this one is an ablation of (the fixed-pattern
    twins); `attack: {triggers: all}` in a profile leaves variants out."""
    name: str
    fn: Callable[..., torch.Tensor]
    options: tuple[str, ...]
    rules: Mapping[str, Rule] = field(default_factory=dict)
    variant_of: str | None = None
