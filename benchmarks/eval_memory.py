"""Peak memory of the evaluation (zero-shot accuracy, ASR, retrieval) against the size of the test set.

    python benchmarks/eval_memory.py [--n 2000] [--scale 10] [--model tiny-rn] [--triggers blended,badnet]

Writes a test set of N procedural images (32 px) and one of scale x N (the same shards repeated), then evaluates
a model on each in a fresh subprocess and reads its peak resident memory (resource.getrusage, ru_maxrss). The
streamed evaluation (shards.EvalSet: what the stages use) should stay flat: ratio <= 1.1. `--in-memory` adds the
old way (load_all: every test image in one tensor) for contrast.
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def make_sets(root: Path, n: int, scale: int) -> tuple[Path, Path]:
    from clipshield.data import shards
    from clipshield.pipeline import world_samples
    small, large = root / "x1", root / f"x{scale}"
    per_shard = min(500, n)
    shards.write_shards(world_samples("base", 1, n, 32, "test"), small, prefix="test", per_shard=per_shard)
    large.mkdir()
    sizes = json.loads((small / "sizes.json").read_text())
    big = {}
    for copy in range(scale):  # the same shards repeated: decoding and evaluating cost the same per sample
        for name, count in sizes.items():
            new = f"test-{copy:03d}-{name.removeprefix('test-')}"
            shutil.copy(small / name, large / new)
            big[new] = count
    shards.write_sizes(large, big)
    return small, large


def child(data_dir: str, model: str, triggers: list[str], mode: str) -> None:
    import torch

    from clipshield.data import shards
    from clipshield.evaluation import evaluate_model
    from clipshield.models import create
    torch.manual_seed(0)
    clip = create(model, seed=0)
    test = shards.EvalSet(data_dir) if mode == "stream" else shards.load_all(data_dir)
    t0 = time.perf_counter()
    metrics = evaluate_model(clip, test, {t: {} for t in triggers} or None, "star", retrieval_n=1000)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes
    print(json.dumps({"peak_mb": peak_mb, "seconds": time.perf_counter() - t0, "n_test": metrics["n_test"],
                      "zeroshot_top1": metrics["zeroshot_top1"]}))


def measure(data_dir: Path, args, mode: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", str(data_dir), "--mode", mode, "--model", args.model,
                          "--triggers", args.triggers], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000, help="samples of the 1x test set (the tiny profile's test_n)")
    ap.add_argument("--scale", type=int, default=10)
    ap.add_argument("--model", default="tiny-rn")
    ap.add_argument("--triggers", default="blended", help="comma-separated; empty: clean metrics only")
    ap.add_argument("--in-memory", action="store_true", help="also measure the old load_all evaluation")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="stream", help=argparse.SUPPRESS)
    args = ap.parse_args()
    triggers = [t for t in args.triggers.split(",") if t]
    if args.child:
        return child(args.child, args.model, triggers, args.mode)
    with tempfile.TemporaryDirectory() as tmp:
        small, large = make_sets(Path(tmp), args.n, args.scale)
        for mode in ["stream"] + (["memory"] if args.in_memory else []):
            a, b = measure(small, args, mode), measure(large, args, mode)
            assert a["zeroshot_top1"] == b["zeroshot_top1"], (a, b)  # the same images repeated: the same accuracy
            print(f"{mode:7s} peak RSS: {a['n_test']:>7} samples {a['peak_mb']:8.1f} MB ({a['seconds']:.1f} s)   "
                  f"{b['n_test']:>7} samples {b['peak_mb']:8.1f} MB ({b['seconds']:.1f} s)   "
                  f"ratio {b['peak_mb'] / a['peak_mb']:.3f}")


if __name__ == "__main__":
    main()
