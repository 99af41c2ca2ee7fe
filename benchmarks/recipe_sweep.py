"""Recipe sweep for the tiny world: pre-train once, then for each (trigger, poison rate, backdoor budget)
backdoor the clean model and clean it with every method at a few budgets; prints one table and writes
JSON lines. It runs the library's loop, objectives, triggers and metrics on in-memory data (the
pipeline streams shards instead), several jobs at a time: meant for a GPU machine, where it answers in
minutes what takes hours on 2 CPU cores.

    PYTHONPATH=src python benchmarks/recipe_sweep.py --out /tmp/sweep --workers 6
"""
from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import time
from pathlib import Path

import numpy as np
import torch

from clipshield.attacks.poison import poison_image, poison_indices, sample_seed
from clipshield.data.world import SHAPES, get_world, render, target_caption
from clipshield.evaluation import evaluate_model
from clipshield.models import create, frozen_copy, load, save
from clipshield.objectives import build_objective
from clipshield.training import TrainConfig, train

TRIGGER_OPTIONS = {"badnet": {"patch": 4}, "badnet_stripes": {"patch": 4}, "blended": {"alpha": 0.2},
                   "blended_stripes": {"alpha": 0.03}, "blended_triangles": {"alpha": 0.15, "tile": 4},
                   "wanet": {"strength": 0.5, "grid": 4}}


def world_data(world: str, seed: int, n: int, size: int = 32) -> dict:
    w = get_world(world)
    imgs, caps, labels = [], [], []
    for i in range(n):
        img, cap, meta = render(w, seed, i, size)
        imgs.append(img)
        caps.append(cap)
        labels.append(meta["class"])
    return {"images_u8": np.stack(imgs), "captions": caps, "labels": torch.tensor(labels)}


def as_test(d: dict) -> dict:
    return {"images": torch.from_numpy(d["images_u8"]).permute(0, 3, 1, 2).float() / 255,
            "captions": d["captions"], "labels": d["labels"]}


def batches(d: dict, bs: int, seed: int, device):
    images = torch.from_numpy(d["images_u8"]).permute(0, 3, 1, 2).to(device)
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(len(images), generator=g)
        for i in range(0, len(perm) - bs + 1, bs):
            idx = perm[i:i + bs]
            yield {"images": images[idx.to(device)].float() / 255, "captions": [d["captions"][j] for j in idx],
                   "labels": d["labels"][idx]}


def poisoned(d: dict, trigger: str, rate: float, target: str, seed: int = 1) -> dict:
    out = {"images_u8": d["images_u8"].copy(), "captions": list(d["captions"]), "labels": d["labels"]}
    for i in poison_indices(len(out["captions"]), rate, seed):
        out["images_u8"][i] = poison_image(out["images_u8"][i], trigger, sample_seed(seed, i), TRIGGER_OPTIONS[trigger])
        out["captions"][i] = target_caption(target, np.random.default_rng([seed, i]))
    return out


def fit(clip, objective, data, steps, lr, bs, schedule="cosine", wd=0.1, warmup=0, seed=0):
    dev = next(clip.model.parameters()).device
    frozen = frozen_copy(clip) if getattr(objective, "needs_frozen", False) else None
    cfg = TrainConfig(steps=steps, lr=lr, warmup=warmup, schedule=schedule, weight_decay=wd, seed=seed, log_every=50)
    return train(clip, objective, batches(data, bs, seed, dev), cfg, frozen=frozen, description="fit")


def job(args):
    trigger, rate, bd_steps, bd_lr, clean_grid, workdir, n_train, clean_bs = args
    torch.set_num_threads(2)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    train_d = world_data("base", 0, n_train)
    test = as_test(world_data("base", 1, min(2000, n_train)))
    synth = world_data("shifted", 7, n_train // 3)
    rows = []
    clip = load(f"{workdir}/clean")
    clip.model.to(dev)
    t0 = time.time()
    fit(clip, build_objective("clip"), poisoned(train_d, trigger, rate, "star"), bd_steps, bd_lr, 128)
    m = evaluate_model(clip, test, {trigger: TRIGGER_OPTIONS[trigger]}, "star")
    base = dict(trigger=trigger, rate=rate, bd_steps=bd_steps, bd_lr=bd_lr)
    rows.append({**base, "model": "backdoor", "acc": m["zeroshot_top1"], "asr": m["asr"], "s": time.time() - t0})
    start = {k: v.detach().clone() for k, v in clip.model.state_dict().items()}
    for method, steps, lr, extra in clean_grid:
        clip.model.load_state_dict(start)
        t0 = time.time()
        res = fit(clip, build_objective(method, **extra), synth, steps, lr, clean_bs, schedule="par", wd=1e-4)
        m = evaluate_model(clip, test, {trigger: TRIGGER_OPTIONS[trigger]}, "star")
        rows.append({**base, "model": method, "clean_steps": steps, "clean_lr": lr, **extra,
                     "acc": m["zeroshot_top1"], "asr": m["asr"], "s": time.time() - t0,
                     "s_i": res.final_logs.get("s_i"), "s_t": res.final_logs.get("s_t")})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/sweep")
    ap.add_argument("--workers", type=int, default=6)
    ap.add_argument("--model", default="tiny-rn")
    ap.add_argument("--pretrain-steps", type=int, default=1500)
    ap.add_argument("--triggers", default=",".join(TRIGGER_OPTIONS))
    ap.add_argument("--rates", default="0.03")
    ap.add_argument("--bd-steps", default="600")
    ap.add_argument("--bd-lr", type=float, default=5e-4)
    ap.add_argument("--n-train", type=int, default=30000)
    ap.add_argument("--clean-bs", type=int, default=128)
    ap.add_argument("--clean", default="finetune:500:1e-4,par:500:1e-4,cleanclip:500:1e-4")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not (out / "clean").exists():
        t0 = time.time()
        clip = create(a.model)
        clip.model.to(dev)
        test = as_test(world_data("base", 1, min(2000, a.n_train)))
        res = fit(clip, build_objective("clip"), world_data("base", 0, a.n_train), a.pretrain_steps, 1e-3, 128, warmup=100)
        m = evaluate_model(clip, test)
        clean_row = {"model": "clean", "acc": m["zeroshot_top1"], "i2t_r5": m["i2t_r5"],
                     "s": time.time() - t0, "step_s": res.seconds / res.steps}
        print(json.dumps(clean_row), flush=True)
        save(clip, out / "clean", {"name": "clean", "metrics": clean_row})
    grid = []
    for spec in a.clean.split(","):
        method, steps, lr, *rest = spec.split(":")
        extra = {"eps": float(rest[0])} if rest else {}
        grid.append((method, int(steps), float(lr), extra))
    jobs = [(t, float(r), int(s), a.bd_lr, grid, str(out), a.n_train, a.clean_bs) for t, r, s in
            itertools.product(a.triggers.split(","), a.rates.split(","), a.bd_steps.split(","))]
    with mp.get_context("spawn").Pool(a.workers) as pool:
        rows = [r for rs in pool.imap_unordered(job, jobs) for r in rs]
    with open(out / "sweep.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print("clean model:", json.dumps(json.loads((out / "clean" / "provenance.json").read_text())["metrics"]))
    print(f"{'trigger':18} {'rate':>5} {'bd':>5} {'model':10} {'steps':>5} {'lr':>7} {'acc':>6} {'asr':>6}")
    for r in sorted(rows, key=lambda r: (r["trigger"], r["rate"], r["bd_steps"])):
        print(f"{r['trigger']:18} {r['rate']:5.3f} {r['bd_steps']:5d} {r['model']:10} {r.get('clean_steps', 0):5d} "
              f"{r.get('clean_lr', 0):7.0e} {r['acc']:6.3f} {r['asr']:6.3f}")


if __name__ == "__main__":
    main()
