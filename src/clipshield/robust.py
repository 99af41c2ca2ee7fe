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
                    batch_size: int = 250, classes=None) -> dict[str, float]:
    """Worst case per sample over APGD-CE and targeted APGD-DLR (torchattacks): a sample is robust only if
    it is classified correctly clean and after every attack. eps in pixel units."""
    import torchattacks
    clip.model.eval()
    dev = next(clip.model.parameters()).device
    clf = ZeroShotClassifier(clip, class_embeddings(clip, classes).to(dev)).eval()
    n_classes = clf.classes.shape[0]
    attacks = [torchattacks.APGD(clf, norm="Linf", eps=eps, steps=steps, loss="ce", seed=0),
               torchattacks.APGDT(clf, norm="Linf", eps=eps, steps=steps, seed=0, n_classes=n_classes)]
    robust, max_dev = [], 0.0
    for i in range(0, len(images), batch_size):
        x, y = images[i:i + batch_size].to(dev), labels[i:i + batch_size].to(dev)
        with torch.no_grad():
            ok = clf(x).argmax(-1) == y
        for attack in attacks:
            x_adv = attack(x, y)
            max_dev = max(max_dev, (x_adv - x).abs().max().item())
            if x_adv.min() < 0 or x_adv.max() > 1 or max_dev > eps + 1e-6:
                raise RuntimeError(f"attack left the eps-ball or [0,1] (max |delta| {max_dev}, eps {eps})")
            with torch.no_grad():
                ok &= clf(x_adv).argmax(-1) == y
        robust.append(ok.cpu())
    return {"robust_top1": torch.cat(robust).float().mean().item(), "max_perturbation": max_dev}


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


def robust_accuracies(clip: Clip, test: dict, rp: RobustParams) -> dict:
    """robust_top1_eps<E> for every eps of `rp` (1/255 units), on the first `rp.n` test images."""
    from .evaluation import to_model_size
    images, labels = to_model_size(clip, test["images"][:rp.n]), test["labels"][:rp.n]  # attacked at the model's size
    return {f"robust_top1_eps{e:g}".replace(".", "_"):
            robust_accuracy(clip, images, labels, e / 255, rp.steps, classes=test.get("classes"))["robust_top1"]
            for e in rp.eps}


def robust_metrics(clip: Clip, reference: Clip, test: dict, rp: RobustParams) -> dict:
    accuracies = robust_accuracies(clip, test, rp)  # first: the distortion's PGD start draws from the global RNG
    return accuracies | embedding_distortion(clip, reference, test["images"][:rp.distortion_n], max(rp.eps) / 255)


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
