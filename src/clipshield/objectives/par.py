"""PAR, Perturb and Recover (docs/methods.md §4): L_PAR = L_CLIP - 1/2 ([S_I <= eps] S_I + [S_T <= eps] S_T)."""
from __future__ import annotations

import torch

from .augment import par_augment
from .clip import ClipObjective, clip_loss


def perturbation_term(img: torch.Tensor, txt: torch.Tensor, img0: torch.Tensor, txt0: torch.Tensor,
                      eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """L_PERT on normalised features: S = batch mean of ||n(f(x)) - n(f0(x))||^2 per modality; a modality
    whose S already exceeds eps contributes zero (and no gradient). Returns (L_PERT, S_I, S_T)."""
    s_i = (img - img0).pow(2).sum(dim=-1).mean()
    s_t = (txt - txt0).pow(2).sum(dim=-1).mean()
    pert = 0.5 * ((s_i <= eps).float() * s_i + (s_t <= eps).float() * s_t)
    return pert, s_i, s_t


def par_loss(img, txt, img0, txt0, logit_scale, eps: float) -> tuple[torch.Tensor, dict]:
    l_clip = clip_loss(img, txt, logit_scale)
    pert, s_i, s_t = perturbation_term(img, txt, img0, txt0, eps)
    return l_clip - pert, {"clip_loss": l_clip.detach(), "s_i": s_i.detach(), "s_t": s_t.detach()}


class ParObjective(ClipObjective):
    """Both towers trained; logit scale fixed at the start model's value; f^0 = frozen start model.
    S_I and S_T are means over the global batch (features are gathered before `loss`)."""
    name = "par"
    # Batch-norm statistics stay those of the start model. So in effect in the reference: its train() calls
    # model.train(), but the zero-shot check at the epoch's first step leaves the model in eval mode.
    train_batchnorm = False
    needs_frozen = True

    def __init__(self, eps: float = 2.15, perturb: bool = True, noise_p: float = 0.5, noise_std: float = 0.2,
                 erase_p: float = 0.5):
        super().__init__(fix_logit_scale=True)
        self.eps, self.perturb = eps, perturb
        self.augment = dict(noise_p=noise_p, noise_std=noise_std, erase_p=erase_p)

    def prepare(self, batch):
        return {**batch, "images": par_augment(batch["images"], **self.augment)}

    def encode(self, batch, clip, frozen):
        f = super().encode(batch, clip, frozen)
        if self.perturb:
            with torch.no_grad():
                f["img0"], f["txt0"] = self.features(frozen, batch["images"], batch["captions"])
        return f

    def loss(self, f, clip):
        scale = torch.tensor(self.fixed_scale)
        if not self.perturb:  # plain fine-tuning: PAR without L_PERT, same data and augmentation
            loss = clip_loss(f["img"], f["txt"], scale)
            return loss, {"clip_loss": loss.detach()}
        return par_loss(f["img"], f["txt"], f["img0"], f["txt0"], scale, self.eps)
