"""Stage `data`: the procedural world's (or imported) train and test shards."""
from __future__ import annotations

from pathlib import Path

from ..data import shards
from ..data.world import get_world, render
from ..params import DataParams
from ..ui import progress_bar, summary


def world_samples(world: str, seed: int, n: int, size: int, prefix: str):
    w = get_world(world)
    for i in range(n):
        img, caption, meta = render(w, seed, i, size)
        yield f"{prefix}{i:08d}", img, caption, meta


def make_data(p: DataParams, train_dir, test_dir) -> dict:
    """`train_dir` and `test_dir` (data/train, data/test): the procedural world (data.source world) or imported
    real shards (data.source shards: img2dataset CC3M-style train shards, labelled ImageNet-val-style test shards).
    Both folders carry classes.json, the class space of the zero-shot task and of the attack target."""
    from ..data.classes import classes_file, load_classes
    from ..data.imports import external_samples, source_shards
    dirs = {"train": Path(train_dir), "test": Path(test_dir)}
    classes = load_classes(p.classes)
    counts = {}
    if p.source == "world":
        splits = [(split, world_samples(p.world, seed, n, p.image_size, split))
                  for split, n, seed in (("train", p.train_n, p.seed), ("test", p.test_n, p.test_seed))]
    else:  # both sources are resolved first, and the labelled test set (the likelier to be refused) is written first
        source_shards(p.train_shards), source_shards(p.test_shards)
        splits = [("test", external_samples(p.test_shards, p.image_size, classes, "test", True, p.test_n)),
                  ("train", external_samples(p.train_shards, p.image_size, classes, "train", False, p.train_n))]
    with progress_bar("procedural world" if p.source == "world" else "import shards",
                      total=p.train_n + p.test_n if p.train_n and p.test_n else None) as advance:
        for split, samples in splits:
            def counted(samples):
                for s in samples:
                    counts[split] = counts.get(split, 0) + 1
                    advance()
                    yield s
            shards.write_shards(counted(samples), dirs[split], prefix=split, per_shard=p.per_shard,
                                image_format="auto" if p.source == "world" else "jpg", extra_files=classes_file(classes))
    source = {"world": p.world} if p.source == "world" else {"train": p.train_shards, "test": p.test_shards}
    summary("data", {f"{k} samples": v for k, v in counts.items()} | source
            | {"classes": f"{classes.source} ({len(classes.names)})", "size": p.image_size})
    return counts
