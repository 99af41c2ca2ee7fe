"""Adversarial robustness (METHODS.md §5-6): FARE/TeCoA fine-tuning stages and worst-case APGD evaluation."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from .attacks.pgd import pgd
from .evaluation import class_embeddings, encode_images
from .models import Clip


class ZeroShotClassifier(torch.nn.Module):
    """Pixels in [0,1] -> 100 * cosine to the class embeddings; normalisation happens inside forward."""

    def __init__(self, clip: Clip, classes: torch.Tensor):
        super().__init__()
        self.clip = clip
        self.model = clip.model  # registered so .eval()/.to() reach it
        self.register_buffer("classes", classes)

    def forward(self, x):
        return 100.0 * self.clip.encode_images(x, normalize=True) @ self.classes.T


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


@dataclasses.dataclass
class RobustParams:
    eps: list[float]        # in 1/255 units
    n: int
    steps: int
    distortion_n: int = 200
    n_target_classes: int = 9   # APGD-T targets per sample: the most likely wrong classes (AutoAttack: 9)


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


def harden(run: str, params_path: str | Path = "params.yaml") -> dict:
    """Run `harden.runs.<run>`: FARE/TeCoA fine-tuning of models/<start> on the clean train shards -> models/<run>,
    evaluated for clean accuracy, ASR (where the start model had a trigger), robust accuracy, distortion."""
    from .params import AttackParams, EvalParams, HardenParams, load_section, objective_options, parse, read_yaml
    from .distributed import is_main
    from .pipeline import data_hash, finish_model, load_test, run_training
    from .models import load, read_provenance
    from .objectives import build_objective
    raw = read_yaml(params_path)
    p = load_section(HardenParams, "harden", params_path)
    rp = parse(RobustParams, raw["robust"], "robust")
    attack = load_section(AttackParams, "attack", params_path)
    ev = load_section(EvalParams, "eval", params_path)
    if run not in p.runs:
        raise ValueError(f"unknown harden run {run!r}; harden.runs lists: {', '.join(p.runs) or 'none'}")
    spec = p.runs[run]
    method, start = spec["method"], spec["start"]
    options = objective_options(method, raw.get(method) or {}) | ({"eps": spec["eps"]} if "eps" in spec else {})
    clip = load(f"models/{start}")
    reference = load("models/clean")
    test = load_test(ev)
    objective = build_objective(method, **options)
    if method == "tecoa":  # supervised: the class space the training shards are labelled with
        from .data.classes import read_classes
        objective.class_space = read_classes(p.data)
    log = run_training(clip, objective, p.data, p, run)
    parent = read_provenance(f"models/{start}")
    trigger = parent.get("attack", {}).get("trigger")
    triggers = {trigger: attack.options.get(trigger, {})} if trigger else None
    provenance = {"stage": "harden", "parent": {"model": f"models/{start}", "name": start},
                  "attack": parent.get("attack"), "defence": {**(parent.get("defence") or {}),
                                                              "robust": {"method": method, "options": options}},
                  "data": {"train": data_hash(p.data)},
                  "params": {k: v for k, v in vars(p).items() if k != "runs"}, "training": log}
    extra = robust_metrics(clip, reference, test, rp) if is_main() else {}
    return finish_model(clip, run, f"models/{run}", f"metrics/{run}.json", provenance, test, ev, triggers,
                        attack.target, extra=extra)


def robust_baseline(model: str = "clean", params_path: str | Path = "params.yaml") -> dict:
    """Robust accuracy and distortion of an existing model (the clean model's row of the robustness table)."""
    import json

    from .params import EvalParams, load_section, parse, read_yaml
    from .pipeline import load_test, write_metrics
    from .models import load
    rp = parse(RobustParams, read_yaml(params_path)["robust"], "robust")
    clip = load(f"models/{model}")
    metrics = robust_metrics(clip, load("models/clean"), load_test(load_section(EvalParams, "eval", params_path)), rp)
    write_metrics(f"metrics/robust-{model}.json", metrics)
    print(json.dumps(metrics))
    return metrics
