"""Augmentations used by cleaning objectives: PAR's pixel noise/erasing, AutoAugment, and EDA for text."""
from __future__ import annotations

import random

import numpy as np
import torch
from open_clip import OPENAI_DATASET_MEAN
from PIL import Image
from torchvision.transforms import AutoAugment, AutoAugmentPolicy


def par_augment(images: torch.Tensor, noise_p: float = 0.5, noise_std: float = 0.2, erase_p: float = 0.5,
                erase_area: tuple[float, float] = (0.005, 0.01), generator: torch.Generator | None = None,
                fill: tuple[float, float, float] = OPENAI_DATASET_MEAN) -> torch.Tensor:
    """PAR's augmentation (docs/methods.md §4), as the reference code builds it (nmndeep/PerturbAndRecover utils.py:
    `AddGaussianNoise(0, 0.2)` with p=0.5, then `RandomErasing(p=0.5, scale=(0.005, 0.01), ratio=1, value=0)` after
    the model's normalisation). Per sample, with prob. `noise_p` add clip(N(0, std), 0, 1) per pixel and channel
    (rectified: about half the pixels get none), then clip to [0, 1]; with prob. `erase_p` fill a square of 0.5-1%
    of the area with `fill`, the normalisation mean (0 after normalising). No crops, no flips."""
    b, _, h, w = images.shape
    dev = images.device
    g = generator
    out = images.clone()
    noisy = (torch.rand(b, generator=g) < noise_p).to(dev)
    noise = (torch.randn(images.shape, generator=g) * noise_std).clamp(0, 1).to(dev)
    out = torch.where(noisy.view(b, 1, 1, 1), (out + noise).clamp(0, 1), out)
    erase = torch.rand(b, generator=g) < erase_p
    areas = torch.empty(b).uniform_(*erase_area, generator=g)
    for i in torch.nonzero(erase).flatten().tolist():
        side = max(1, round((areas[i].item() * h * w) ** 0.5))
        top = int(torch.randint(0, h - side + 1, (1,), generator=g))
        left = int(torch.randint(0, w - side + 1, (1,), generator=g))
        out[i, :, top:top + side, left:left + side] = torch.tensor(fill, dtype=out.dtype, device=dev).view(3, 1, 1)
    return out


_autoaugment = AutoAugment(AutoAugmentPolicy.IMAGENET)


def auto_augment(images: torch.Tensor) -> torch.Tensor:
    """torchvision AutoAugment (ImageNet policy), a separately drawn policy per image. On PIL images: 3x
    faster than on tensors (the per-op dispatch dominates for small images), same draws, same pixels
    but for a few interpolated ones."""
    u8 = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = np.stack([np.asarray(_autoaugment(Image.fromarray(x))) for x in u8])
    return torch.from_numpy(out).permute(0, 3, 1, 2).float().div(255).to(images.device)


SYNONYMS = {
    "photo": ["picture", "snapshot"], "picture": ["photo", "image"], "image": ["picture", "photo"],
    "small": ["little", "tiny"], "large": ["big", "huge"], "dark": ["black", "dim"], "light": ["bright", "pale"],
    "background": ["backdrop", "setting"], "coloured": ["painted", "colored"], "showing": ["depicting", "with"],
    "rendering": ["drawing", "render"], "drawing": ["sketch", "illustration"], "shape": ["figure", "form"],
    "noisy": ["grainy", "speckled"], "grey": ["gray", "neutral"], "here": ["there", "visible"],
}
STOPWORDS = {"a", "an", "the", "of", "on", "in", "and", "over", "against", "is", "there"}


def eda(caption: str, rng: random.Random, alpha: float = 0.1) -> str:
    """Easy Data Augmentation: one of synonym replacement, random insertion, random swap, random deletion."""
    words = caption.split()
    if len(words) < 2:
        return caption
    n = max(1, round(alpha * len(words)))
    op = rng.randrange(4)
    if op == 0:  # synonym replacement
        idx = [i for i, w in enumerate(words) if w.strip(".,") in SYNONYMS]
        for i in rng.sample(idx, min(n, len(idx))):
            core = words[i].strip(".,")
            words[i] = words[i].replace(core, rng.choice(SYNONYMS[core]))
    elif op == 1:  # random insertion of a synonym of some word
        cands = [w.strip(".,") for w in words if w.strip(".,") in SYNONYMS]
        for _ in range(n if cands else 0):
            words.insert(rng.randrange(len(words) + 1), rng.choice(SYNONYMS[rng.choice(cands)]))
    elif op == 2:  # random swap
        for _ in range(n):
            i, j = rng.randrange(len(words)), rng.randrange(len(words))
            words[i], words[j] = words[j], words[i]
    else:  # random deletion (never of everything)
        kept = [w for w in words if rng.random() > alpha]
        words = kept or [rng.choice(words)]
    return " ".join(words)
