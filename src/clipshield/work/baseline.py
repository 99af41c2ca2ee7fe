"""Stage `baseline`: the clean model's ASR for every trigger of the attack."""
from __future__ import annotations

import time

from ..evaluation import evaluate_model
from ..models import load
from ..params import EvalParams
from ..ui import summary
from .common import load_test, write_metrics


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
