"""ONE training loop for every method. The method is an objective (objectives.Objective): a callable
`objective(batch, clip, frozen) -> (loss, logs)` with `trainable(clip)` naming the parameters it trains.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from .data.shards import as_float_images
from .errors import Interrupted, TrainingError
from .models import Clip
from .distributed import gather, mean_over_ranks, world
from .files import atomic_path
from .objectives.base import set_train_mode
from .schedules import SCHEDULES  # the learning rate over a run (lr_at)
from .ui import console, progress_bar


@dataclass
class TrainConfig:
    steps: int
    lr: float
    warmup: int = 0
    schedule: str = "cosine"          # cosine | par (linear lr -> lr/10 over the first half, then cosine)
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0               # 0: no evaluation during training
    bf16: bool = False                # autocast the objective in bfloat16 (GPU default)
    compile: bool = False             # torch.compile the towers in place (GPU default)
    accum: int = 1                    # micro-batches per step (gradient accumulation), each 1/accum of the batch


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate at `step` (0-based) under the schedule in `cfg`."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.schedule == "cosine":
        progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return 0.5 * cfg.lr * (1 + math.cos(math.pi * progress))
    if cfg.schedule == "par":
        half = max(1, cfg.steps // 2)
        if step < half:
            return cfg.lr - (cfg.lr - cfg.lr / 10) * step / half
        progress = (step - half) / max(1, cfg.steps - half)
        return 0.5 * (cfg.lr / 10) * (1 + math.cos(math.pi * progress))
    if cfg.schedule == "constant":
        return cfg.lr
    raise ValueError(f"unknown schedule {cfg.schedule!r}; choose one of {', '.join(SCHEDULES)}")


def param_groups(params: list[tuple[str, torch.nn.Parameter]], weight_decay: float) -> list[dict]:
    """Weight decay on >=2-D weights only (no biases, norms, embeddings' scalars, logit scale)."""
    decay = [p for n, p in params if p.ndim >= 2 and "logit_scale" not in n]
    no_decay = [p for n, p in params if not (p.ndim >= 2 and "logit_scale" not in n)]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@dataclass
class Checkpoint:
    """Resumable training state at `path`, written atomically every `every` steps. `run_id` fingerprints
    what the run depends on (pipeline.run_fingerprint): a checkpoint of another run is ignored."""
    path: Path
    every: int
    run_id: str

    def load(self) -> dict | None:
        if not self.path.exists():
            return None
        try:  # weights_only: a checkpoint is data, never code
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception:  # a checkpoint from an older clipshield or a torn file: start over
            return None
        return state if state.get("run_id") == self.run_id else None

    def save(self, state: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.path) as tmp:
            torch.save({"run_id": self.run_id, **state}, tmp)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def _rng_state() -> dict:
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.stack(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else None}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


class ObjectiveStep(torch.nn.Module):
    """The objective as a module whose forward returns (loss, logs), so DistributedDataParallel sees every
    parameter use (the objectives call encode_image/encode_text, not the model's forward)."""

    def __init__(self, clip: Clip, objective, frozen: Clip | None):
        super().__init__()
        self.model = clip.model
        self.clip, self.objective, self.frozen = clip, objective, frozen  # plain attributes, not submodules

    def forward(self, batch):
        return self.objective(batch, self.clip, self.frozen)


def split_batch(batch: dict, parts: int) -> list[dict]:
    """`batch` cut into `parts` consecutive micro-batches (tensors and lists of one row per sample)."""
    n = batch["images"].shape[0]
    if n % parts:
        raise ValueError(f"a batch of {n} samples per process does not split into {parts} equal micro-batches; "
                         f"choose a batch_size that is a multiple of train.nproc x train.accum")
    size = n // parts
    cut = lambda v, i: v[i * size:(i + 1) * size] if isinstance(v, (torch.Tensor, list, tuple)) and len(v) == n else v
    return [{k: cut(v, i) for k, v in batch.items()} for i in range(parts)]


def accumulate(objective, batch: dict, clip: Clip, frozen: Clip | None, parts: int, bf16: bool) -> tuple[torch.Tensor, dict]:
    """Backward of the objective over `batch` in `parts` micro-batches; leaves the gradients of the whole
    batch in .grad and returns (loss, logs) as one pass would.

    Random draws are made once for the whole batch (`objective.prepare`), so the micro-batches see what one
    pass would. Contrastive objectives (`encode` + `loss`) need every pair in the batch: the features are
    computed without gradients first, the loss over all of them gives d loss / d features, and each
    micro-batch is then encoded again and back-propagated with its slice of those gradients (GradCache;
    open_clip's accum_freq re-evaluates the loss instead). Exact up to float rounding, except for
    batch-norm layers that normalise with batch statistics. Per-sample losses (FARE, TeCoA) average."""
    device_type = batch["images"].device.type
    autocast = lambda: torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16)
    micro = split_batch(objective.prepare(batch), parts)
    if not objective.whole_batch_loss:
        total, logs = 0.0, {}
        for m in micro:
            with autocast():
                loss, part_logs = objective.batch_loss(m, clip, frozen)
            (loss / parts).backward()
            total = total + loss.detach() / parts
            logs = {k: logs.get(k, 0.0) + float(v) / parts for k, v in part_logs.items()}
        return total, logs
    buffers = {k: v.clone() for k, v in clip.model.named_buffers()}  # the first pass must not count twice
    states, cached = [], []
    with torch.no_grad():
        for m in micro:
            states.append(_rng_state())
            with autocast():
                cached.append(objective.encode(m, clip, frozen))
    with torch.no_grad():
        for k, v in clip.model.named_buffers():
            v.copy_(buffers[k])
    leaves = {k: torch.cat([f[k] for f in cached]).requires_grad_() for k in cached[0]}
    with autocast():
        loss, logs = objective.loss({k: gather(v) for k, v in leaves.items()}, clip)
    loss.backward()  # d loss / d features (and the gradient of parameters the loss uses directly: logit scale)
    rows = 0
    for m, state in zip(micro, states):
        _set_rng_state(state)  # dropout draws as in the first pass
        with autocast():
            f = objective.encode(m, clip, frozen)
        n = m["images"].shape[0]
        pairs = [(v, leaves[k].grad[rows:rows + n]) for k, v in f.items() if v.requires_grad]
        torch.autograd.backward([v for v, _ in pairs], [g for _, g in pairs])
        rows += n
    return loss.detach(), logs


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """What DDP does after backward, for the accumulation path: the mean of every gradient over ranks."""
    size = world()[1]
    grads = [p.grad for p in params if p.grad is not None]
    if size == 1 or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= size
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def _any_rank(flag: bool) -> bool:
    if world()[1] == 1:
        return flag
    t = torch.tensor([float(flag)], device="cuda" if torch.cuda.is_available() else "cpu")
    torch.distributed.all_reduce(t)
    return bool(t.item() > 0)


@dataclass
class TrainResult:
    steps: int
    seconds: float
    samples_per_s: float
    final_logs: dict
    history: list[dict] = field(default_factory=list)


def train(clip: Clip, objective, batches: Iterator[dict] | Callable[[int], Iterator[dict]], cfg: TrainConfig,
          frozen: Clip | None = None, log_file: str | Path | None = None,
          evaluate: Callable[[Clip], dict] | None = None, description: str = "training",
          checkpoint: Checkpoint | None = None, on_log: Callable[[dict], None] | None = None) -> TrainResult:
    """Optimise `objective` on `batches` for `cfg.steps` steps; returns the logs.

    Every logged row (step, loss, lr, samples/s, the objective's values) goes to `log_file` (JSON lines) and to
    `on_log` (rank 0; a resumed run first replays the rows of its checkpoint).

    `batches` is an iterator, or a function `start_step -> iterator` so that a run resumed from
    `checkpoint` continues with the batches it would have seen. Raises TrainingError on a non-finite
    loss (nothing is saved by the caller then).
    """
    torch.manual_seed(cfg.seed)
    device = next(clip.model.parameters()).device
    named = [(n, p) for n, p in objective.trainable(clip) if p.requires_grad]
    if not named:
        raise TrainingError(f"objective {objective.name} has no trainable parameters")
    # fused: one kernel per step instead of one per parameter tensor (15% of a tiny-rn step on 2 CPU cores)
    opt = torch.optim.AdamW(param_groups(named, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, fused=True)
    params = [p for _, p in named]
    rank, size = world()
    main = rank == 0
    if cfg.compile:
        clip.model.visual.compile()
        clip.model.transformer.compile()
    step_fn: torch.nn.Module = ObjectiveStep(clip, objective, frozen)
    frozen_flags = {}
    if size > 1:  # only the objective's parameters take part (DDP would wait for the others' gradients)
        trainable_ids = {id(p) for p in params}
        frozen_flags = {p: p.requires_grad for p in clip.model.parameters() if id(p) not in trainable_ids}
        for p in frozen_flags:
            p.requires_grad_(False)
    if size > 1 and cfg.accum == 1:
        step_fn = torch.nn.parallel.DistributedDataParallel(
            step_fn, device_ids=[device.index] if device.type == "cuda" else None, forward_sync_buffers=False)
    elif size > 1:  # accumulation averages gradients itself (average_gradients); start from rank 0's weights as DDP
        for t in list(clip.model.parameters()) + list(clip.model.buffers()):
            torch.distributed.broadcast(t.data, src=0)
    history: list[dict] = []
    logs: dict = {}
    start, seen = 0, 0
    state = checkpoint.load() if checkpoint else None
    if state is not None:
        clip.model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        _set_rng_state(state["rng"])
        if state.get("objective") is not None:
            objective.load_state_dict(state["objective"])
        start, seen, history = state["step"], state["seen"], state["history"]
        if main:
            console.print(f"{description}: resumed from step {start} ({checkpoint.path})")
    if callable(batches):
        batches = batches(start)
    # The log is written beside the previous one and replaces it only when the run completes.
    partial_log = Path(f"{log_file}.partial") if log_file and main else None
    log = open(partial_log, "w") if partial_log else None
    saved = start  # the step of the checkpoint a rerun would resume from (0: none)
    if log:
        log.writelines(json.dumps(row) + "\n" for row in history)
    if on_log and main:
        for row in history:
            on_log(row)

    def record(row: dict) -> None:
        history.append(row)
        if on_log and main:
            on_log(row)
        if log:
            log.write(json.dumps(row) + "\n")
            log.flush()

    if main and evaluate and cfg.eval_every and start == 0:  # where the curves start: the model as it came
        clip.model.eval()
        record({"step": 0, **evaluate(clip)})
    last_finite: dict = {}
    fresh, t0 = 0, time.perf_counter()  # samples this process trained on (throughput)
    step = start
    try:
        with progress_bar(description, total=cfg.steps, completed=start, show=main) as advance:
            for step in range(start, cfg.steps):
                batch = next(batches)
                batch["images"] = as_float_images(batch["images"].to(device, non_blocking=True))  # uint8: 1/4 the bytes
                for g in opt.param_groups:
                    g["lr"] = lr_at(step, cfg)
                set_train_mode(clip.model, objective.train_batchnorm)
                opt.zero_grad(set_to_none=True)
                if cfg.accum == 1:
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                        loss, logs = step_fn(batch)
                else:
                    loss, logs = accumulate(objective, batch, clip, frozen, cfg.accum, cfg.bf16)
                    average_gradients(params)
                if _any_rank(not torch.isfinite(loss)):
                    raise TrainingError(
                        f"{description}: the {objective.name} loss is {loss.item()} at step {step} "
                        f"(last finite values: {last_finite or 'none, it is the first step'}); lower the learning "
                        f"rate (now {cfg.lr:g}) or raise warm-up (now {cfg.warmup}); nothing was saved")
                if cfg.accum == 1:
                    loss.backward()
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                opt.step()
                seen += batch["images"].shape[0]
                fresh += batch["images"].shape[0]
                done = step + 1
                last_finite = {"step": step, "loss": round(float(loss.detach()), 6)}
                if done % cfg.log_every == 0 or done == cfg.steps or (cfg.eval_every and done % cfg.eval_every == 0):
                    logs = {k: float(v) for k, v in logs.items()}
                    row = {"step": done, "loss": mean_over_ranks(float(loss.detach())), "lr": lr_at(step, cfg),
                           "samples_per_s": fresh / (time.perf_counter() - t0),
                           **logs}
                    if main and evaluate and cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.steps):
                        clip.model.eval()
                        row.update(evaluate(clip))
                    record(row)
                if checkpoint and checkpoint.every and done % checkpoint.every == 0 and done < cfg.steps and main:
                    checkpoint.save({"step": done, "seen": seen, "model": clip.model.state_dict(),
                                     "optimizer": opt.state_dict(), "rng": _rng_state(), "history": history,
                                     "objective": objective.state_dict()})
                    saved = done
                advance(loss=float(loss.detach()))
    except KeyboardInterrupt as e:
        kept = ""
        if partial_log:  # a log that dvc repro removed before the run is not called unchanged
            kept = (f"; {log_file} was left as it was" if Path(log_file).exists() else "") + \
                f"; this run's log so far is in {partial_log}"
        rerun = (f"rerunning the stage with the same params and data resumes from checkpoint step {saved} "
                 f"({checkpoint.path})" if checkpoint and saved
                 else "rerunning the stage starts training over" + (f" (a checkpoint is written every {checkpoint.every} "
                                                                   f"steps)" if checkpoint and checkpoint.every else ""))
        how = e.how if isinstance(e, Interrupted) else "interrupted"
        raise Interrupted(how, f"{description} stopped at step {step} of {cfg.steps}{kept}", rerun) from e
    finally:
        if log:
            log.close()
        for p, flag in frozen_flags.items():
            p.requires_grad_(flag)
        clip.model.eval()
    if partial_log:
        os.replace(partial_log, log_file)
    seconds = time.perf_counter() - t0
    return TrainResult(cfg.steps, seconds, fresh / seconds, history[-1] if history else {}, history)
