"""Step time of every objective on one batch, and FARE's step against its floor: PGD-10 needs 10
vision forward+backward passes on the input plus one for the update, so the floor is 11 x (one
vision forward+backward). Goal: FARE step / (11 x vision fwd+bwd) <= 1.1. Measured in one process,
alternating, best of `--rounds`.

    python benchmarks/objectives.py [--model tiny-rn] [--batch 64] [--steps 5] [--rounds 3]
"""
from __future__ import annotations

import argparse
import time

import torch

from clipshield.data.world import SHAPES
from clipshield.models import create, frozen_copy
from clipshield.objectives import build_objective
from clipshield.training import param_groups, set_train_mode


def make_batch(n: int, size: int) -> dict:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % len(SHAPES)
    return {"images": torch.rand(n, 3, size, size, generator=g), "labels": labels,
            "captions": [f"a photo of a red {SHAPES[i]}." for i in labels.tolist()]}


def time_it(fn, steps: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t0) / steps


def objective_step(clip, frozen, objective, batch, opt):
    def step():
        set_train_mode(clip.model, getattr(objective, "train_batchnorm", True))
        loss, _ = objective(batch, clip, frozen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def vision_fwd_bwd(clip, batch):
    def step():
        x = batch["images"].clone().requires_grad_(True)
        clip.encode_images(x).pow(2).sum().backward()
    return step


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="tiny-rn")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    clip = create(a.model, seed=0)
    frozen = frozen_copy(clip)
    batch = make_batch(a.batch, clip.image_size)
    methods = ["clip", "finetune", "cleanclip", "par", "fare", "tecoa"]
    steps = {m: [] for m in methods + ["vision fwd+bwd"]}
    for _ in range(a.rounds):
        for m in methods:
            objective = build_objective(m)
            opt = torch.optim.AdamW(param_groups(list(objective.trainable(clip)), 0.0), lr=1e-7)
            steps[m].append(time_it(objective_step(clip, frozen, objective, batch, opt), a.steps))
        clip.model.eval()
        steps["vision fwd+bwd"].append(time_it(vision_fwd_bwd(clip, batch), a.steps))
    best = {k: min(v) for k, v in steps.items()}
    print(f"model {a.model}, batch {a.batch}, {a.steps} steps x {a.rounds} rounds, {torch.get_num_threads()} threads")
    for k, v in best.items():
        print(f"{k:>16}: {v * 1000:8.1f} ms/step")
    floor = 11 * best["vision fwd+bwd"]
    print(f"FARE step / (11 x vision fwd+bwd) = {best['fare'] / floor:.3f}   (floor {floor * 1000:.1f} ms; goal <= 1.1)")
    print(f"TeCoA step / (11 x vision fwd+bwd) = {best['tecoa'] / floor:.3f}")


if __name__ == "__main__":
    main()
