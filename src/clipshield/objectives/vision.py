"""What FARE and TeCoA share: an l-inf PGD inner maximisation, and only the vision tower trains."""
from __future__ import annotations

import torch

from ..attacks.pgd import check_attack, pgd
from .base import Objective, set_train_mode


class VisionAdversarialObjective(Objective):
    """min over the vision tower of loss(f_I(x_adv)), x_adv = PGD maximising the same loss.
    eps and step_size are in 1/255 units (eps 4 = FARE^4). Subclasses define `setup` and `adv_loss`.
    The loss is a mean of per-sample terms, so gradient accumulation averages micro-batch losses."""
    name = "vision-adversarial"
    needs_frozen = True
    train_batchnorm = False
    default_momentum = 0.0

    def __init__(self, eps: float = 4.0, steps: int = 10, step_size: float = 1.0, momentum: float | None = None):
        check_attack(eps / 255, steps, step_size / 255)
        self.eps, self.steps, self.step_size = eps / 255, steps, step_size / 255
        self.momentum = self.default_momentum if momentum is None else momentum

    def trainable(self, clip):
        return [(f"visual.{n}", p) for n, p in clip.model.visual.named_parameters()]

    def setup(self, batch, clip, frozen):
        """The fixed target of the loss for this batch (computed without gradients)."""
        raise NotImplementedError

    def adv_loss(self, clip, x, target) -> torch.Tensor:
        raise NotImplementedError

    def prepare(self, batch: dict) -> dict:
        """PGD's random start, drawn once for this process's whole batch."""
        return {**batch, "start_noise": torch.rand(batch["images"].shape) * 2 - 1}

    def batch_loss(self, batch, clip, frozen):
        x = batch["images"]
        target = self.setup(batch, clip, frozen)
        clip.model.eval()  # attack in eval mode (no batch-norm statistics updates)
        x_adv = pgd(lambda z: self.adv_loss(clip, z, target), x, self.eps, self.steps, self.step_size,
                    momentum=self.momentum, start_noise=batch.get("start_noise"))
        set_train_mode(clip.model, train_batchnorm=False)
        loss = self.adv_loss(clip, x_adv, target)
        return loss, {f"{self.name}_loss": loss.detach()}
