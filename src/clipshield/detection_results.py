"""The detection results of a run that scored its poisoned sets (stages detect, filter, filtered), kept under
results/detection/ by `clipshield detection collect`: per trigger, every score's AUROC with the backdoored and the
clean model's embeddings; where the filter ran, the poisoned pairs it missed and the backdoor trained again on what
it left, beside the backdoor trained on everything."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from .report import detection_table, filter_lines


def metric_files(metrics_dir: Path, triggers: list[str], seeds: list[int]) -> list[Path]:
    """The metrics files of detection and filtering that `metrics_dir` holds, with the backdoors they compare to."""
    names = [f"{kind}-{t}.json" for kind in ("detect", "filter") for t in triggers]
    names += [f"{kind}-{t}-s{s}.json" for kind in ("backdoor", "filtered") for t in triggers for s in seeds]
    return [metrics_dir / n for n in names if (metrics_dir / n).is_file()]


def summary(metrics_dir: Path, triggers: list[str], seeds: list[int]) -> dict[str, dict]:
    """{trigger: {"aurocs": {model: {score: AUROC}}, "filter": counts | None, "backdoor" / "filtered": {seed:
    {asr, zeroshot_top1}}}} for every trigger with a detect-<trigger>.json."""
    def read(name: str) -> dict | None:
        return json.loads(f.read_text()) if (f := metrics_dir / name).is_file() else None

    def asr_top1(kind: str, trigger: str) -> dict[int, dict]:
        found = {s: read(f"{kind}-{trigger}-s{s}.json") for s in seeds}
        return {s: {k: m[k] for k in ("asr", "zeroshot_top1")} for s, m in found.items() if m}

    out = {}
    for t in triggers:
        if (detect := read(f"detect-{t}.json")) is None:
            continue
        out[t] = {"aurocs": {model: {score: v.get("auroc") for score, v in scores.items()}
                             for model, scores in detect.items()},
                  "filter": read(f"filter-{t}.json"), "backdoor": asr_top1("backdoor", t),
                  "filtered": asr_top1("filtered", t)}
    return out


def filtered_table(found: dict[str, dict]) -> str:
    """Filter, then train, against the backdoor trained on every pair: ASR and top-1 per trigger and seed."""
    rows = []
    for t, r in found.items():
        if not r["filter"]:
            continue
        f = r["filter"]
        for seed, after in r["filtered"].items():
            before = r["backdoor"].get(seed, {})
            cells = [f"{before[k]:.3f}" if k in before else "–" for k in ("asr", "zeroshot_top1")]
            rows.append(f"| {t} | {seed} | {f['score']} | {f['poisoned_left']} of {f['poisoned']} | "
                        f"{cells[0]} / {cells[1]} | {after['asr']:.3f} / {after['zeroshot_top1']:.3f} |")
    if not rows:
        return ""
    return "\n".join(["| trigger | seed | filtered by | poisoned pairs left | backdoor on every pair: ASR / top-1 | "
                      "backdoor on the filtered set: ASR / top-1 |", "|---|---|---|---|---|---|", *rows])


def markdown(metrics_dir: Path, triggers: list[str], found: dict[str, dict]) -> str:
    parts = ["AUROC of each score against the poisoned pairs of the manifest (1: every poisoned pair scores above "
             "every clean one; 0.5: a random ranking; below 0.5: the poisoned pairs look *less* suspicious).", "",
             detection_table(metrics_dir, list(found)), ""]
    if lines := filter_lines(metrics_dir, list(found)):
        parts += ["Filter, then train: the pairs dropped, and the backdoor stage trained again from the clean model "
                  "on the rest.", "", *lines, filtered_table(found), ""]
    return "\n".join(parts).rstrip("\n") + "\n"


def write(metrics_dir: Path, times_dir: Path, params_file: Path, triggers: list[str], seeds: list[int],
          out: Path, cpu: str | None = None) -> Path:
    """out/: metrics/ (the files read), summary.json, summary.md, params.yaml (the run's) and machine.json (the CPU
    its detect stages recorded, or `cpu` where they recorded none: `dvc exp run --temp` keeps no times/ file that
    the commit lacks)."""
    from .results_doc import cpu_label
    found = summary(metrics_dir, triggers, seeds)
    if not found:
        raise ValueError(f"{metrics_dir} holds no detect-<trigger>.json for {', '.join(triggers)}: run the detect "
                         f"stages first (`dvc repro detect`, or `dvc exp apply` an experiment that ran them)")
    records = [json.loads(f.read_text()) for t in found if (f := times_dir / f"detect@{t}.json").is_file()]
    cpus = sorted({cpu_label(r) for r in records if r.get("cpu")})
    if not cpus and cpu:
        cpus = [cpu]
    if not cpus:
        raise ValueError(f"{times_dir}: no record of the detect stages names their CPU (an experiment run with --temp "
                         f"keeps none): give it, e.g. --cpu 'AMD EPYC (2 cores, no AVX-512)' from `lscpu` of the "
                         f"machine that ran them")
    if len(cpus) > 1 or (cpu and cpu != cpus[0]):
        raise ValueError(f"{times_dir}: the detect stages' records name {'; '.join(cpus)}"
                         f"{f', not {cpu}' if cpu and len(cpus) == 1 else ''}; collect the results of one run on one "
                         f"machine")
    if out.exists():
        shutil.rmtree(out)
    (out / "metrics").mkdir(parents=True)
    for f in metric_files(metrics_dir, list(found), seeds):
        shutil.copy2(f, out / "metrics" / f.name)
    shutil.copy2(params_file, out / "params.yaml")
    (out / "machine.json").write_text(json.dumps({"cpu": cpus[0]}) + "\n")
    (out / "summary.json").write_text(json.dumps(found, indent=1) + "\n")
    md = out / "summary.md"
    md.write_text(markdown(out / "metrics", triggers, found))
    return md
