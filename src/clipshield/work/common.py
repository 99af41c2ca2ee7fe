"""What the work of every stage shares: the device, the code version a model records, data hashes, the metrics
file and the test set."""
from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import torch

from .. import __version__
from ..data import shards
from ..params import EvalParams
from ..ui import wrote


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


def load_test(ev: EvalParams, test_dir: str | Path) -> shards.EvalSet:
    """The first eval.test_n test samples, streamed batch by batch by the evaluation (memory flat in test_n), with the
    zero-shot class space of eval.classes and eval.templates. Fewer are refused: the size of an imported test set is
    known only here (params validation compares eval.test_n with data.test_n)."""
    test = shards.EvalSet(test_dir, limit=ev.test_n, classes=ev.classes, templates=ev.templates)
    if len(test) < ev.test_n:
        raise shards.DataError(f"eval.test_n = {ev.test_n} but the test set {test_dir} holds {len(test)} samples; set "
                               f"eval.test_n: {len(test)} (or fewer), or import a larger test set (data.test_shards)")
    return test


def parent_model(start: str | Path) -> dict:
    return {"model": str(start), "name": Path(start).name}
