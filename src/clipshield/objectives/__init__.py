"""Objectives: one loss per method. A new method is one new file here plus a line in `_registry`.

An objective is `objective(batch, clip, frozen) -> (loss, logs)` with `trainable(clip)` giving the
(name, parameter) pairs it trains and `needs_frozen` telling the loop to keep a frozen start copy.
For gradient accumulation (training.accumulate) it also splits into `prepare(batch)` (every random
draw of the step) and either `encode(batch, clip, frozen) -> {name: per-sample features}` +
`loss(features, clip)` (contrastive: the loss needs the whole batch) or `batch_loss(batch, clip, frozen)`
(a mean of per-sample terms).
"""
from __future__ import annotations

import functools

from .cleanclip import CleanClipObjective
from .clip import ClipObjective
from .fare import FareObjective
from .par import ParObjective
from .tecoa import TecoaObjective


def _registry():
    return {
        "clip": ClipObjective,
        "finetune": functools.partial(ParObjective, perturb=False),
        "par": ParObjective,
        "cleanclip": CleanClipObjective,
        "fare": FareObjective,
        "tecoa": TecoaObjective,
    }


def build_objective(name: str, **params):
    registry = _registry()
    if name not in registry:
        raise ValueError(f"unknown objective {name!r}; valid: {', '.join(registry)}")
    return registry[name](**params)
