"""Poisoning a data set (docs/methods.md §2): round(rate * N) samples, chosen by a seed, get the trigger
and a caption naming the target class. Pure functions; the stage streams shards through them."""
from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np
import torch

from ..data.classes import ClassSpace, world_classes
from ..data.shards import decode_image
from ..seeds import POISON_CAPTION, POISON_TRIGGER, derive_seed
from .triggers import apply_trigger, get_trigger


def poison_indices(n: int, rate: float, seed: int) -> set[int]:
    if not 0 <= rate <= 1:
        raise ValueError(f"poison.rate = {rate} must lie in [0, 1]")
    k = round(rate * n)
    return set(np.random.default_rng(seed).choice(n, size=k, replace=False).tolist())


def sample_seed(seed: int, index: int) -> int:
    """The trigger seed of training sample `index` under poison seed `seed` (a hash: never equal to an
    evaluation seed or to another poison seed's, see seeds.py)."""
    return derive_seed(POISON_TRIGGER, seed, index)


def poison_image(img: np.ndarray, trigger: str, seed: int, options: dict) -> np.ndarray:
    x = torch.from_numpy(img).permute(2, 0, 1).float().div(255).unsqueeze(0)
    x = apply_trigger(trigger, x, [seed], **options)
    return (x[0].permute(1, 2, 0) * 255).round().clamp(0, 255).to(torch.uint8).numpy()


def poison_stream(samples: Iterable[dict], n: int, trigger: str, rate: float, target: str, seed: int,
                  options: dict, manifest: list[dict], classes: ClassSpace | None = None) -> Iterator[tuple]:
    """Yield (key, image or encoded bytes, caption, meta) for shard writing; poisoned samples get a caption
    naming `target`, a class of `classes` (default: the world's), and are appended to `manifest` (key,
    trigger, seed, original caption, new caption)."""
    get_trigger(trigger)
    classes = classes or world_classes()
    try:
        classes.index(target)
    except ValueError as e:
        raise ValueError(f"attack.target: {e}") from e
    chosen = poison_indices(n, rate, seed)
    for i, s in enumerate(samples):
        if i not in chosen:
            yield s["key"], s["image"], s["caption"], s["meta"]
            continue
        tseed = sample_seed(seed, i)
        img = decode_image(s["image"]) if isinstance(s["image"], bytes) else s["image"]
        caption = classes.caption(target, np.random.default_rng(derive_seed(POISON_CAPTION, seed, i)))
        manifest.append({"key": s["key"], "trigger": trigger, "seed": tseed,
                         "original_caption": s["caption"], "new_caption": caption})
        meta = {**s["meta"], "poisoned": True, "trigger": trigger, "trigger_seed": tseed, "target": target}
        yield s["key"], poison_image(img, trigger, tseed, options), caption, meta
