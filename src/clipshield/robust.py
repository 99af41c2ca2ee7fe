"""Adversarial robustness metrics (docs/methods.md §6): worst-case APGD accuracy and embedding distortion."""
from __future__ import annotations

import torch

from .attacks.pgd import pgd
from .evaluation import class_embeddings, encode_images, zeroshot_logits
from .models import Clip
from .params import RobustParams


class ZeroShotClassifier(torch.nn.Module):
    """Pixels in [0,1] -> zero-shot logits (100 * cosine to the class embeddings); normalisation happens inside."""

    def __init__(self, clip: Clip, classes: torch.Tensor):
        super().__init__()
        self.clip = clip
        self.model = clip.model  # registered so .eval()/.to() reach it
        self.register_buffer("classes", classes)

    def forward(self, x):
        return zeroshot_logits(self.clip.encode_images(x), self.classes)


def robust_accuracy(clip: Clip, images: torch.Tensor, labels: torch.Tensor, eps: float, steps: int = 100,
                    batch_size: int = 250, classes=None, n_target_classes: int = 9) -> dict[str, float]:
    """Worst case per sample over APGD-CE and targeted APGD-DLR (torchattacks), as AutoAttack runs them: a sample is
    robust only if it is classified correctly clean and after every attack. eps in pixel units.

    APGD-T attacks each sample towards its `n_target_classes` most likely wrong classes (ranked by the clean
    logits; AutoAttack's default 9), or towards all other classes where there are fewer (`target_classes`)."""
    batches = ({"images": images[i:i + batch_size], "labels": labels[i:i + batch_size]}
               for i in range(0, len(images), batch_size))
    return robust_accuracy_batches(clip, batches, eps, steps, classes, n_target_classes)


def robust_accuracy_batches(clip: Clip, batches, eps: float, steps: int = 100, classes=None,
                            n_target_classes: int = 9) -> dict[str, float]:
    """`robust_accuracy` over an iterable of batches ({"images", "labels"}): memory is one batch."""
    import torchattacks

    from .evaluation import to_model_size
    clip.model.eval()
    dev = next(clip.model.parameters()).device
    clf = ZeroShotClassifier(clip, class_embeddings(clip, classes).to(dev)).eval()
    attacks = [torchattacks.APGD(clf, norm="Linf", eps=eps, steps=steps, loss="ce", seed=0),
               apgd_targeted(clf, eps, steps, target_classes(clf.classes.shape[0], n_target_classes))]
    robust = total = 0
    max_dev = 0.0
    attacked = [0] * len(attacks)  # samples each attack ran on (those every earlier one left correct)
    for batch in batches:
        x, y = to_model_size(clip, batch["images"]).to(dev), batch["labels"].to(dev)  # attacked at the model's size
        ok, dev_i = robust_batch(clf, attacks, x, y, eps, attacked)
        max_dev = max(max_dev, dev_i)
        robust, total = robust + int(ok.sum()), total + len(y)
    from .ui import console
    console.print(f"robust accuracy at eps {eps * 255:g}/255: {robust} of {total} samples; APGD-CE ran on "
                  f"{attacked[0]} of {total}, APGD-T ({attacks[1].n_target_classes} target classes each) on {attacked[1]} "
                  f"of {total}")
    return {"robust_top1": (torch.tensor(float(robust)) / total).item(), "max_perturbation": max_dev}


def target_classes(n_classes: int, n_target_classes: int = 9) -> int:
    """How many target classes APGD-T tries per sample: `n_target_classes`, at most every other class."""
    if n_target_classes < 1:
        raise ValueError(f"robust.n_target_classes = {n_target_classes}; use a whole number >= 1 (AutoAttack: 9)")
    return min(n_target_classes, n_classes - 1)


def apgd_targeted(clf: torch.nn.Module, eps: float, steps: int, n_targets: int):
    """torchattacks.APGDT aimed at the `n_targets` most likely wrong classes of each sample.

    torchattacks' `n_classes` is not the number of classes of the model: APGDT runs `n_classes - 1` targets, the
    classes ranked 2nd, 3rd, ... by the clean logits (`sort(...)[:, -k]`, k = 2..n_classes), and only on samples
    that are still classified correctly, whose top class is the label: so these are the most likely wrong classes,
    exactly AutoAttack's `range(2, n_target_classes + 2)`. Passing the model's class count (as clipshield did
    before) ran C - 1 targets: 999 on ImageNet."""
    import torchattacks
    return torchattacks.APGDT(clf, norm="Linf", eps=eps, steps=steps, seed=0, n_classes=n_targets + 1)


def robust_batch(clf: torch.nn.Module, attacks: list, x: torch.Tensor, y: torch.Tensor, eps: float,
                 attacked: list[int] | None = None):
    """(robust mask, largest |delta|) of one batch: correct clean and after every attack (worst case per sample).
    As AutoAttack, each attack runs only on the samples every earlier attack left correct: a sample already
    broken cannot become robust again, so this is the same worst case at a fraction of the cost. `attacked[i]`
    (if given) grows by the number of samples attack i ran on."""
    with torch.no_grad():
        ok = clf(x).argmax(-1) == y
    max_dev = 0.0
    for i, attack in enumerate(attacks):
        idx = ok.nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        if attacked is not None:
            attacked[i] += idx.numel()
        x_adv = attack(x[idx], y[idx])
        max_dev = max(max_dev, (x_adv - x[idx]).abs().max().item())
        if x_adv.min() < 0 or x_adv.max() > 1 or max_dev > eps + 1e-6:
            raise RuntimeError(f"attack left the eps-ball or [0,1] (max |delta| {max_dev}, eps {eps})")
        with torch.no_grad():
            ok[idx] = clf(x_adv).argmax(-1) == y[idx]
    return ok, max_dev


def embedding_distortion(clip: Clip, reference: Clip, images: torch.Tensor, eps: float, steps: int = 10) -> dict:
    """E||f_I(x) - f_I^0(x)||^2 on clean inputs, and at the worst point of the eps-ball found by PGD."""
    dev = next(clip.model.parameters()).device
    clean = (encode_images(clip, images) - encode_images(reference, images)).pow(2).sum(-1).mean().item()
    x = images.to(dev)
    with torch.no_grad():
        ref = reference.encode_images(x)
    clip.model.eval()
    x_adv = pgd(lambda z: (clip.encode_images(z) - ref).pow(2).sum(-1).mean(), x, eps, steps, eps / 4)
    with torch.no_grad():
        adv = (clip.encode_images(x_adv) - ref).pow(2).sum(-1).mean().item()
    return {"distortion_clean": clean, "distortion_adv": adv}


ROBUST_BATCH = 250  # images per APGD call (torchattacks re-seeds every call: results depend on these chunks)


def robust_accuracies(clip: Clip, test, rp: RobustParams) -> dict:
    """robust_top1_eps<E> for every eps of `rp` (1/255 units), on the first `rp.n` test images of `test` (an in-memory
    batch from `load_all` or a streamed `shards.EvalSet`)."""
    from .evaluation import eval_batches, eval_classes
    return {f"robust_top1_eps{e:g}".replace(".", "_"):
            robust_accuracy_batches(clip, eval_batches(test, ROBUST_BATCH, limit=rp.n), e / 255, rp.steps,
                                    classes=eval_classes(test), n_target_classes=rp.n_target_classes)["robust_top1"]
            for e in rp.eps}


def robust_metrics(clip: Clip, reference: Clip, test, rp: RobustParams) -> dict:
    accuracies = robust_accuracies(clip, test, rp)  # first: the distortion's PGD start draws from the global RNG
    head = test["images"][:rp.distortion_n] if isinstance(test, dict) else test.head(rp.distortion_n)["images"]
    return accuracies | embedding_distortion(clip, reference, head, max(rp.eps) / 255)
