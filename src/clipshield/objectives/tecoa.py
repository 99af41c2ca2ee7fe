"""TeCoA (supervised baseline, docs/methods.md §5): cross-entropy of zero-shot logits against frozen class text
embeddings, under PGD on the same cross-entropy. Vision tower only."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.classes import ClassSpace
from ..evaluation import class_embeddings, zeroshot_logits
from .vision import VisionAdversarialObjective


class TecoaObjective(VisionAdversarialObjective):
    name = "tecoa"

    def __init__(self, eps: float = 4.0, steps: int = 10, step_size: float = 1.0, momentum: float | None = None, *,
                 class_space: ClassSpace | None = None):
        """`class_space`: the classes the training shards are labelled with (None: the procedural world's)."""
        super().__init__(eps, steps, step_size, momentum)
        self.class_space = class_space
        self.classes: torch.Tensor | None = None  # their embeddings by the frozen start model, from the first batch

    def setup(self, batch, clip, frozen):
        if self.classes is None:
            self.classes = class_embeddings(frozen, self.class_space).to(batch["images"].device)
        y = batch["labels"].to(batch["images"].device)
        if (y < 0).any():
            raise ValueError("tecoa needs class labels for every training sample (KEY.json 'class'); point "
                             "harden.data at labelled shards (e.g. ImageNet train imported by the data stage) or "
                             "drop the tecoa run from harden.runs")
        return y

    def adv_loss(self, clip, x, labels):
        return F.cross_entropy(zeroshot_logits(clip.encode_images(x), self.classes), labels)
