"""Throughput of clipshield's training loop (streaming shards, tokenising, objective plug-in, schedule,
logging) against a bare loop (open_clip model + open_clip.ClipLoss + AdamW on in-memory tensors, same
batch size), measured in one process, alternating, so the ratio is robust to a noisy machine.

    python benchmarks/train_step.py [--data data/train] [--model tiny-rn] [--batch 128] [--steps 30]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import open_clip
import torch

from clipshield.data import shards
from clipshield.models import create
from clipshield.objectives import build_objective
from clipshield.pipeline import world_samples
from clipshield.training import TrainConfig, train


def bare_loop(model_name: str, batch: dict, steps: int) -> float:
    clip = create(model_name)
    model = clip.model.train()
    tokens = clip.tokenize(batch["captions"])
    images = batch["images"]
    loss_fn = open_clip.ClipLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    t0 = time.perf_counter()
    for _ in range(steps):
        img, txt, scale = model(images, tokens)[:3]
        loss = loss_fn(img, txt, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return steps * len(images) / (time.perf_counter() - t0)


def clipshield_loop(model_name: str, data: Path, batch_size: int, steps: int) -> float:
    clip = create(model_name)
    cfg = TrainConfig(steps=steps, lr=1e-4, log_every=10**9)
    batches = shards.iter_batches(data, batch_size, shuffle=2000, seed=0)
    result = train(clip, build_objective("clip"), batches, cfg, description="clipshield loop")
    return result.samples_per_s


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", type=Path, default=None, help="train shards (default: a temporary 4k-sample world)")
    ap.add_argument("--model", default="tiny-rn")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = a.data
        if data is None:
            data = Path(tmp) / "train"
            shards.write_shards(world_samples("base", 0, 4000, 32, "b"), data, prefix="train", per_shard=1000)
        batch = next(shards.iter_batches(data, a.batch, shuffle=0))
        ours, bare = [], []
        for _ in range(a.rounds):  # alternate so both see the same machine load
            bare.append(bare_loop(a.model, batch, a.steps))
            ours.append(clipshield_loop(a.model, data, a.batch, a.steps))
    best_ours, best_bare = max(ours), max(bare)
    print(f"model {a.model}, batch {a.batch}, {a.steps} steps x {a.rounds} rounds, {torch.get_num_threads()} threads")
    print(f"bare loop (in-memory tensors):      {best_bare:8.1f} samples/s   rounds: {', '.join(f'{x:.0f}' for x in bare)}")
    print(f"clipshield loop (streaming shards): {best_ours:8.1f} samples/s   rounds: {', '.join(f'{x:.0f}' for x in ours)}")
    print(f"ratio clipshield/bare: {best_ours / best_bare:.3f}")


if __name__ == "__main__":
    main()
