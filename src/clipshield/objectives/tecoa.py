"""TeCoA (supervised baseline, METHODS.md §5): cross-entropy of zero-shot logits against frozen class text
embeddings, under PGD on the same cross-entropy. Vision tower only."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..attacks.pgd import pgd
from ..training import set_train_mode


class TecoaObjective:
    name = "tecoa"
    needs_frozen = True
    train_batchnorm = False

    def __init__(self, eps: float = 4.0, steps: int = 10, step_size: float = 1.0, momentum: float = 0.0):
        self.eps, self.steps, self.step_size, self.momentum = eps / 255, steps, step_size / 255, momentum
        self.classes: torch.Tensor | None = None

    def trainable(self, clip):
        return [(f"visual.{n}", p) for n, p in clip.model.visual.named_parameters()]

    def logits(self, clip, x):
        return 100.0 * clip.encode_images(x, normalize=True) @ self.classes.T

    def __call__(self, batch, clip, frozen):
        from ..evaluation import class_embeddings
        if self.classes is None:
            self.classes = class_embeddings(frozen).to(batch["images"].device)
        x, y = batch["images"], batch["labels"].to(batch["images"].device)
        if (y < 0).any():
            raise ValueError("tecoa needs class labels for every training sample (KEY.json 'class')")
        clip.model.eval()
        x_adv = pgd(lambda z: F.cross_entropy(self.logits(clip, z), y), x, self.eps, self.steps, self.step_size,
                    momentum=self.momentum)
        set_train_mode(clip.model, train_batchnorm=False)
        loss = F.cross_entropy(self.logits(clip, x_adv), y)
        return loss, {"tecoa_ce": loss.detach()}
