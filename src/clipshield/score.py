"""`clipshield evaluate`: score any CLIP model with the pipeline's own metric code.

A model made elsewhere (local-dir:PATH, or an open_clip name + pretrained tag/file) gets the numbers the
stages write: clean zero-shot accuracy and retrieval, ASR per trigger (strengths from params.yaml's
attack.options), and optionally robust accuracy per eps of params.yaml's robust section.
"""
from __future__ import annotations

import json
from pathlib import Path

from .data import shards
from .evaluation import evaluate_model
from .models import create, load
from .params import AttackParams, EvalParams, parse, read_yaml
from .pipeline import device, write_metrics
from .robust import RobustParams, robust_accuracies


def score(model: str, pretrained: str | None, triggers: list[str], target: str, test_dir: str | Path,
          test_n: int | None, params_path: str | Path = "params.yaml", out: str | Path | None = None,
          robust: bool = False) -> dict:
    raw = read_yaml(params_path) if Path(params_path).exists() else {}
    options = parse(AttackParams, raw["attack"], "attack").options if "attack" in raw else {}
    ev = parse(EvalParams, raw["eval"], "eval") if "eval" in raw else EvalParams(test_n=2000, retrieval_n=1000)
    test_n = test_n or ev.test_n
    clip = load(model) if model.startswith("local-dir:") or Path(model).is_dir() else create(model, pretrained)
    clip.model.to(device())
    test = shards.EvalSet(test_dir, limit=test_n)
    metrics = evaluate_model(clip, test, triggers={t: options.get(t, {}) for t in triggers} or None, target=target,
                             retrieval_n=min(ev.retrieval_n, test_n))
    if robust:
        rp = parse(RobustParams, raw["robust"], "robust") if "robust" in raw else RobustParams([2.0, 4.0], 200, 100)
        metrics |= robust_accuracies(clip, test, rp)
    if out:
        write_metrics(out, metrics)
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in sorted(metrics.items())}, indent=1))
    return metrics
