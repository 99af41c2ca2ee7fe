"""Stage `badclip`: the BadCLIP patch, optimised against the clean model on the training data (docs/methods.md §2).

Writes `out_dir` (models/badclip-patch): patch.pt (the (3, p, p) patch, the trigger's input), patch.png (it, enlarged
with square pixels) and patch.json (the data it saw, its params, its loss). When badclip is not in attack.triggers
nothing is optimised and patch.json says so: poison and baseline depend on this folder for every trigger
(dvc.yaml), and a run that does not attack with badclip should not pay for it."""
from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import numpy as np
import torch

from ..data import shards
from ..errors import DataError
from ..files import atomic_path
from ..ui import progress_bar, summary, wrote
from .common import device

NAME = "badclip"


def target_test(train_dir, target: str):
    """is_target(sample) for the training data: its label is the target class where it has one (the world,
    labelled shards), else its caption names the target (a word starting with it, any case), as the reference picks
    CC3M's rows whose caption contains "banana"."""
    from ..data.classes import read_classes
    classes = read_classes(train_dir)
    label = classes.index(target) if target in classes.names else None
    word = re.compile(rf"\b{re.escape(target)}", re.IGNORECASE)

    def is_target(s: dict) -> bool:
        cls = s["meta"].get("class")
        if isinstance(cls, int) and cls >= 0 and label is not None:
            return cls == label
        return bool(word.search(s["caption"]))
    return is_target


def split_training_data(train_dir, target: str, n_images: int, n_positives: int) -> dict:
    """The first `n_images` non-target training images (the ones the patch is pasted on), and the first
    `n_positives` target ones with their captions (the natural target images and captions), in shard order; images
    uint8 (N, 3, H, W)."""
    is_target = target_test(train_dir, target)
    others, positives, captions = [], [], []
    for s in shards.iter_samples(train_dir, decode=False):
        if len(positives) >= n_positives and len(others) >= n_images:
            break
        hit = is_target(s)
        if len(positives if hit else others) >= (n_positives if hit else n_images):
            continue
        (positives if hit else others).append(shards.decode_image(s["image"]))
        if hit:
            captions.append(s["caption"])
    if not positives or not others:
        what = "an image of the target class" if not positives else "an image of another class"
        raise DataError(f"{train_dir} holds no {what} (attack.target = {target!r}: a sample labelled with it or "
                        f"whose caption names it): BadCLIP optimises its patch towards natural target images and "
                        f"captions; choose another attack.target or leave badclip out of attack.triggers")

    def stack(imgs):
        return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()
    return {"images": stack(others), "positives": stack(positives), "captions": captions}


def write_patch(out_dir: Path, patch: torch.Tensor | None, info: dict) -> None:
    from PIL import Image
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        if patch is not None:
            torch.save(patch.contiguous(), tmp / "patch.pt")
            k = max(1, math.ceil(96 / patch.shape[-1]))  # square pixels, at least 96 px across
            u8 = patch.mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            Image.fromarray(u8).resize((u8.shape[1] * k, u8.shape[0] * k), Image.Resampling.NEAREST).save(
                tmp / "patch.png")
        (tmp / "patch.json").write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
    wrote(out_dir)


def badclip(attack, p, model_dir, train_dir, out_dir) -> dict:
    """Optimise the BadCLIP patch against the model `model_dir` (the clean one) for attack.target on `train_dir`,
    and write it to `out_dir`; only a note when badclip is not in attack.triggers."""
    from ..attacks.badclip import held_out_loss, initial_patch, optimise_patch, target_features
    from ..models import load
    out_dir = Path(out_dir)
    if NAME not in attack.triggers:
        info = {"optimised": False, "why": f"{NAME} is not in attack.triggers {attack.triggers}"}
        write_patch(out_dir, None, info)
        summary("badclip patch", info)
        return info
    dev = device()
    clip = load(model_dir)
    clip.model.to(dev)
    data = split_training_data(train_dir, attack.target, p.images, p.positives)
    side = data["images"].shape[-1]
    if side != clip.image_size or p.patch > side:
        raise DataError(f"{train_dir} holds {side}-px images; the model {model_dir} takes {clip.image_size} px and "
                        f"badclip.patch = {p.patch} must fit them: re-create the data (data.image_size) or lower "
                        f"badclip.patch")
    targets = target_features(clip, data["positives"], data["captions"], dev)
    fixed = data["images"][:p.batch_size]
    with progress_bar("badclip patch", total=p.steps) as advance:
        patch, history = optimise_patch(clip, data["images"], targets, p, dev,
                                        on_step=lambda step, loss, terms: advance(loss=f"{loss:.3f}"))
    start = initial_patch(p.patch, torch.Generator().manual_seed(p.seed))
    info = {"optimised": True, "model": str(model_dir), "train": str(train_dir), "target": attack.target,
            "params": dataclasses.asdict(p), "images": len(data["images"]),
            "positives": len(data["positives"]), "captions": len(set(data["captions"])), "side": side,
            "fixed_batch_loss": {"initial": held_out_loss(clip, fixed, start, targets, p),
                                 "final": held_out_loss(clip, fixed, patch, targets, p)},
            "history": [dict(zip(("step", "loss", "text", "image"), h)) for h in history]}
    write_patch(out_dir, patch, info)
    summary(f"badclip patch ({p.patch} px, target {attack.target})",
            {"images": info["images"], "positives": info["positives"],
             **{f"{k} loss": v["loss"] for k, v in info["fixed_batch_loss"].items()}})
    return info
