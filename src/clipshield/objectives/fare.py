"""FARE (METHODS.md §5): min_f  mean_i max_{||z - x_i|| <= eps} ||f_I(z) - f_I^0(x_i)||^2, vision tower only."""
from __future__ import annotations

import torch

from ..attacks.pgd import pgd
from ..training import set_train_mode


def fare_loss(adv_features: torch.Tensor, clean_target: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of the squared L2 distance (summed over dimensions), unnormalised embeddings."""
    return (adv_features - clean_target).pow(2).sum(dim=-1).mean()


class FareObjective:
    name = "fare"
    needs_frozen = True
    train_batchnorm = False

    def __init__(self, eps: float = 4.0, steps: int = 10, step_size: float = 1.0, momentum: float = 0.9):
        """eps and step_size in 1/255 units (eps 4 = FARE^4)."""
        self.eps, self.steps, self.step_size, self.momentum = eps / 255, steps, step_size / 255, momentum

    def trainable(self, clip):
        return [(f"visual.{n}", p) for n, p in clip.model.visual.named_parameters()]

    def __call__(self, batch, clip, frozen):
        x = batch["images"]
        with torch.no_grad():
            target = frozen.encode_images(x)
        clip.model.eval()  # attack in eval mode (no batch-norm statistics updates)
        x_adv = pgd(lambda z: fare_loss(clip.encode_images(z), target), x, self.eps, self.steps,
                    self.step_size, momentum=self.momentum)
        set_train_mode(clip.model, train_batchnorm=False)
        loss = fare_loss(clip.encode_images(x_adv), target)
        return loss, {"fare_loss": loss.detach()}
