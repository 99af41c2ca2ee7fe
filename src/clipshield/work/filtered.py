"""Stages `filter` and `filtered`: a defence by detection (docs/methods.md §9). The pairs of a poisoned set that
score highest (the backdoored model's embeddings, stage detect) are dropped, and the backdoor stage's training is
run again from the clean model on the rest."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from ..data import shards
from ..data.classes import classes_file, read_classes
from ..detection import drop_top
from ..objectives import build_objective
from ..params import EvalParams
from ..ui import progress_bar, summary
from .common import data_hash, parent_model, write_metrics
from .detect import poisoned_keys
from .train import train_model


def read_scores(scores_dir: str | Path, score: str) -> tuple[list[str], torch.Tensor]:
    """The keys and one score of every pair, from the detect stage's scores.jsonl."""
    path = Path(scores_dir) / "scores.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if rows and score not in rows[0]:
        held = ", ".join(k for k in rows[0] if k not in ("key", "poisoned"))
        raise shards.DataError(f"{path} holds no score `{score}` (it holds {held}); re-run the detect stage "
                               f"(`dvc repro detect`) or choose one of them (detect.score)")
    return [r["key"] for r in rows], torch.tensor([float(r[score]) for r in rows])


def filter_set(trigger: str, p, data_dir, scores_dir, out_dir, metrics_file) -> dict:
    """`out_dir` (data/filtered/<trigger>): the pairs of `data_dir` but the round(filter_fraction * N) with the
    highest `p.score`, with a manifest.jsonl of the poisoned pairs that survived; `metrics_file` counts them."""
    keys, scores = read_scores(scores_dir, p.score)
    n = shards.num_samples(data_dir)
    if len(keys) != n:
        raise shards.DataError(f"{scores_dir}/scores.jsonl scores {len(keys)} pairs but {data_dir} holds {n}; re-run "
                               f"the detect stage (`dvc repro detect`)")
    dropped = {k for k, kept in zip(keys, drop_top(scores, p.filter_fraction).tolist()) if not kept}
    poisoned = poisoned_keys(data_dir)
    per_shard = max(json.loads((Path(data_dir) / "sizes.json").read_text()).values())
    with progress_bar(f"filter {trigger}", total=n) as advance:
        def kept():
            for s in shards.iter_samples(data_dir, decode=False):
                advance()
                if s["key"] not in dropped:
                    yield s["key"], s["image"], s["caption"], s["meta"]
        shards.write_shards(kept(), out_dir, prefix="train", per_shard=per_shard,
                            extra_files=classes_file(read_classes(data_dir)))
    manifest = [line for line in (Path(data_dir) / "manifest.jsonl").read_text().splitlines()
                if line.strip() and json.loads(line)["key"] not in dropped]
    (Path(out_dir) / "manifest.jsonl").write_text("".join(line + "\n" for line in manifest))
    counts = {"pairs": n, "dropped": len(dropped), "poisoned": len(poisoned),
              "poisoned_dropped": len(poisoned & dropped), "poisoned_left": len(poisoned - dropped),
              "score": p.score, "filter_fraction": p.filter_fraction}
    write_metrics(metrics_file, counts)
    summary(f"filter {trigger}: the {len(dropped)} highest {p.score} scores dropped", counts)
    return counts


def filtered(trigger: str, attack, poison_p, detect_p, p, ev: EvalParams, seed, start, data_dir, test_dir, out_model,
             metrics_file) -> dict:
    """The backdoor stage's training (the CLIP loss, the backdoor section's budget, training seed `seed`) from the
    clean model `start` on the filtered set `data_dir` -> `out_model` (filtered-<trigger>-s<seed>). No ASR gate:
    a low ASR is the defence working."""
    p = dataclasses.replace(p, seed=seed)
    options = attack.options.get(trigger, {})
    left = len(poisoned_keys(data_dir))
    return train_model(start, build_objective("clip"), data_dir, p, ev, test_dir, out_model, metrics_file,
                       dict(stage="filtered", seed=seed, parent=parent_model(start),
                            attack={"kind": "backdoor", "trigger": trigger, "options": options, "rate": poison_p.rate,
                                    "target": attack.target, "seed": poison_p.seed},
                            defence={"kind": "filter", "score": detect_p.score, "k": detect_p.k,
                                     "batch_size": detect_p.batch_size, "fraction": detect_p.filter_fraction,
                                     "poisoned_left": left},
                            data={"train": data_hash(data_dir)}, params=vars(p)),
                       {trigger: options}, attack.target)
