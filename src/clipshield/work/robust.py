"""Stage `robust`: robust accuracy and distortion of an existing model (the clean model's row)."""
from __future__ import annotations

import json

from ..models import load
from ..params import EvalParams, RobustParams
from ..robust import robust_metrics
from .common import load_test, write_metrics


def robust_baseline(rp: RobustParams, ev: EvalParams, model, reference, test_dir, metrics_file) -> dict:
    """Robust accuracy and distortion of an existing model (the clean model's row of the robustness table)."""
    clip = load(model)
    metrics = robust_metrics(clip, load(reference), load_test(ev, test_dir), rp)
    write_metrics(metrics_file, metrics)
    print(json.dumps(metrics))
    return metrics
