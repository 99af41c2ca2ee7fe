"""Stage `harden`: FARE/TeCoA fine-tuning of a model, with its robust metrics."""
from __future__ import annotations

from ..models import load, read_provenance
from ..objectives import build_objective
from ..params import EvalParams, HardenParams, RobustParams, objective_options
from ..robust import robust_metrics
from .common import data_hash, parent_model
from .train import train_model


def harden(run: str, runs: dict, p: HardenParams, rp: RobustParams, attack, ev: EvalParams, options: dict, start,
           reference, data_dir, test_dir, out_model, metrics_file) -> dict:
    """Run `runs[run]` (params.harden_runs): FARE/TeCoA fine-tuning (the method's params section `options`) of the
    model `start` on the clean train shards -> `out_model` (<run>), evaluated for clean accuracy, ASR (where the start
    model had a trigger), and robust accuracy and distortion against the clean model `reference`."""
    from ..data.classes import read_classes
    if run not in runs:
        raise ValueError(f"unknown harden run {run!r}; harden.runs and harden.matrix make: {', '.join(runs) or 'none'}")
    spec = runs[run]
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
                            params={k: v for k, v in vars(p).items() if k not in ("runs", "matrix")}),
                       triggers, attack.target, extra=lambda clip, test: robust_metrics(clip, reference, test, rp))
