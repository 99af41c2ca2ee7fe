"""FARE (docs/methods.md §5): min_f  mean_i max_{||z - x_i|| <= eps} ||f_I(z) - f_I^0(x_i)||^2, vision tower only."""
from __future__ import annotations

import torch

from .vision import VisionAdversarialObjective


def fare_loss(adv_features: torch.Tensor, clean_target: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of the squared L2 distance (summed over dimensions), unnormalised embeddings."""
    return (adv_features - clean_target).pow(2).sum(dim=-1).mean()


class FareObjective(VisionAdversarialObjective):
    name = "fare"
    default_momentum = 0.9  # the FARE reference code's PGD

    def setup(self, batch, clip, frozen):
        with torch.no_grad():
            return frozen.encode_images(batch["images"])  # f_I^0(x): the frozen start model, clean input

    def adv_loss(self, clip, x, target):
        return fare_loss(clip.encode_images(x), target)
