"""TeCoA (supervised baseline, METHODS.md §5): cross-entropy of zero-shot logits against frozen class text
embeddings, under PGD on the same cross-entropy. Vision tower only."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .vision import VisionAdversarialObjective


class TecoaObjective(VisionAdversarialObjective):
    name = "tecoa"
    classes: torch.Tensor | None = None
    class_space = None  # the training shards' ClassSpace (set by the harden stage); None: the world's classes

    def setup(self, batch, clip, frozen):
        from ..evaluation import class_embeddings
        if self.classes is None:
            self.classes = class_embeddings(frozen, self.class_space).to(batch["images"].device)
        y = batch["labels"].to(batch["images"].device)
        if (y < 0).any():
            raise ValueError("tecoa needs class labels for every training sample (KEY.json 'class'); point "
                             "harden.data at labelled shards (e.g. ImageNet train imported by the data stage) or "
                             "drop the tecoa run from harden.runs")
        return y

    def adv_loss(self, clip, x, labels):
        return F.cross_entropy(100.0 * clip.encode_images(x, normalize=True) @ self.classes.T, labels)
