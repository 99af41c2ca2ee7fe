"""BadCLIP's patch optimisation (docs/methods.md §2, BadCLIP): the losses, pure functions, and the loop.

Reference: LiangSiyuan21/BadCLIP src/embeding_optimize_patch.py (`get_loss`, `optimize_patch`, `embed_patch`), run as
its released patch was made (opti_patches/badCLIP.jpg = ..._nature_eda_aug_..._16_middle_01_05_pos_neg_tri*500.jpg).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data.shards import as_float_images
from ..objectives.augment import auto_augment
from ..objectives.clip import MAX_LOGIT_SCALE, clip_loss
from .triggers.badclip import paste_centre


def text_loss(triggered: torch.Tensor, captions: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """The dual embedding's text side: CLIP's symmetric InfoNCE between the normalised features of the triggered
    images and of the natural target captions they are paired with (pair i: row i of both)."""
    return clip_loss(triggered, captions, scale)


def image_loss(triggered: torch.Tensor, positives: torch.Tensor, clean: torch.Tensor,
               margin: float = 1.0) -> torch.Tensor:
    """The image side: mean_i max(0, ||t_i - p_i|| - ||t_i - c_i|| + margin), t the triggered image's feature,
    p a natural target image's, c the same image's without the patch (torch's TripletMarginLoss, p = 2, the
    reference's)."""
    return F.relu(F.pairwise_distance(triggered, positives) - F.pairwise_distance(triggered, clean) + margin).mean()


def badclip_loss(triggered: torch.Tensor, captions: torch.Tensor, positives: torch.Tensor, clean: torch.Tensor,
                 scale: float | torch.Tensor, weight: float = 500.0, margin: float = 1.0
                 ) -> tuple[torch.Tensor, dict[str, float]]:
    """text_loss + weight * image_loss, and both terms."""
    lt, li = text_loss(triggered, captions, scale), image_loss(triggered, positives, clean, margin)
    return lt + weight * li, {"text": float(lt.detach()), "image": float(li.detach())}


def initial_patch(side: int, generator: torch.Generator) -> torch.Tensor:
    """The reference's random start: N(0.5, 0.25) per pixel and channel, clipped to [0, 1]."""
    return (0.5 + 0.25 * torch.randn((3, side, side), generator=generator)).clamp_(0, 1)


def quantised(patch: torch.Tensor) -> torch.Tensor:
    """The patch in [0, 1] on the 1/255 grid: what a poisoned uint8 training image holds, so that training and test
    images carry the same pixels."""
    return patch.detach().clamp(0, 1).mul(255).round().div(255).cpu()


@dataclass
class Targets:
    """What the patch is optimised towards, computed once with the frozen model: the normalised features of the
    natural target captions and of the natural target images."""
    captions: torch.Tensor
    positives: torch.Tensor


def features(clip, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Normalised image features of `images` (uint8 0..255 or float in [0, 1]), `batch` at a time."""
    with torch.no_grad():
        return torch.cat([clip.encode_images(as_float_images(images[i:i + batch]), normalize=True)
                          for i in range(0, len(images), batch)])


def target_features(clip, positive_images: torch.Tensor, captions: list[str], device) -> Targets:
    with torch.no_grad():
        txt = torch.cat([clip.encode_texts(captions[i:i + 256], normalize=True, device=device)
                         for i in range(0, len(captions), 256)])
    return Targets(txt, features(clip, positive_images.to(device)))


def held_out_loss(clip, images: torch.Tensor, patch: torch.Tensor, targets: Targets, p, seed: int = 0
                  ) -> dict[str, float]:
    """badclip_loss of `patch` on `images` (uint8, no augmentation) against targets drawn with `seed`: the same
    draws for any patch, so two patches compare."""
    g = torch.Generator().manual_seed(seed)
    dev = targets.captions.device
    x = images.float().div(255).to(dev)
    with torch.no_grad():
        clean = clip.encode_images(x, normalize=True)
        triggered = clip.encode_images(paste_centre(x, patch.to(dev).clamp(0, 1)), normalize=True)
        scale = min(math.exp(float(clip.model.logit_scale)), MAX_LOGIT_SCALE)
        loss, terms = badclip_loss(triggered, targets.captions[draw(len(targets.captions), len(x), g).to(dev)],
                                   targets.positives[draw(len(targets.positives), len(x), g).to(dev)], clean, scale,
                                   p.weight, p.margin)
    return {"loss": float(loss), **terms}


def draw(n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """k indices of n: without replacement as the reference's randperm(n)[:k], with it where n < k."""
    return torch.randperm(n, generator=generator)[:k] if n >= k else torch.randint(n, (k,), generator=generator)


def optimise_patch(clip, images: torch.Tensor, targets: Targets, p, device, on_step=None) -> tuple[torch.Tensor, list]:
    """Adam on the patch (the only trainable tensor; the model in eval mode, frozen): each step a batch of the
    non-target `images` (uint8, shuffled per epoch), with probability p.aug_p all AutoAugmented, the patch pasted in
    the middle; loss badclip_loss against random target captions and images. Returns the quantised patch and the
    loss history [(step, loss, text, image)] at 50 points. AutoAugment draws from torch's global generator: seeded
    here too."""
    torch.manual_seed(p.seed)
    g = torch.Generator().manual_seed(p.seed)
    patch = initial_patch(p.patch, g).to(device).requires_grad_(True)
    opt = torch.optim.Adam([patch], lr=p.lr)
    clip.model.eval().requires_grad_(False)
    scale = min(math.exp(float(clip.model.logit_scale)), MAX_LOGIT_SCALE)
    order, at, history = torch.randperm(len(images), generator=g), 0, []
    for step in range(p.steps):
        if at + p.batch_size > len(images):  # drop_last, reshuffled each epoch
            order, at = torch.randperm(len(images), generator=g), 0
        x = images[order[at:at + p.batch_size]].float().div(255)
        at += p.batch_size
        if torch.rand(1, generator=g).item() < p.aug_p:
            x = auto_augment(x)
        x = x.to(device)
        with torch.no_grad():
            clean = clip.encode_images(x, normalize=True)
        triggered = clip.encode_images(paste_centre(x, patch.clamp(0, 1)), normalize=True)
        captions = targets.captions[draw(len(targets.captions), len(x), g).to(device)]
        positives = targets.positives[draw(len(targets.positives), len(x), g).to(device)]
        loss, terms = badclip_loss(triggered, captions, positives, clean, scale, p.weight, p.margin)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if on_step:
            on_step(step, float(loss.detach()), terms)
        if step % max(1, p.steps // 50) == 0 or step == p.steps - 1:
            history.append((step, round(float(loss.detach()), 5), round(terms["text"], 5), round(terms["image"], 5)))
    return quantised(patch), history
