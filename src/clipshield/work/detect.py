"""Stage `detect`: every training pair of a poisoned set scored for being a backdoor sample (docs/methods.md §9),
with the backdoored model and, as a control, the clean one; the scores' AUROC against the poisoned set's manifest."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..data import shards
from ..detection import SCORE_LABELS, SCORES, detection_metrics, score_in_batches
from ..evaluation import encode_images
from ..models import load
from ..ui import console, progress_bar, summary, wrote
from .common import device, write_metrics

EMBED_BATCH = 500


def poisoned_keys(data_dir: str | Path) -> set[str]:
    """The keys of the poisoned pairs of a poisoned set: its manifest.jsonl (one JSON object per pair, with "key")."""
    path = Path(data_dir) / "manifest.jsonl"
    if not path.is_file():
        raise shards.DataError(f"{data_dir} has no manifest.jsonl (the poisoned pairs' list, written by the poison "
                               f"stage); re-create it (`dvc repro poison`) or restore it (`dvc pull`)")
    return {json.loads(line)["key"] for line in path.read_text().splitlines() if line.strip()}


@torch.no_grad()
def embed_training_set(models: dict, data_dir: str | Path) -> tuple[list[str], dict[str, torch.Tensor]]:
    """The keys of every pair of `data_dir` in shard order and each model's image embeddings of them (N, D), as the
    model computes them (not normalised: the reference's `encode_image`)."""
    for clip in models.values():
        clip.model.to(device())
    keys, feats = [], {name: [] for name in models}
    with progress_bar("detect: embed", total=shards.num_samples(data_dir)) as advance:
        for batch in shards.iter_batches(data_dir, EMBED_BATCH, shuffle=0, epochs=1, drop_last=False):
            keys += batch["keys"]
            for name, clip in models.items():
                feats[name].append(encode_images(clip, batch["images"], EMBED_BATCH))
            advance(len(batch["keys"]))
    return keys, {name: torch.cat(f) for name, f in feats.items()}


def verdict(metrics: dict) -> str:
    """One line: what the metrics say, or that no AUROC exists (a set without poisoned or without clean pairs)."""
    first = next(iter(metrics.values()))
    if first["auroc"] is None:
        return (f"no AUROC: {first['n_poison']} of the {first['n']} pairs are poisoned, and a ranking needs both "
                f"poisoned and clean pairs")
    return ", ".join(f"{SCORE_LABELS[s]} AUROC {m['auroc']:.3f}" for s, m in metrics.items())


def score_distributions(scores: dict[str, torch.Tensor], is_poison: torch.Tensor, title: str, out: Path) -> Path:
    """Histograms of each score, poisoned vs clean pairs (density, so the 1% poisoned stay visible)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(scores), figsize=(4 * len(scores), 3.2), squeeze=False)
    for ax, (name, s) in zip(axes[0], scores.items()):
        lo, hi = torch.quantile(s, 0.001).item(), torch.quantile(s, 0.999).item()
        bins = torch.linspace(lo, hi if hi > lo else lo + 1, 50).tolist()
        ax.hist(s[~is_poison].clamp(lo, hi).numpy(), bins=bins, density=True, alpha=0.6, label="clean pairs")
        if is_poison.any():
            ax.hist(s[is_poison].clamp(lo, hi).numpy(), bins=bins, density=True, alpha=0.6, label="poisoned pairs")
        ax.set_xlabel(SCORE_LABELS[name] + " (higher: more suspicious)")
        ax.set_yticks([])
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    wrote(out)
    return out


def write_scores(path: Path, keys: list[str], is_poison: torch.Tensor, scores: dict[str, torch.Tensor]) -> None:
    """scores.jsonl: one line per pair in shard order, {key, poisoned, <score>: value...}, for the filtering."""
    columns = {name: s.tolist() for name, s in scores.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for i, key in enumerate(keys):
            f.write(json.dumps({"key": key, "poisoned": bool(is_poison[i]),
                                **{name: round(v[i], 6) for name, v in columns.items()}}) + "\n")
    wrote(path)


def detect(trigger: str, p, data_dir, backdoored, clean, metrics_file, out_dir) -> dict:
    """Score every pair of `data_dir` (data/poisoned/<trigger>) with the image embeddings of `backdoored` and of
    `clean` -> `metrics_file` {model: {score: {auroc, precision_at_rate, n, n_poison}}}; `out_dir` holds the
    backdoored model's per-pair scores (scores.jsonl) and the score distributions (scores.png)."""
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    poisoned = poisoned_keys(data_dir)
    keys, feats = embed_training_set({"backdoored": load(backdoored), "clean": load(clean)}, data_dir)
    is_poison = torch.tensor([k in poisoned for k in keys])
    if int(is_poison.sum()) != len(poisoned):
        raise shards.DataError(f"{data_dir}/manifest.jsonl lists {len(poisoned)} poisoned pairs, but "
                               f"{int(is_poison.sum())} of them are in its shards; re-create it (`dvc repro poison`)")
    metrics, scores = {}, {}
    pool = f"random batches of {p.batch_size}" if 0 < p.batch_size < len(keys) else "the whole set"
    for name, x in feats.items():
        console.print(f"detect: {name} model, k = {p.k}, neighbours from {pool}", highlight=False)
        scores[name] = score_in_batches(x, p.k, p.batch_size, p.seed, names=tuple(SCORES))
        metrics[name] = detection_metrics(scores[name], is_poison)
    out = {"backdoored": Path(backdoored).name, "clean": Path(clean).name}
    write_metrics(metrics_file, {role: {s: {k: round(v, 4) if isinstance(v, float) else v for k, v in m.items()}
                                        for s, m in by_score.items()} for role, by_score in metrics.items()})
    write_scores(out_dir / "scores.jsonl", keys, is_poison, scores["backdoored"])
    score_distributions(scores["backdoored"], is_poison, f"{trigger}: {out['backdoored']}, k = {p.k}",
                        out_dir / "scores.png")
    summary(f"detect {trigger}: {int(is_poison.sum())} of {len(keys)} pairs poisoned",
            {f"{name} ({out[name]})": verdict(m) for name, m in metrics.items()}
            | {"seconds": round(time.perf_counter() - t0, 1)})
    return metrics
