"""The work of each pipeline stage: read inputs, build objects, call the library, write outputs.

Stage scripts (stages/*.py) and the CLI (cli.py) both call these functions with typed params and every input and
output path (dvc.yaml names them).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import time
from functools import lru_cache
from pathlib import Path

import torch

from . import __version__
from .data import shards
from .data.world import get_world, render
from .distributed import is_main
from .evaluation import evaluate_model, zeroshot_accuracy
from .livelog import LiveLog
from .models import Clip, create, frozen_copy, load, read_provenance, save
from .objectives import build_objective
from .params import CleanParams, DataParams, EvalParams, HardenParams, RobustParams, TrainParams, objective_options
from .robust import robust_metrics
from .training import Checkpoint, TrainConfig, TrainingError, train
from .ui import console, progress_bar, summary, wrote


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def code_version() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5)
        return f"{__version__}+{rev.stdout.strip()}" if rev.returncode == 0 else __version__
    except (OSError, subprocess.SubprocessError):
        return __version__


def data_hash(data_dir: str | Path) -> str:
    """md5 over a data set's shard bytes (in name order): identifies exactly what a model saw."""
    h = hashlib.md5()
    for path in shards.shard_paths(data_dir):
        h.update(Path(path).read_bytes())
    return h.hexdigest()


def write_metrics(path: str | Path, metrics: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = {k: round(v, 4) if isinstance(v, float) else v for k, v in sorted(metrics.items())}
    path.write_text(json.dumps(flat, indent=1) + "\n")
    wrote(path)


# ---- data -----------------------------------------------------------------------------------

def world_samples(world: str, seed: int, n: int, size: int, prefix: str):
    w = get_world(world)
    for i in range(n):
        img, caption, meta = render(w, seed, i, size)
        yield f"{prefix}{i:08d}", img, caption, meta


def make_data(p: DataParams, train_dir, test_dir) -> dict:
    """`train_dir` and `test_dir` (data/train, data/test): the procedural world (data.source world) or imported
    real shards (data.source shards: img2dataset CC3M-style train shards, labelled ImageNet-val-style test shards).
    Both folders carry classes.json, the class space of the zero-shot task and of the attack target."""
    from .data.classes import classes_file, load_classes
    from .data.imports import external_samples, source_shards
    dirs = {"train": Path(train_dir), "test": Path(test_dir)}
    classes = load_classes(p.classes)
    counts = {}
    if p.source == "world":
        splits = [(split, world_samples(p.world, seed, n, p.image_size, split))
                  for split, n, seed in (("train", p.train_n, p.seed), ("test", p.test_n, p.test_seed))]
    else:  # both sources are resolved first, and the labelled test set (the likelier to be refused) is written first
        source_shards(p.train_shards), source_shards(p.test_shards)
        splits = [("test", external_samples(p.test_shards, p.image_size, classes, "test", True, p.test_n)),
                  ("train", external_samples(p.train_shards, p.image_size, classes, "train", False, p.train_n))]
    with progress_bar("procedural world" if p.source == "world" else "import shards",
                      total=p.train_n + p.test_n if p.train_n and p.test_n else None) as advance:
        for split, samples in splits:
            def counted(samples):
                for s in samples:
                    counts[split] = counts.get(split, 0) + 1
                    advance()
                    yield s
            shards.write_shards(counted(samples), dirs[split], prefix=split, per_shard=p.per_shard,
                                image_format="auto" if p.source == "world" else "jpg", extra_files=classes_file(classes))
    source = {"world": p.world} if p.source == "world" else {"train": p.train_shards, "test": p.test_shards}
    summary("data", {f"{k} samples": v for k, v in counts.items()} | source
            | {"classes": f"{classes.source} ({len(classes.names)})", "size": p.image_size})
    return counts


# ---- training stages ------------------------------------------------------------------------

def train_config(p: TrainParams) -> TrainConfig:
    return TrainConfig(steps=p.steps, lr=p.lr, warmup=p.warmup_steps(), schedule=p.schedule, weight_decay=p.weight_decay,
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
    package = Path(__file__).parent
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
    from .distributed import init_from_env
    from .params import load_launch
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
                                   threads=launch.decode_threads(on_gpu), uint8=True)
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


def load_test(ev: EvalParams, test_dir: str | Path) -> shards.EvalSet:
    """The first eval.test_n test samples, streamed batch by batch by the evaluation (memory flat in test_n), with the
    zero-shot class space of eval.classes and eval.templates."""
    return shards.EvalSet(test_dir, limit=ev.test_n, classes=ev.classes, templates=ev.templates)


def parent_model(start: str | Path) -> dict:
    return {"model": str(start), "name": Path(start).name}


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


def pretrain(p, ev: EvalParams, train_dir, test_dir, out_model, metrics_file) -> dict:
    """Pre-train a CLIP model from scratch (or from `p.pretrained`) on the clean train shards."""
    clip = create(p.model, pretrained=p.pretrained, seed=p.seed)
    return train_model(clip, build_objective("clip"), train_dir, p, ev, test_dir, out_model, metrics_file,
                       dict(stage="pretrain", parent=p.pretrained or f"random init ({p.model}, seed {p.seed})",
                            model_config=p.model, data={"train": data_hash(train_dir)}, params=vars(p)),
                       log_name="pretrain")


def baseline(attack, ev: EvalParams, clean_model, test_dir, metrics_file) -> dict:
    """The clean model's "ASR" for every trigger of `attack` (images it already calls the target): the baseline
    a backdoor and a defence are judged against. A stage of its own, so that a changed attack re-runs this
    evaluation, not the pre-training."""
    t0 = time.perf_counter()
    clip = load(clean_model)
    test = load_test(ev, test_dir)
    metrics = evaluate_model(clip, test, triggers={t: attack.options.get(t, {}) for t in attack.triggers},
                             target=attack.target, retrieval_n=ev.retrieval_n, suffix_always=True)
    metrics = {k: v for k, v in metrics.items() if "asr" in k} | {"eval_seconds": round(time.perf_counter() - t0, 1)}
    write_metrics(metrics_file, metrics)
    summary(f"baseline ASR of the clean model (target {attack.target})", metrics)
    return metrics


# ---- attacks --------------------------------------------------------------------------------

def poison(trigger: str, attack, p, data_dir, out_dir) -> dict:
    """Write `out_dir` (data/poisoned/<trigger>): the clean train shards `data_dir` with round(rate*N) samples
    poisoned, plus manifest.jsonl listing exactly the poisoned samples."""
    from .attacks.poison import poison_stream
    from .attacks.triggers import get_trigger
    from .data.classes import classes_file, read_classes
    get_trigger(trigger)  # an unknown name first: no other message would help
    if trigger not in attack.triggers:
        console.print(f"[yellow]note:[/] trigger {trigger} is not in attack.triggers {attack.triggers}")
    out_dir = Path(out_dir)
    n = shards.num_samples(data_dir)
    if round(p.rate * n) == 0:
        raise shards.DataError(f"poison.rate = {p.rate:g} poisons round({p.rate:g} x {n}) = 0 of the {n} samples of "
                               f"{data_dir}: {out_dir} would be an unpoisoned copy and its backdoor would not take; "
                               f"raise poison.rate (e.g. 0.05) or poison a larger data set")
    per_shard = max(json.loads((Path(data_dir) / "sizes.json").read_text()).values())
    manifest: list[dict] = []
    options = attack.options.get(trigger, {})
    with progress_bar(f"poison {trigger}", total=n) as advance:
        def counted(samples):
            for s in samples:
                advance()
                yield s
        classes = read_classes(data_dir)
        stream = poison_stream(counted(shards.iter_samples(data_dir, decode=False)), n, trigger, p.rate,
                               attack.target, p.seed, options, manifest, classes=classes)
        shards.write_shards(stream, out_dir, prefix="train", per_shard=per_shard,
                            extra_files=classes_file(classes))
    manifest.sort(key=lambda r: r["key"])
    (out_dir / "manifest.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in manifest))
    summary(f"poison {trigger}", {"samples": n, "poisoned": len(manifest), "rate": p.rate, "target": attack.target,
                                  "options": json.dumps(options)})
    return {"samples": n, "poisoned": len(manifest)}


class AttackDidNotTake(TrainingError):
    pass


def check_backdoor(asr: float, min_asr: float, trigger: str, p, rate: float) -> None:
    """The sanity gate: a backdoor whose ASR stays below `min_asr` fails the stage, loudly."""
    if asr < min_asr:
        raise AttackDidNotTake(
            f"the {trigger} backdoor did not take: ASR {asr:.1%} < backdoor.min_asr {min_asr:.0%}. "
            f"Raise poison.rate (now {rate}), backdoor.steps (now {p.steps}) or backdoor.lr (now {p.lr:g}), "
            f"or strengthen the trigger in attack.options.{trigger}; or lower backdoor.min_asr deliberately")


def backdoor(trigger: str, attack, poison_p, p, ev: EvalParams, seed, start, data_dir, test_dir, out_model,
             metrics_file) -> dict:
    """Fine-tune the clean model `start` with the CLIP loss (training seed `seed`) on the shards poisoned with
    `trigger` -> `out_model` (backdoor-<trigger>-s<seed>)."""
    p = dataclasses.replace(p, seed=seed)
    options = attack.options.get(trigger, {})
    return train_model(start, build_objective("clip"), data_dir, p, ev, test_dir, out_model, metrics_file,
                       dict(stage="backdoor", seed=seed, parent=parent_model(start),
                            attack={"kind": "backdoor", "trigger": trigger, "options": options, "rate": poison_p.rate,
                                    "target": attack.target, "seed": poison_p.seed},
                            data={"train": data_hash(data_dir)}, params=vars(p)),
                       {trigger: options}, attack.target,
                       check=lambda m: check_backdoor(m["asr"], p.min_asr, trigger, p, poison_p.rate))


# ---- defences -------------------------------------------------------------------------------

MANIFEST = "manifest.jsonl"


def poison_evidence(data_dir: str | Path, poisoned_root: str | Path = "data/poisoned") -> str | None:
    """Why data set `data_dir` holds poisoned samples (None: no sign of it): a poisoning manifest, or a shard
    byte-identical to a shard of a data set under `poisoned_root` that holds poisoned samples."""
    data_dir = Path(data_dir)
    if (data_dir / MANIFEST).exists():
        n = len((data_dir / MANIFEST).read_text().splitlines())
        return f"it holds a poisoning manifest ({data_dir / MANIFEST}, {n} poisoned samples)"
    mine = {Path(p).stat().st_size: [] for p in shards.shard_paths(data_dir)}
    for p in shards.shard_paths(data_dir):
        mine[Path(p).stat().st_size].append(p)
    md5 = lambda p: hashlib.md5(Path(p).read_bytes()).hexdigest()
    for manifest in sorted(Path(poisoned_root).glob(f"*/{MANIFEST}")):
        folder = manifest.parent
        if folder.resolve() == data_dir.resolve() or not (folder / "sizes.json").exists():
            continue
        keys = {json.loads(line)["key"] for line in manifest.read_text().splitlines() if line.strip()}
        for theirs in shards.shard_paths(folder):
            same_size = mine.get(Path(theirs).stat().st_size, [])
            if not same_size or not keys & {m.split(".")[0] for m in shards.tar_members(theirs)}:
                continue
            for p in same_size:
                if md5(p) == md5(theirs):
                    return f"its shard {Path(p).name} is identical to {theirs}, which holds poisoned samples"
    return None


def check_clean_source(data_dir: str | Path, allow_poisoned: bool, poisoned_root: str | Path = "data/poisoned") -> str | None:
    """Refuse cleaning data that holds poisoned samples (unless `allow_poisoned`); returns the evidence, if any."""
    evidence = poison_evidence(data_dir, poisoned_root)
    if evidence and not allow_poisoned:
        raise shards.DataError(f"clean.data = {data_dir} holds poisoned samples: {evidence}; cleaning on it would train "
                               f"the model on the poison. Point clean.data at clean pairs (e.g. data/synth), or set "
                               f"clean.allow_poisoned: true to do it on purpose (recorded in the model's provenance)")
    if evidence:
        console.print(f"[yellow]warning:[/] clean.allow_poisoned is true and {data_dir} holds poisoned samples: {evidence}")
    return evidence


def clean(trigger: str, method: str, seed, p: CleanParams, attack, ev: EvalParams, options: dict, start, data_dir,
          test_dir, out_model, metrics_file) -> dict:
    """Clean the backdoored model `start` with `method` (its params section `options`, training seed `seed`) on
    synthetic pairs only -> `out_model` (<method>-<trigger>-s<seed>)."""
    p = dataclasses.replace(p, seed=seed)
    options = objective_options(method, options)
    evidence = check_clean_source(data_dir, p.allow_poisoned)
    trig_opts = attack.options.get(trigger, {})
    return train_model(start, build_objective(method, **options), data_dir, p, ev, test_dir, out_model, metrics_file,
                       dict(stage="clean", seed=seed, parent=parent_model(start),
                            attack={"trigger": trigger, "options": trig_opts, "target": attack.target},
                            defence={"method": method, "options": options},
                            data={"clean": str(data_dir), "hash": data_hash(data_dir),
                                  "allow_poisoned": p.allow_poisoned, "poisoned": evidence}, params=vars(p)),
                       {trigger: trig_opts}, attack.target)


def harden(run: str, p: HardenParams, rp: RobustParams, attack, ev: EvalParams, options: dict, start, reference,
           data_dir, test_dir, out_model, metrics_file) -> dict:
    """Run `harden.runs.<run>`: FARE/TeCoA fine-tuning (the method's params section `options`) of the model `start`
    on the clean train shards -> `out_model` (<run>), evaluated for clean accuracy, ASR (where the start model had a
    trigger), and robust accuracy and distortion against the clean model `reference`."""
    from .data.classes import read_classes
    if run not in p.runs:
        raise ValueError(f"unknown harden run {run!r}; harden.runs lists: {', '.join(p.runs) or 'none'}")
    spec = p.runs[run]
    method = spec["method"]
    options = objective_options(method, options) | ({"eps": spec["eps"]} if "eps" in spec else {})
    reference = load(reference)
    supervised = {"class_space": read_classes(data_dir)} if method == "tecoa" else {}  # the labels' class space
    parent = read_provenance(start)
    trigger = parent.get("attack", {}).get("trigger")
    triggers = {trigger: attack.options.get(trigger, {})} if trigger else None
    return train_model(start, build_objective(method, **options, **supervised), data_dir, p, ev, test_dir, out_model,
                       metrics_file,
                       dict(stage="harden", parent=parent_model(start), attack=parent.get("attack"),
                            defence={**(parent.get("defence") or {}), "robust": {"method": method, "options": options}},
                            data={"train": data_hash(data_dir)},
                            params={k: v for k, v in vars(p).items() if k != "runs"}),
                       triggers, attack.target, extra=lambda clip, test: robust_metrics(clip, reference, test, rp))


def robust_baseline(rp: RobustParams, ev: EvalParams, model, reference, test_dir, metrics_file) -> dict:
    """Robust accuracy and distortion of an existing model (the clean model's row of the robustness table)."""
    clip = load(model)
    metrics = robust_metrics(clip, load(reference), load_test(ev, test_dir), rp)
    write_metrics(metrics_file, metrics)
    print(json.dumps(metrics))
    return metrics
