"""Stage `clean`: a backdoored model cleaned on data that must hold no poisoned samples."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from ..data import shards
from ..objectives import build_objective
from ..params import CleanParams, EvalParams, objective_options
from ..ui import console
from .common import data_hash, parent_model
from .train import train_model

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
