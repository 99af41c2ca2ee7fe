"""Throughput of clipshield's training loop (streaming shards, tokenising, objective plug-in, schedule,
logging) against a bare loop (open_clip model + open_clip.ClipLoss + fused AdamW, as clipshield uses, on
in-memory tensors tokenised once, same batch size), measured in one process, alternating, so the ratio is
robust to a noisy machine: what clipshield's machinery costs.

    python benchmarks/train_step.py [--data data/train] [--model tiny-rn] [--batch 128] [--steps 30]
    python benchmarks/train_step.py --formats ppm,png   # the temporary world stored both ways, one line each
    python benchmarks/train_step.py --data data/train --steps 5 --profile 15   # where a step's time goes

With --layouts contiguous,channels_last it times the bare loop with the conv weights in each memory layout.
clipshield keeps PyTorch's default (contiguous): on tiny-rn, a 2-core AMD EPYC with AVX2, the world's images,
channels-last steps in 0.98-1.01x the time (0.82x on torch.randn inputs, which is why a synthetic benchmark misleads).
With --profile N it runs torch.profiler over --steps bare steps and prints the N ops with the most self time per
step, grouped by input shape: which layer costs what (docs/decisions.md#model).
With --compile it times the bare loop eager and with the model under torch.compile (compile time printed). On
tiny-rn, a 2-core AMD EPYC with AVX2: 0.955x and 0.971x the step time in two runs, after 122 s of compiling with a cold
inductor cache (7 s warm). The default run's ~1,700 s of training would save about 60 s, and every stage (its own
process) compiles again, so `train.compile: auto` stays off without a GPU.

With --nproc N it instead compares the clipshield loop on 1 process and on N processes (torchrun + DDP,
same global batch), and with --objectives clip,par,fare (e.g. --model ViT-B-32 --batch 256 --bf16 on a
GPU) the samples/s of each objective; --accum K adds each objective with K micro-batches per step
(gradient accumulation: contrastive objectives pay one extra forward per micro-batch).
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


LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def bare_step(model_name: str, batch: dict, bf16: bool = False, layout: str = "contiguous", compiled: bool = False):
    """One training step of the bare loop, as a closure over its model and optimizer (warmed up)."""
    from clipshield.pipeline import device
    clip = create(model_name)
    model = clip.model.train().to(device(), memory_format=LAYOUTS[layout])
    tokens = clip.tokenize(batch["captions"]).to(device())
    mean = torch.tensor(clip.preprocess_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(clip.preprocess_cfg["std"]).view(1, 3, 1, 1)
    images = ((batch["images"] - mean) / std).to(device())
    loss_fn = open_clip.ClipLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # as clipshield's loop: the ratio is overhead
    autocast = torch.autocast(device().type, dtype=torch.bfloat16, enabled=bf16)
    forward = torch.compile(model) if compiled else model

    def step():
        with autocast:
            img, txt, scale = forward(images, tokens)[:3]
            loss = loss_fn(img, txt, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    t0 = time.perf_counter()
    step()  # warm-up (CUDA kernels, allocator; compiling), as clipshield's loop warms up on its first step
    sync()
    if compiled:
        print(f"compiled in {time.perf_counter() - t0:.1f} s (first step)")
    return step


def bare_loop(model_name: str, batch: dict, steps: int, bf16: bool = False) -> float:
    step = bare_step(model_name, batch, bf16)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return steps * len(batch["images"]) / (time.perf_counter() - t0)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def clipshield_loop(model_name: str, data: Path, batch_size: int, steps: int, objective: str = "clip",
                    bf16: bool = False, accum: int = 1, threads: int = 0) -> float:
    """Samples/s (global, over all processes) of the loop; under torchrun every rank trains its slice."""
    from clipshield import distributed
    from clipshield.models import frozen_copy
    from clipshield.pipeline import device
    distributed.init_from_env()
    clip = create(model_name)
    clip.model.to(device())
    obj = build_objective(objective)
    frozen = frozen_copy(clip) if getattr(obj, "needs_frozen", False) else None
    cfg = TrainConfig(steps=steps, lr=1e-4, log_every=10**9, bf16=bf16, accum=accum)
    batches = shards.iter_batches(data, batch_size, shuffle=2000, seed=0, threads=threads, uint8=True)
    result = train(clip, obj, batches, cfg, frozen=frozen, description=f"clipshield loop ({objective})")
    return result.samples_per_s * distributed.world()[1]


def compare_processes(a, data: Path) -> None:
    import os
    import subprocess
    import sys
    rates = {}
    for n in (1, a.nproc):
        cmd = [__file__, "--worker", "--data", str(data), "--model", a.model, "--batch", str(a.batch),
               "--steps", str(a.steps)]
        cmd = [sys.executable, *(["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]
                                 if n > 1 else []), *cmd]
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // n))}
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
        rates[n] = float(out.split("samples/s")[0].split()[-1])
    print(f"model {a.model}, global batch {a.batch}, {a.steps} steps, {os.cpu_count()} CPU cores shared by the processes")
    for n, r in rates.items():
        print(f"{n} process{'es' if n > 1 else ''}: {r:8.1f} samples/s")
    print(f"ratio {a.nproc} processes / 1: {rates[a.nproc] / rates[1]:.3f}")


def compare_steps(a, steps: dict) -> None:
    """Alternates chunks of 5 steps between the variants and reports the median of the per-chunk time ratios
    to the first: this machine's load drifts by 20% within seconds, a chunk sees the same load for every variant."""
    import statistics
    names = list(steps)
    seconds = {k: [] for k in names}
    for _ in range(max(1, a.steps * a.rounds // 5)):
        for k, step in steps.items():
            t0 = time.perf_counter()
            for _ in range(5):
                step()
            sync()
            seconds[k].append((time.perf_counter() - t0) / 5)
    print(f"bare loop, model {a.model}, batch {a.batch}, bf16 {a.bf16}, {len(seconds[names[0]])} chunks of 5 steps, "
          f"{torch.get_num_threads()} threads, device {'cuda' if torch.cuda.is_available() else 'cpu'}")
    for k, s in seconds.items():
        ratio = statistics.median(x / y for x, y in zip(s, seconds[names[0]]))
        print(f"{k:>14}: {statistics.median(s):.4f} s/step (median)   step time / {names[0]}'s: {ratio:.3f} (median over chunks)")


def profile_steps(step, steps: int, top: int) -> None:
    """Where a step's time goes: the ops with the most self CPU time, per input shape, per step."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            step()
    rows = sorted(prof.key_averages(group_by_input_shape=True), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in rows)
    print(f"{total / steps / 1e3:.0f} ms of self CPU time per step ({steps} steps); the top {top}:")
    for e in rows[:top]:
        shapes = ", ".join("x".join(map(str, s)) for s in e.input_shapes if s)
        print(f"{e.self_cpu_time_total / steps / 1e3:8.1f} ms {100 * e.self_cpu_time_total / total:5.1f}%  "
              f"{e.key}  [{shapes}]")


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", type=Path, default=None, help="train shards (default: a temporary 4k-sample world)")
    ap.add_argument("--model", default="tiny-rn")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--nproc", type=int, default=1, help="compare 1 process with NPROC (torchrun + DDP)")
    ap.add_argument("--objectives", default="", help="comma-separated objectives to time, e.g. clip,par,fare")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    ap.add_argument("--accum", type=int, default=1, help="also time K micro-batches per step (with --objectives)")
    ap.add_argument("--loader-threads", default="0", help="decoding threads ahead of the model (train.loader_threads); "
                    "a comma-separated list times each (e.g. 0,8)")
    ap.add_argument("--formats", default="auto", help="image formats of the temporary world (shards.write_shards "
                    "image_format), comma-separated, each timed: e.g. ppm,png")
    variants = ap.add_mutually_exclusive_group()
    variants.add_argument("--layouts", default="", help="time the bare loop with each weight layout, e.g. "
                          "contiguous,channels_last")
    variants.add_argument("--compile", action="store_true", help="time the bare loop eager and under torch.compile")
    variants.add_argument("--profile", type=int, default=0, metavar="N", help="torch.profiler on --steps bare steps: "
                          "the N ops with the most self time, grouped by input shape (which layer costs what)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    unknown = [k for k in a.layouts.split(",") if a.layouts and k not in LAYOUTS]
    if unknown:
        ap.error(f"--layouts: unknown layout(s) {', '.join(unknown)}; choose from {', '.join(LAYOUTS)}")
    if a.worker:
        rate = clipshield_loop(a.model, a.data, a.batch, a.steps)
        from clipshield import distributed
        if distributed.is_main():
            print(f"{rate:.1f} samples/s")
        return
    with tempfile.TemporaryDirectory() as tmp:
        sets = {"": a.data}
        if a.data is None:  # the world at the model's input size (ViT-B-32: 224 px)
            size = create(a.model).image_size
            sets = {f: Path(tmp) / f for f in a.formats.split(",")}
            for f, folder in sets.items():
                shards.write_shards(world_samples("base", 0, 4000 if size <= 64 else 2048, size, "b"), folder,
                                    prefix="train", per_shard=1000, image_format=f)
        data = next(iter(sets.values()))
        threads = [int(t) for t in a.loader_threads.split(",")]
        if a.nproc > 1:
            return compare_processes(a, data)
        if a.objectives:
            for objective in a.objectives.split(","):
                for t in threads:
                    rates = {}
                    for k in sorted({1, a.accum}):
                        rates[k] = max(clipshield_loop(a.model, data, a.batch, a.steps, objective, a.bf16, accum=k,
                                                       threads=t) for _ in range(a.rounds))
                    print(f"{objective:>10}: {rates[1]:8.1f} samples/s  (model {a.model}, batch {a.batch}, bf16 {a.bf16}, "
                          f"loader threads {t})"
                          + (f"; accum {a.accum}: {rates[a.accum]:8.1f} samples/s, ratio {rates[a.accum] / rates[1]:.3f}"
                             if a.accum > 1 else ""), flush=True)
            return
        batch = next(shards.iter_batches(data, a.batch, shuffle=0))
        if a.layouts:
            return compare_steps(a, {k: bare_step(a.model, batch, a.bf16, layout=k) for k in a.layouts.split(",")})
        if a.profile:
            return profile_steps(bare_step(a.model, batch, a.bf16), a.steps, a.profile)
        if a.compile:
            return compare_steps(a, {k: bare_step(a.model, batch, a.bf16, compiled=k == "compiled")
                                     for k in ("eager", "compiled")})
        bare, ours = [], {(f, t): [] for f in sets for t in threads}
        for _ in range(a.rounds):  # alternate so all see the same machine load
            bare.append(bare_loop(a.model, batch, a.steps, a.bf16))
            for f, t in ours:
                ours[f, t].append(clipshield_loop(a.model, sets[f], a.batch, a.steps, bf16=a.bf16, threads=t))
    best_bare = max(bare)
    print(f"model {a.model}, batch {a.batch}, bf16 {a.bf16}, {a.steps} steps x {a.rounds} rounds, "
          f"{torch.get_num_threads()} threads, device {'cuda' if torch.cuda.is_available() else 'cpu'}")
    print(f"bare loop (in-memory tensors):      {best_bare:8.1f} samples/s   rounds: {', '.join(f'{x:.0f}' for x in bare)}")
    for (f, t), rates in ours.items():
        print(f"clipshield loop{f', images ' + f if f else ''}, loader threads {t}: {max(rates):8.1f} samples/s   rounds: "
              f"{', '.join(f'{x:.0f}' for x in rates)}   ratio clipshield/bare: {max(rates) / best_bare:.3f}")


if __name__ == "__main__":
    main()
