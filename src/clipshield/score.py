"""`clipshield evaluate`: score any CLIP model with the pipeline's own metric code.

A model made elsewhere (local-dir:PATH, or an open_clip name + pretrained tag/file) gets the numbers the
stages write: clean zero-shot accuracy and retrieval, ASR per trigger (strengths from params.yaml's
attack.options), and optionally robust accuracy per eps of params.yaml's robust section.
"""
from __future__ import annotations

import json
from pathlib import Path

import open_clip

from .data import shards
from .evaluation import evaluate_model
from .models import ModelError, create, load
from .params import AttackParams, EvalParams, RobustParams, parse, read_yaml
from .pipeline import device, write_metrics
from .robust import robust_accuracies
from .ui import console


def score(model: str, pretrained: str | None, triggers: list[str], target: str | None, test_dir: str | Path,
          test_n: int | None, params_path: str | Path = "params.yaml", out: str | Path | None = None,
          robust: bool = False, random_init: bool = False) -> dict:
    if out is not None and (Path(out).is_dir() or Path(out).parent.is_file()):
        raise ValueError(f"--out {out} is {'a folder' if Path(out).is_dir() else 'inside a file'}; give the path of "
                         f"the metrics JSON to write, e.g. --out metrics/{Path(model).name.removeprefix('local-dir:')}.json")
    local = model.startswith("local-dir:") or Path(model).is_dir()
    if not local and pretrained is None and not random_init and open_clip.get_model_config(model) is not None:
        raise ModelError(f"--model {model} without --pretrained would score randomly initialised weights; give "
                         f"--pretrained (an open_clip tag or a weight file), a model folder (--model local-dir:PATH), "
                         f"or --random-init to score a random model on purpose")
    raw = read_yaml(params_path) if Path(params_path).exists() else {}
    attack = parse(AttackParams, raw["attack"], "attack") if "attack" in raw else None
    options = attack.options if attack else {}
    if target is None and triggers:
        if attack is None:
            why = "has none" if Path(params_path).exists() else "does not exist"
            raise ValueError(f"--trigger needs a target class: give --target, or --params with an attack section "
                             f"({params_path} {why})")
        target = attack.target
    ev = parse(EvalParams, raw["eval"], "eval") if "eval" in raw else EvalParams(test_n=2000, retrieval_n=1000)
    test_n = test_n or ev.test_n
    clip = load(model) if local else create(model, pretrained)
    clip.model.to(device())
    test = shards.EvalSet(test_dir, limit=test_n)
    side = tuple(test.head(1)["images"].shape[-2:])
    if side != (clip.image_size, clip.image_size):
        console.print(f"note: the test images are {side[0]}x{side[1]} px and {model} takes {clip.image_size} px: "
                      f"they are resized (shortest side, {clip.preprocess_cfg.get('interpolation', 'bicubic')}) and "
                      f"centre-cropped as the model's preprocessing does, in [0, 1]; triggers are applied before the "
                      f"resize, robust attacks after it", highlight=False, soft_wrap=True, markup=False)
    metrics = evaluate_model(clip, test, triggers={t: options.get(t, {}) for t in triggers} or None, target=target,
                             retrieval_n=min(ev.retrieval_n, test_n))
    if robust:
        rp = parse(RobustParams, raw["robust"], "robust") if "robust" in raw else RobustParams([2.0, 4.0], 200, 100)
        metrics |= robust_accuracies(clip, test, rp)
    if out:
        write_metrics(out, metrics)
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in sorted(metrics.items())}, indent=1))
    return metrics
