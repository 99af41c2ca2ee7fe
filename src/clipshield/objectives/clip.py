"""The CLIP contrastive objective (pre-training, backdooring, plain fine-tuning), and the shape every
contrastive objective shares: `prepare` (random draws), `encode` (per-sample features), `loss` (over the
global batch). The split is what makes gradient accumulation exact (training.accumulate)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .base import Objective

MAX_LOGIT_SCALE = 100.0


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor | float) -> torch.Tensor:
    """Symmetric InfoNCE on L2-normalised features; pair i is the positive of row/column i."""
    logits = logit_scale * image_features @ text_features.T
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def logit_scale_of(clip, fixed: float | None) -> torch.Tensor:
    if fixed is not None:
        return torch.tensor(fixed)
    return clip.model.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)


class ClipObjective(Objective):
    """L_CLIP. `fix_logit_scale=True` freezes the temperature at the start model's value."""
    name = "clip"
    whole_batch_loss = True

    def __init__(self, fix_logit_scale: bool = False):
        self.fix_logit_scale = fix_logit_scale
        self.fixed_scale: float | None = None

    def trainable(self, clip):
        if self.fix_logit_scale:
            self.fixed_scale = min(math.exp(float(clip.model.logit_scale.detach())), MAX_LOGIT_SCALE)
        return [(n, p) for n, p in clip.model.named_parameters()
                if not (self.fix_logit_scale and n == "logit_scale")]

    def features(self, clip, images, captions):
        img = clip.encode_images(images, normalize=True)
        return img, clip.encode_texts(captions, normalize=True, device=img.device)

    def encode(self, batch: dict, clip, frozen) -> dict[str, torch.Tensor]:
        img, txt = self.features(clip, batch["images"], batch["captions"])
        return {"img": img, "txt": txt}

    def loss(self, f: dict[str, torch.Tensor], clip) -> tuple[torch.Tensor, dict]:
        scale = logit_scale_of(clip, self.fixed_scale)
        loss = clip_loss(f["img"], f["txt"], scale)
        return loss, {"clip_loss": loss.detach(), "logit_scale": float(scale.detach())}
