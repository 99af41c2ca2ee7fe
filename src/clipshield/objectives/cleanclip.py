"""CleanCLIP: L_CLIP + w * (in-modal contrastive loss image vs AutoAugment view + caption vs EDA view)."""
from __future__ import annotations

import random

import torch

from ..distributed import gather
from .augment import auto_augment, eda
from .clip import ClipObjective, clip_loss


class CleanClipObjective(ClipObjective):
    name = "cleanclip"
    train_batchnorm = False

    def __init__(self, weight: float = 1.0, seed: int = 0):
        super().__init__(fix_logit_scale=True)
        self.weight = weight
        self.rng = random.Random(seed)

    def state_dict(self) -> dict:  # the EDA random stream, so a resumed run continues it
        version, internal, gauss = self.rng.getstate()
        return {"version": version, "internal": list(internal), "gauss": gauss}

    def load_state_dict(self, state: dict) -> None:
        self.rng.setstate((state["version"], tuple(state["internal"]), state["gauss"]))

    def __call__(self, batch, clip, frozen):
        n = batch["images"].shape[0]
        images = torch.cat([batch["images"], auto_augment(batch["images"])])
        captions = list(batch["captions"]) + [eda(c, self.rng) for c in batch["captions"]]
        img, txt = self.features(batch, clip, images=images, captions=captions)
        img, img_aug, txt, txt_aug = (gather(f) for f in (img[:n], img[n:], txt[:n], txt[n:]))
        scale = torch.tensor(self.fixed_scale)
        l_clip = clip_loss(img, txt, scale)
        l_img = clip_loss(img, img_aug, scale)
        l_txt = clip_loss(txt, txt_aug, scale)
        loss = l_clip + self.weight * (l_img + l_txt) / 2
        return loss, {"clip_loss": l_clip.detach(), "inmodal_image": l_img.detach(), "inmodal_text": l_txt.detach()}
