"""Metrics (docs/methods.md §3). Pure functions on embeddings at the core; `evaluate_model` wires them up."""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Sequence

import torch

from .attacks.triggers import apply_trigger
from .data.classes import ClassSpace, world_classes
from .seeds import EVAL_SEED, EVAL_TRIGGER, derive_seed

if TYPE_CHECKING:  # annotations only: the objectives (tecoa) and the report use these metrics without loading models
    from .models import Clip


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


def asr_per_target(predictions: torch.Tensor, labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """`asr` of `attack_success_rate` with every class in turn as the target: entry c is the fraction of triggered
    images of other classes predicted c (nan for a class that every image belongs to)."""
    hits = torch.zeros(n_classes).index_add_(0, predictions, (predictions != labels).float())
    others = len(labels) - torch.bincount(labels, minlength=n_classes).float()
    return torch.where(others > 0, hits / others.clamp(min=1), torch.tensor(float("nan")))


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


def eval_seeds(start: int, n: int) -> list[int]:
    """Trigger seeds of test images start..start+n-1 (a hash of their index: never a training sample's seed)."""
    return [derive_seed(EVAL_TRIGGER, EVAL_SEED, i) for i in range(start, start + n)]


def trigger_images(images: torch.Tensor, trigger: str, options: dict | None = None, start: int = 0) -> torch.Tensor:
    """Test images `start`.. with the trigger applied, each with its own evaluation seed."""
    seeds = eval_seeds(start, len(images))
    return apply_trigger(trigger, images, seeds, **(options or {}))


EVAL_BATCH = 500  # images per encoder call in evaluation: the same chunks in memory and streamed, so the same bits


def eval_batches(test, batch_size: int = EVAL_BATCH, limit: int | None = None):
    """Batches (images, labels, captions, start) of a test set: an in-memory batch from `load_all` (sliced) or a
    `shards.EvalSet` (streamed from its shards). Either way the same samples in the same chunks."""
    if isinstance(test, dict):
        n = len(test["labels"]) if limit is None else min(limit, len(test["labels"]))
        for i in range(0, n, batch_size):
            j = min(i + batch_size, n)
            yield {"images": test["images"][i:j], "labels": test["labels"][i:j], "captions": test["captions"][i:j],
                   "start": i}
    else:
        yield from test.batches(batch_size, limit)


def eval_classes(test) -> ClassSpace:
    return (test.get("classes") if isinstance(test, dict) else test.classes) or world_classes()


def asr_by_target(clip: Clip, test, trigger: str, options: dict | None = None) -> dict[str, float]:
    """{class: ASR with that class as the target} for `trigger` on `test`: how often the model already calls
    triggered images of other classes each class (for a clean model: the baseline of every possible target)."""
    space = eval_classes(test)
    classes = class_embeddings(clip, space)
    predictions, labels = [], []
    for batch in eval_batches(test):
        trig = encode_images(clip, trigger_images(batch["images"], trigger, options, start=batch["start"]))
        predictions.append(zeroshot_logits(trig, classes).argmax(dim=-1))
        labels.append(batch["labels"])
    per = asr_per_target(torch.cat(predictions), torch.cat(labels), len(space.names))
    return {name: round(v, 4) for name, v in zip(space.names, per.tolist())}


def _mean(count: int, n: int) -> float:
    """count / n as a float32 mean of n booleans gives it (bit for bit), or nan for n = 0."""
    return (torch.tensor(float(count)) / n).item() if n else float("nan")


def evaluate_model(clip: Clip, test, triggers: dict[str, dict] | None = None, target: str | None = None,
                   retrieval_n: int = 1000, suffix_always: bool = False) -> dict[str, float]:
    """Clean zero-shot top-1 and retrieval on `test` (a batch from `load_all` or a `shards.EvalSet`, with its class
    space); for each trigger {name: options}, ASR (non-target and all) and retrieval ASR, suffixed `_<trigger>`
    where there are several triggers (or `suffix_always`).

    One pass over the test set, batch by batch: accuracy and ASR are counts, so memory does not grow with the test
    set; retrieval keeps its own bounded subset, the first `retrieval_n` samples (features and captions)."""
    space = eval_classes(test)
    classes = class_embeddings(clip, space)
    t = space.index(target) if triggers else None
    correct = total = 0
    hits = {name: [0, 0, 0] for name in triggers or {}}   # target hits among non-target images, all hits, non-target
    feats, captions, labels, trig_feats = [], [], [], {name: [] for name in triggers or {}}
    kept = 0
    for batch in eval_batches(test):
        y = batch["labels"]
        if (y < 0).any() or int(y.max()) >= len(space.names):
            raise ValueError(f"the test set's labels must lie in 0..{len(space.names) - 1} (its {len(space.names)} "
                             f"classes, {space.source}); found {int(y.min())}..{int(y.max())}: "
                             f"is it a labelled test set?")
        f = encode_images(clip, batch["images"], batch_size=EVAL_BATCH)
        correct += int((zeroshot_logits(f, classes).argmax(dim=-1) == y).sum())
        total += len(y)
        keep = min(len(y), retrieval_n - kept)
        if keep > 0:
            feats.append(f[:keep])
            captions += batch["captions"][:keep]
            labels.append(y[:keep])
        for name, options in (triggers or {}).items():
            trig = encode_images(clip, trigger_images(batch["images"], name, options, start=batch["start"]),
                                 batch_size=EVAL_BATCH)
            hit = zeroshot_logits(trig, classes).argmax(dim=-1) == t
            non_target = y != t
            hits[name][0] += int(hit[non_target].sum())
            hits[name][1] += int(hit.sum())
            hits[name][2] += int(non_target.sum())
            if keep > 0:
                trig_feats[name].append(trig[:keep])
        kept += max(keep, 0)
    metrics = {"zeroshot_top1": _mean(correct, total), "n_test": total}
    feats, labels = torch.cat(feats), torch.cat(labels)
    texts = encode_texts(clip, captions)
    ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    groups = torch.tensor([ids[c] for c in captions])
    metrics.update(recall_at_k(feats, texts, groups))
    if triggers:
        names_target = torch.tensor([re.search(rf"\b{target}\b", c) is not None for c in captions])
        for name in triggers:
            suffix = "" if len(triggers) == 1 and not suffix_always else f"_{name}"
            metrics[f"asr{suffix}"] = _mean(hits[name][0], hits[name][2])
            metrics[f"asr_all{suffix}"] = _mean(hits[name][1], total)
            metrics[f"retrieval_asr{suffix}"] = retrieval_asr(torch.cat(trig_feats[name])[labels != t], texts,
                                                              names_target)
    return metrics
