"""CleanCLIP's AutoAugment view of a batch: torchvision's AutoAugment on uint8 tensors (one image at a time)
against clipshield's `auto_augment` (the same transform on PIL images), same draws, alternating rounds.

    python benchmarks/augment.py [--batch 64] [--size 32] [--rounds 5]
"""
from __future__ import annotations

import argparse
import time

import torch

from clipshield.objectives.augment import _autoaugment, auto_augment


def on_tensors(images: torch.Tensor) -> torch.Tensor:
    u8 = (images * 255).round().to(torch.uint8)
    return torch.stack([_autoaugment(x) for x in u8]).float().div(255)


def ms_per_batch(fn, images: torch.Tensor, repeat: int = 10) -> float:
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn(images)
    return (time.perf_counter() - t0) / repeat * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    images = torch.rand(a.batch, 3, a.size, a.size, generator=torch.Generator().manual_seed(0))
    times = {"tensors": [], "PIL": []}
    for _ in range(a.rounds):
        times["tensors"].append(ms_per_batch(on_tensors, images))
        times["PIL"].append(ms_per_batch(auto_augment, images))
    best = {k: min(v) for k, v in times.items()}
    print(f"AutoAugment (ImageNet policy), batch {a.batch} of {a.size} px, best of {a.rounds} rounds")
    for k, v in best.items():
        print(f"  on {k:8s}: {v:7.1f} ms per batch")
    print(f"speed-up: {best['tensors'] / best['PIL']:.2f}x")


if __name__ == "__main__":
    main()
