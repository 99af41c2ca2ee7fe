"""CleanCLIP: L_CLIP + w * (in-modal contrastive loss image vs AutoAugment view + caption vs EDA view).

As the reference (nishadsinghi/CleanCLIP src/train.py) trains it: both towers and the logit scale (capped at 100),
one scale for all three contrastive terms; the in-modal terms in one direction only (each original against the
batch of augmented views); batch norm in train mode (its `model.train()`), normalising with the statistics of the
originals and their views together."""
from __future__ import annotations

import random

import torch

from .augment import auto_augment, eda
from .clip import ClipObjective, clip_loss, logit_scale_of


def inmodal_loss(x: torch.Tensor, x_aug: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each original (row) against the batch of augmented views, its own view the positive."""
    logits = scale * x @ x_aug.t()
    return torch.nn.functional.cross_entropy(logits, torch.arange(len(x), device=x.device))


class CleanClipObjective(ClipObjective):
    name = "cleanclip"
    train_batchnorm = True

    def __init__(self, weight: float = 1.0, seed: int = 0):
        super().__init__()
        self.weight = weight
        self.rng = random.Random(seed)

    def state_dict(self) -> dict:  # the EDA random stream, so a resumed run continues it
        version, internal, gauss = self.rng.getstate()
        return {"version": version, "internal": list(internal), "gauss": gauss}

    def load_state_dict(self, state: dict) -> None:
        self.rng.setstate((state["version"], tuple(state["internal"]), state["gauss"]))

    def prepare(self, batch):
        return {**batch, "images_aug": auto_augment(batch["images"]),
                "captions_aug": [eda(c, self.rng) for c in batch["captions"]]}

    def encode(self, batch, clip, frozen):
        n = batch["images"].shape[0]  # one forward per tower over both views (as the batch-norm statistics saw it)
        img, txt = self.features(clip, torch.cat([batch["images"], batch["images_aug"]]),
                                 list(batch["captions"]) + list(batch["captions_aug"]))
        return {"img": img[:n], "img_aug": img[n:], "txt": txt[:n], "txt_aug": txt[n:]}

    def loss(self, f, clip):
        scale = logit_scale_of(clip, None)
        l_clip = clip_loss(f["img"], f["txt"], scale)
        l_img = inmodal_loss(f["img"], f["img_aug"], scale)
        l_txt = inmodal_loss(f["txt"], f["txt_aug"], scale)
        loss = l_clip + self.weight * (l_img + l_txt) / 2
        return loss, {"clip_loss": l_clip.detach(), "inmodal_image": l_img.detach(), "inmodal_text": l_txt.detach(),
                      "logit_scale": float(scale.detach())}
