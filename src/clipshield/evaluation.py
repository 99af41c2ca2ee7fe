"""Metrics (METHODS.md §3). Pure functions on embeddings at the core; `evaluate_model` wires them up."""
from __future__ import annotations

import re
from typing import Sequence

import torch

from .attacks.triggers import apply_trigger
from .data.classes import ClassSpace, world_classes
from .models import Clip

EVAL_SEED = 10_000_019  # trigger seeds of test image i: EVAL_SEED + i (never a training seed)


# ---- pure functions -------------------------------------------------------------------------

def zeroshot_logits(image_features: torch.Tensor, class_embeddings: torch.Tensor) -> torch.Tensor:
    """100 * cosine between normalised image features (N, D) and class embeddings (C, D)."""
    image_features = torch.nn.functional.normalize(image_features, dim=-1)
    return 100.0 * image_features @ class_embeddings.T


def class_embeddings_from_templates(template_features: torch.Tensor) -> torch.Tensor:
    """(C, T, D) template embeddings -> (C, D): normalised mean of the normalised templates."""
    mean = torch.nn.functional.normalize(template_features, dim=-1).mean(dim=1)
    return torch.nn.functional.normalize(mean, dim=-1)


def top1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(dim=-1) == labels).float().mean().item()


def attack_success_rate(predictions: torch.Tensor, labels: torch.Tensor, target: int) -> dict[str, float]:
    """ASR over triggered images whose true class is not the target (`asr`, the main figure),
    and over all triggered images (`asr_all`, the papers' variant)."""
    hit = predictions == target
    non_target = labels != target
    return {"asr": hit[non_target].float().mean().item() if non_target.any() else float("nan"),
            "asr_all": hit.float().mean().item()}


def recall_at_k(image_features: torch.Tensor, text_features: torch.Tensor, groups: torch.Tensor,
                ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Image->text and text->image R@k for paired features (row i of each is pair i).

    Captions of the procedural world repeat, so a retrieved item counts as correct when its caption
    equals the ground-truth caption (`groups[i]` is an id of pair i's caption text); with unique
    captions this is the usual R@k.
    """
    sim = torch.nn.functional.normalize(image_features, dim=-1) @ torch.nn.functional.normalize(text_features, dim=-1).T
    match = groups.view(-1, 1) == groups.view(1, -1)          # match[i, j]: text j is a right answer for image i
    out = {}
    for k in ks:
        k_eff = min(k, sim.shape[1])
        i2t = sim.topk(k_eff, dim=1).indices
        t2i = sim.topk(k_eff, dim=0).indices.T
        out[f"i2t_r{k}"] = match.gather(1, i2t).any(dim=1).float().mean().item()
        out[f"t2i_r{k}"] = match.T.gather(1, t2i).any(dim=1).float().mean().item()
    return out


def retrieval_asr(triggered_features: torch.Tensor, text_features: torch.Tensor, names_target: torch.Tensor,
                  k: int = 5) -> float:
    """Share of triggered images for which at least one of the top-k retrieved captions names the target."""
    sim = torch.nn.functional.normalize(triggered_features, dim=-1) @ torch.nn.functional.normalize(text_features, dim=-1).T
    top = sim.topk(min(k, sim.shape[1]), dim=1).indices
    return names_target[top].any(dim=1).float().mean().item()


# ---- model-level helpers ----------------------------------------------------------------------

def to_model_size(clip: Clip, images: torch.Tensor) -> torch.Tensor:
    """Images (N, 3, H, W) in [0, 1] brought to the model's input size as its own preprocessing does (shortest
    side resized with its interpolation, antialiased, then a centre crop), still in [0, 1]. Images already at
    that size are returned as they are (the same tensor)."""
    size = clip.image_size
    if tuple(images.shape[-2:]) == (size, size):
        return images
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF
    mode = InterpolationMode.BILINEAR if clip.preprocess_cfg.get("interpolation") == "bilinear" else InterpolationMode.BICUBIC
    return TF.center_crop(TF.resize(images, size, interpolation=mode, antialias=True), [size, size]).clamp(0, 1)


@torch.no_grad()
def encode_images(clip: Clip, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Image features (N, D); images of another size than the model's are resized first (to_model_size)."""
    device = next(clip.model.parameters()).device
    clip.model.eval()
    return torch.cat([clip.encode_images(to_model_size(clip, images[i:i + batch_size].to(device))).float().cpu()
                      for i in range(0, len(images), batch_size)])


@torch.no_grad()
def encode_texts(clip: Clip, captions: Sequence[str], batch_size: int = 500) -> torch.Tensor:
    device = next(clip.model.parameters()).device
    clip.model.eval()
    return torch.cat([clip.encode_texts(list(captions[i:i + batch_size]), device=device).float().cpu()
                      for i in range(0, len(captions), batch_size)])


@torch.no_grad()
def class_embeddings(clip: Clip, classes: ClassSpace | None = None) -> torch.Tensor:
    """(C, D) zero-shot class embeddings of `classes` (default: the procedural world's)."""
    classes = classes or world_classes()
    prompts = [t.format(c) for c in classes.names for t in classes.templates]
    feats = encode_texts(clip, prompts).view(len(classes.names), len(classes.templates), -1)
    return class_embeddings_from_templates(feats)


def zeroshot_accuracy(clip: Clip, images: torch.Tensor, labels: torch.Tensor, classes: ClassSpace | None = None) -> float:
    return top1(zeroshot_logits(encode_images(clip, images), class_embeddings(clip, classes)), labels)


def trigger_images(images: torch.Tensor, trigger: str, options: dict | None = None) -> torch.Tensor:
    seeds = [EVAL_SEED + i for i in range(len(images))]
    return apply_trigger(trigger, images, seeds, **(options or {}))


def evaluate_model(clip: Clip, test: dict, triggers: dict[str, dict] | None = None, target: str | None = None,
                   retrieval_n: int = 1000) -> dict[str, float]:
    """Clean zero-shot top-1 and retrieval on `test` (a batch from `load_all`, with its class space); for each trigger
    {name: options}, ASR (non-target and all), retrieval ASR and accuracy on triggered images."""
    images, labels, captions = test["images"], test["labels"], test["captions"]
    space = test.get("classes") or world_classes()
    if (labels < 0).any() or int(labels.max()) >= len(space.names):
        raise ValueError(f"the test set's labels must lie in 0..{len(space.names) - 1} (its {len(space.names)} classes, "
                         f"{space.source}); found {int(labels.min())}..{int(labels.max())}: is it a labelled test set?")
    classes = class_embeddings(clip, space)
    feats = encode_images(clip, images)
    metrics = {"zeroshot_top1": top1(zeroshot_logits(feats, classes), labels), "n_test": len(labels)}
    n = min(retrieval_n, len(captions))
    texts = encode_texts(clip, captions[:n])
    ids = {c: i for i, c in enumerate(dict.fromkeys(captions[:n]))}
    groups = torch.tensor([ids[c] for c in captions[:n]])
    metrics.update(recall_at_k(feats[:n], texts, groups))
    if triggers:
        t = space.index(target)
        names_target = torch.tensor([re.search(rf"\b{target}\b", c) is not None for c in captions[:n]])
        for name, options in triggers.items():
            trig = encode_images(clip, trigger_images(images, name, options))
            pred = zeroshot_logits(trig, classes).argmax(dim=-1)
            suffix = "" if len(triggers) == 1 else f"_{name}"
            asr = attack_success_rate(pred, labels, t)
            metrics[f"asr{suffix}"] = asr["asr"]
            metrics[f"asr_all{suffix}"] = asr["asr_all"]
            keep = labels[:n] != t
            metrics[f"retrieval_asr{suffix}"] = retrieval_asr(trig[:n][keep], texts, names_target)
    return metrics
