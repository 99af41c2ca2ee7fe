"""Objectives: one loss per method (the contract: base.Objective). A new method is one new file here plus a line
in `_OBJECTIVES`; `build_objective` makes one by name and `option_names` says what its params section may set."""
from __future__ import annotations

import functools
import inspect

from .base import Objective
from .cleanclip import CleanClipObjective
from .clip import ClipObjective
from .fare import FareObjective
from .par import ParObjective
from .tecoa import TecoaObjective

_OBJECTIVES = {
    "clip": ClipObjective,
    "finetune": functools.partial(ParObjective, perturb=False),
    "par": ParObjective,
    "cleanclip": CleanClipObjective,
    "fare": FareObjective,
    "tecoa": TecoaObjective,
}


# What each method is for: `clean` methods remove a backdoor (clean.methods), `harden` methods make the vision tower
# robust (harden runs), `pretrain` is the CLIP loss that pre-training and the backdoor use.
ROLES = {"clip": "pretrain", "finetune": "clean", "par": "clean", "cleanclip": "clean", "fare": "harden",
         "tecoa": "harden"}


def list_objectives() -> list[str]:
    """The method names `build_objective` knows."""
    return list(_OBJECTIVES)


def methods(role: str) -> list[str]:
    """The methods of one role (clean, harden or pretrain), in registration order."""
    return [name for name in _OBJECTIVES if ROLES[name] == role]


def build_objective(name: str, **options) -> Objective:
    if name not in _OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; valid: {', '.join(_OBJECTIVES)}")
    return _OBJECTIVES[name](**options)


def option_names(name: str) -> list[str]:
    """The options a method's params section may set: its constructor's arguments, less those the registry fixes
    (finetune's perturb) and the keyword-only ones, which the stage passes (TeCoA's class space)."""
    factory = _OBJECTIVES[name]
    fixed = factory.keywords if isinstance(factory, functools.partial) else {}
    cls = factory.func if isinstance(factory, functools.partial) else factory
    return [p.name for p in inspect.signature(cls.__init__).parameters.values()
            if p.name != "self" and p.name not in fixed and p.kind is p.POSITIONAL_OR_KEYWORD]
