"""The path every training stage takes (pretrain, backdoor, clean, harden): load or create a model, train it with
an objective (a killed run resumes from its checkpoint), evaluate it, write the model and its metrics."""
from __future__ import annotations

import dataclasses
import os
import hashlib
import json
from functools import lru_cache
from pathlib import Path

import torch

from ..data import shards
from ..distributed import is_main
from ..evaluation import evaluate_model, zeroshot_accuracy
from ..livelog import LiveLog
from ..models import Clip, frozen_copy, load, save
from ..params import EvalParams, LaunchParams, TrainParams
from ..training import Checkpoint, TrainConfig, train
from ..ui import summary
from .common import code_version, data_hash, device, load_test, write_metrics


def warmup_steps(p: TrainParams) -> int:
    """`warmup` in steps: round(warmup * steps) for a fraction (< 1), the number itself otherwise."""
    return round(p.warmup * p.steps) if 0 < p.warmup < 1 else int(p.warmup)


def decode_threads(launch: LaunchParams, on_gpu: bool) -> int:
    """Threads that decode batches ahead of the model: on CPU none (the cores train the model); on a GPU as many as
    this process's share of the CPU cores, at most 8."""
    if launch.loader_threads != "auto":
        return int(launch.loader_threads)
    return min(8, max(1, (os.cpu_count() or 1) // launch.nproc)) if on_gpu else 0


def train_config(p: TrainParams) -> TrainConfig:
    return TrainConfig(steps=p.steps, lr=p.lr, warmup=warmup_steps(p), schedule=p.schedule, weight_decay=p.weight_decay,
                       grad_clip=p.grad_clip, seed=p.seed, eval_every=p.eval_every)


def weights_digest(clip: Clip) -> str:
    h = hashlib.md5()
    for k, v in sorted(clip.model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@lru_cache(maxsize=1)
def code_digest() -> str:
    """The clipshield package's source, hashed: DVC reruns a stage when its code changes, and the rerun must not
    then resume from a checkpoint the old code wrote."""
    h = hashlib.sha256()
    package = Path(__file__).parents[1]  # clipshield/
    for path in sorted(package.rglob("*.py")):
        h.update(path.relative_to(package).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def run_fingerprint(clip: Clip, objective, train_dir: str | Path, p: TrainParams) -> str:
    """What a training run depends on (params, objective and its options, data, start weights, code): a
    checkpoint resumes only a run with the same fingerprint."""
    return hashlib.md5(json.dumps({
        "params": vars(p), "objective": objective.name, "train_dir": str(train_dir), "data": data_hash(train_dir),
        "options": {k: v for k, v in sorted(vars(objective).items()) if isinstance(v, (int, float, str, bool))},
        "weights": weights_digest(clip), "code": code_digest()}, sort_keys=True, default=str).encode()).hexdigest()


def check_image_size(clip: Clip, data_dir: str | Path) -> None:
    """Refuse training on images of another size than the model's input (its saved config would not say so)."""
    first = next(shards.iter_samples(data_dir))
    h, w = first["image"].shape[:2]
    if (h, w) != (clip.image_size, clip.image_size):
        raise shards.DataError(f"{data_dir} holds {w}x{h} px images but the model ({clip.name}) takes {clip.image_size} px; make the "
                               f"data at {clip.image_size} px (data.image_size or synth.image_size: {clip.image_size}) "
                               f"or train a model configured for {h} px")


def run_training(clip: Clip, objective, train_dir: str | Path, p: TrainParams, name: str,
                 evaluate=None, log_dir: str | Path = "dvclive",
                 checkpoint_dir: str | Path = "checkpoints") -> dict:
    """Train `clip` with `objective` on shards `train_dir`; logs go to `log_dir/name.jsonl`, with `evaluate(clip)`'s
    metrics every `p.eval_every` steps.

    Every `p.checkpoint_every` steps the state goes to `checkpoint_dir/name.pt`; a run that was
    killed resumes from there when the stage is re-run with the same params, data and start model."""
    from ..distributed import init_from_env
    from ..params import load_launch
    check_image_size(clip, train_dir)
    init_from_env()
    launch = load_launch()
    on_gpu = device().type == "cuda"
    torch.manual_seed(p.seed)
    clip.model.to(device())
    frozen = frozen_copy(clip) if objective.needs_frozen else None
    checkpoint = Checkpoint(Path(checkpoint_dir) / f"{name}.pt", p.checkpoint_every,
                            run_fingerprint(clip, objective, train_dir, p))

    def batches(start: int):
        return shards.iter_batches(train_dir, p.batch_size, shuffle=p.shuffle, seed=p.seed, start=start,
                                   threads=decode_threads(launch, on_gpu), uint8=True)
    Path(log_dir).mkdir(parents=True, exist_ok=True)
    cfg = dataclasses.replace(train_config(p), bf16=launch.precision == "bf16" or (launch.precision == "auto" and on_gpu),
                              compile=launch.compile == "on" or (launch.compile == "auto" and on_gpu),
                              accum=launch.accum)
    live = LiveLog(Path(log_dir) / name, {**vars(p), "objective": objective.name, "train_dir": str(train_dir),
                                          "bf16": cfg.bf16, "compile": cfg.compile, "accum": cfg.accum}) \
        if is_main() else None
    result = train(clip, objective, batches, cfg, frozen=frozen, evaluate=evaluate,
                   log_file=Path(log_dir) / f"{name}.jsonl", description=name, checkpoint=checkpoint, on_log=live)
    trained = {"steps": result.steps, "seconds": round(result.seconds, 1),
               "samples_per_s": round(result.samples_per_s, 1),
               "final_loss": round(result.final_logs.get("loss", float("nan")), 4)}
    if is_main():
        checkpoint.remove()
        live.end({"train_" + k: v for k, v in trained.items()})
    return trained


def finish_model(clip: Clip, name: str, out_model: str | Path, metrics_file: str | Path, provenance: dict,
                 test, ev: EvalParams, triggers: dict[str, dict] | None, target: str | None,
                 check=None, extra: dict | None = None) -> dict:
    """Evaluate (plus `extra` metrics computed by the caller), run `check(metrics)` (a gate that may raise),
    then write the model folder (with its metrics in provenance) and the metrics JSON. Rank 0 only."""
    if not is_main():
        return {}
    metrics = evaluate_model(clip, test, triggers=triggers, target=target, retrieval_n=ev.retrieval_n) | (extra or {})
    if check is not None:
        check(metrics)
    provenance = {"name": name, "code_version": code_version(), **provenance, "metrics": metrics}
    save(clip, out_model, provenance)
    write_metrics(metrics_file, metrics)
    summary(name, metrics)
    return metrics


def model_provenance(stage: str, parent, data: dict, params: dict, training: dict, **more) -> dict:
    """What a model's provenance.json records (finish_model adds its name, code version and metrics): the stage that
    made it, what it started from, the data it saw, its params, its training summary and the stage's `more`
    (seed, attack, defence)."""
    return {"stage": stage, "parent": parent, **more, "data": data, "params": params, "training": training}


def during_training(head: dict, triggers: dict[str, dict] | None, target: str | None):
    """The evaluation logged while a model trains, on a few test images (`head`): zero-shot top-1 and, where the
    model is attacked or cleaned, the ASR of its trigger, so a log shows when a backdoor takes or leaves."""
    def evaluate(clip: Clip) -> dict[str, float]:
        if not triggers:
            return {"zeroshot_top1": zeroshot_accuracy(clip, head["images"], head["labels"], head.get("classes"))}
        metrics = evaluate_model(clip, head, triggers, target, retrieval_n=len(head["labels"]))
        return {k: v for k, v in metrics.items() if k == "zeroshot_top1" or k.startswith("asr")}
    return evaluate


def train_model(start: str | Path | Clip, objective, data_dir: str | Path, p: TrainParams, ev: EvalParams,
                test_dir: str | Path, out_model: str | Path, metrics_file: str | Path, provenance: dict,
                triggers: dict[str, dict] | None = None, target: str | None = None, log_name: str | None = None,
                extra=None, check=None) -> dict:
    """Every training stage: load `start` (a model folder, or a new model), train it with `objective` on `data_dir`,
    evaluate it on `test_dir` (ASR of `triggers` towards `target`, plus `extra(clip, test)` metrics; `check(metrics)`
    may refuse the model), write `out_model` (named after its folder) and `metrics_file`. `provenance`: the
    arguments of model_provenance but the training summary; `log_name`: the training log's name (default the
    model's). With `p.eval_every`, the training log gets zero-shot top-1 and ASR along the way."""
    clip = start if isinstance(start, Clip) else load(start)
    test = load_test(ev, test_dir)
    name = Path(out_model).name
    evaluate = during_training(test.head(500), triggers, target) if p.eval_every else None
    training = run_training(clip, objective, data_dir, p, log_name or name, evaluate=evaluate)
    more = extra(clip, test) if extra is not None and is_main() else None
    return finish_model(clip, name, out_model, metrics_file, model_provenance(**provenance, training=training), test,
                        ev, triggers, target, check=check, extra=more)
