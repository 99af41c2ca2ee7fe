"""Objectives: one loss per method (the contract: base.Objective), and the registry of methods.

A new method is one new file here, imported here and registered by one `register` line at the end of this file:
its name, its factory, its role and how the report shows it. `build_objective` makes one by name and `option_names` says what its params section may
set; params validation, the report and the CLI read the registry.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Callable

from .base import Objective
from .cleanclip import CleanClipObjective
from .clip import ClipObjective
from .fare import FareObjective
from .par import ParObjective
from .tecoa import TecoaObjective

# What a method is for: `clean` methods remove a backdoor (clean.methods), `harden` methods make the vision tower
# robust (harden runs), `pretrain` is the CLIP loss that pre-training and the backdoor use.
ROLES = ("clean", "harden", "pretrain")


@dataclasses.dataclass(frozen=True)
class Method:
    """A registry entry: the name (in clean.methods or harden.runs, the method's own params section and its models'
    names), the factory (its options -> an Objective), its role (one of ROLES), its plot marker (matplotlib) in the
    report, and its label where prose or a table names the method (default: the name)."""
    name: str
    factory: Callable[..., Objective]
    role: str
    marker: str = "o"
    label: str = ""

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"method {self.name!r} has role {self.role!r}; use one of {', '.join(ROLES)}")
        object.__setattr__(self, "label", self.label or self.name)


METHODS: dict[str, Method] = {}


def register(method: Method) -> None:
    """Add a method to the registry; listings (and the report's rows) keep the order of registration."""
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is registered twice; give the new one another name")
    METHODS[method.name] = method


def list_objectives() -> list[str]:
    """The method names `build_objective` knows."""
    return list(METHODS)


def methods(role: str) -> list[str]:
    """The methods of one role (clean, harden or pretrain), in registration order."""
    return [name for name, m in METHODS.items() if m.role == role]


def build_objective(name: str, **options) -> Objective:
    if name not in METHODS:
        raise ValueError(f"unknown objective {name!r}; valid: {', '.join(METHODS)}")
    return METHODS[name].factory(**options)


def option_names(name: str) -> list[str]:
    """The options a method's params section may set: its constructor's arguments, less those the registry fixes
    (finetune's perturb) and the keyword-only ones, which the stage passes (TeCoA's class space)."""
    factory = METHODS[name].factory
    fixed = factory.keywords if isinstance(factory, functools.partial) else {}
    cls = factory.func if isinstance(factory, functools.partial) else factory
    return [p.name for p in inspect.signature(cls.__init__).parameters.values()
            if p.name != "self" and p.name not in fixed and p.kind is p.POSITIONAL_OR_KEYWORD]


# The registry, in the order of every listing and of the report's rows and legend: one line per method.
register(Method("clip", ClipObjective, "pretrain", label="CLIP"))
register(Method("finetune", functools.partial(ParObjective, perturb=False), "clean", marker="o", label="fine-tuning"))
register(Method("cleanclip", CleanClipObjective, "clean", marker="s", label="CleanCLIP"))
register(Method("par", ParObjective, "clean", marker="D", label="PAR"))
register(Method("fare", FareObjective, "harden", marker="P", label="FARE"))
register(Method("tecoa", TecoaObjective, "harden", marker="v", label="TeCoA"))
