"""Stage `baseline`: the clean model's ASR for every trigger of the attack, and for every class as the target."""
from __future__ import annotations

import time

from ..evaluation import asr_by_target, evaluate_model
from ..models import load
from ..params import EvalParams
from ..ui import summary
from .common import load_test, write_metrics


def baseline(attack, ev: EvalParams, clean_model, test_dir, metrics_file, targets_file) -> dict:
    """The clean model's "ASR" for every trigger of `attack` (images it already calls the target): the baseline
    a backdoor and a defence are judged against. A stage of its own, so that a changed attack re-runs this
    evaluation, not the pre-training. `targets_file`: {trigger: {class: baseline ASR}}, the clean model's ASR
    with each class as the target, which the default target's rule reads (docs/decisions.md#target-class)."""
    t0 = time.perf_counter()
    clip = load(clean_model)
    test = load_test(ev, test_dir)
    metrics = evaluate_model(clip, test, triggers={t: attack.options.get(t, {}) for t in attack.triggers},
                             target=attack.target, retrieval_n=ev.retrieval_n, suffix_always=True)
    metrics = {k: v for k, v in metrics.items() if "asr" in k} | {"eval_seconds": round(time.perf_counter() - t0, 1)}
    write_metrics(metrics_file, metrics)
    write_metrics(targets_file, {t: asr_by_target(clip, test, t, attack.options.get(t, {})) for t in attack.triggers})
    summary(f"baseline ASR of the clean model (target {attack.target})", metrics)
    return metrics
