"""The target panel: the attack and every cleaning method once per class of the data set as the attack's target,
each target a DVC experiment (`clipshield targets run`), collected into results/targets/ (`clipshield targets collect`).

A target is a condition of the whole experiment, as par.eps is, so each is `dvc exp run -S attack.target=T`: the
model names stay those of the default run, `dvc exp show` lists every target beside the commit, and DVC's cache
shares the clean model and the cleaning data among them. Per target the summary keeps the mean over the seeds;
over targets it gives the median, min, max and the mean with its 95% interval (t), so that a finding is read on
every target and not on one draw.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from .report import T975, save_figure
from .results_doc import LABELS
from .sweep import cell, consistent_group

PARAM = "attack.target"
KEYS = ("asr", "zeroshot_top1", "i2t_r5", "t2i_r5")
PREFIX = "target-"              # experiment names: target-<class>


def value(e: dict) -> str | None:
    v = e.get(f"params.yaml:{PARAM}", e.get(PARAM))
    return v if isinstance(v, str) else None


def model_means(e: dict, method: str, trigger: str) -> dict[str, float] | None:
    """The mean over seeds of every key of models `<method>-<trigger>-s<seed>` in one exp_show row; None unless
    some seed has every key."""
    pattern = re.compile(rf"metrics/{re.escape(method)}-{re.escape(trigger)}-s\d+\.json:")
    seeds = {m.group(0) for k in e if (m := pattern.match(str(k)))}
    values = [[cell(e, f"{s}{k}") for k in KEYS] for s in sorted(seeds)]
    values = [v for v in values if None not in v]
    if not values:
        return None
    return {k: sum(v[i] for v in values) / len(values) for i, k in enumerate(KEYS)} | {"seeds": len(values)}


def experiment_row(e: dict, trigger: str, methods: list[str]) -> dict | None:
    """{"clean": {...}, "backdoor": {...}, method: {...}} of one finished experiment or commit; None if any is
    missing, and for the workspace (its metrics may be older than its params). The clean model's ASR is its
    baseline under the trigger (the target's share of triggered non-target images)."""
    if e.get("State") in ("Queued", "Running", "Failed") or value(e) is None or e.get("rev") == "workspace":
        return None
    clean = {k: cell(e, f"metrics/clean.json:{k}") for k in KEYS if k != "asr"}
    clean["asr"] = cell(e, f"metrics/baseline.json:asr_{trigger}", f"asr_{trigger}")  # a key of one file: no path
    row = {"clean": clean} if None not in clean.values() else None
    for method in ("backdoor", *methods):
        if row is None or (means := model_means(e, method, trigger)) is None:
            return None
        row[method] = means
    return row


def per_target(experiments: list[dict], trigger: str, methods: list[str],
               others: tuple[str, ...] = ()) -> dict[str, dict]:
    """{target: row} over the experiments that agree on every parameter of `others` but the target (one group, as a
    sweep's), sorted by target; a target measured twice keeps its first row (the commit before its experiments)."""
    group = consistent_group(experiments, PARAM, others, key=lambda rows: len({value(e) for e in rows
                                                                                if experiment_row(e, trigger, methods)}))
    out: dict[str, dict] = {}
    for e in group:
        if (row := experiment_row(e, trigger, methods)) is not None and value(e) not in out:
            out[value(e)] = row | {"experiment": str(e.get("Experiment") or e.get("rev"))}
    return dict(sorted(out.items()))


def spread(values: list[float]) -> dict:
    """n, median, min, max, mean and the half-width of the mean's 95% interval (t; None for a single value)."""
    n, s = len(values), sorted(values)
    mean = sum(s) / n
    sd = (sum((v - mean) ** 2 for v in s) / (n - 1)) ** 0.5 if n > 1 else None
    return {"n": n, "median": (s[(n - 1) // 2] + s[n // 2]) / 2, "min": s[0], "max": s[-1], "mean": mean,
            "ci95": T975.get(n, 1.96) * sd / n ** 0.5 if sd is not None else None}


def panel(summary: dict[str, dict], methods: list[str]) -> dict:
    """Over targets: every model's keys, and each cleaning method's cost against the backdoored model (`top1_cost`,
    `i2t_r5_cost`: backdoored minus cleaned, in points of 1.0)."""
    rows = list(summary.values())
    out = {m: {k: spread([r[m][k] for r in rows]) for k in KEYS} for m in ("clean", "backdoor", *methods)}
    for m in methods:
        out[m]["top1_cost"] = spread([r["backdoor"]["zeroshot_top1"] - r[m]["zeroshot_top1"] for r in rows])
        out[m]["i2t_r5_cost"] = spread([r["backdoor"]["i2t_r5"] - r[m]["i2t_r5"] for r in rows])
    return out


def below(summary: dict[str, dict], method: str, limit: float) -> int:
    return sum(r[method]["asr"] <= limit for r in summary.values())


def markdown(summary: dict[str, dict], methods: list[str], trigger: str, default_target: str | None = None) -> str:
    """The ASR of every model per target (the default target marked), then the spread over targets; then each
    method's cost in top-1 and i2t R@5 against the backdoored model."""
    stats, models = panel(summary, methods), ("clean", "backdoor", *methods)

    def pct(v):
        return "–" if v is None else f"{100 * v:.1f}"

    def spread_rows(columns):
        s = [stats[m][k] for m, k in columns]
        return [[name, *(pct(c[name]) for c in s)] for name in ("median", "min", "max")] + \
            [["mean ± 95%", *(f"{pct(c['mean'])} ± {pct(c['ci95'])}" for c in s)]]

    def table(head, body):
        return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
                          *("| " + " | ".join(r) + " |" for r in body)])

    name = {t: f"**{t}** (default)" if t == default_target else t for t in summary}
    asr = table(["target", *(f"{LABELS.get(m, m)} ASR %" for m in models)],
                [[name[t], *(pct(r[m]["asr"]) for m in models)] for t, r in summary.items()]
                + spread_rows([(m, "asr") for m in models]))
    cost_cols = [(m, k) for m in methods for k in ("top1_cost", "i2t_r5_cost")]
    cost = table(["target", *(f"{LABELS.get(m, m)} {'top-1' if k == 'top1_cost' else 'i2t R@5'} cost" for m, k in
                              cost_cols)],
                 [[name[t], *(pct(r["backdoor"][key] - r[m][key]) for m in methods
                              for key in ("zeroshot_top1", "i2t_r5"))] for t, r in summary.items()]
                 + spread_rows(cost_cols))
    n = len(summary)
    counts = "; ".join(f"{LABELS.get(m, m)} leaves ≤ 5% on {below(summary, m, 0.05)} of {n}" for m in methods)
    seeds = min(r[m]["seeds"] for r in summary.values() for m in ("backdoor", *methods))
    if default_target in summary and methods:
        last = methods[-1]
        rank = 1 + sum(r[last]["asr"] < summary[default_target][last]["asr"] for r in summary.values())
        counts += (f". The default target, {default_target}, ranks {rank} of {n} by what {LABELS.get(last, last)} "
                   f"leaves (1: the least)")
    return (f"Trigger `{trigger}`, {n} targets, each the mean over {seeds} seed(s). {counts}.\n\n"
            f"Attack success rate (%) per target:\n\n{asr}\n\n"
            f"Cost of cleaning (points of top-1 and of i2t R@5 lost against the backdoored model):\n\n{cost}\n")


def plot(summary: dict[str, dict], methods: list[str], out: Path) -> None:
    """Each model's ASR per target: targets ordered by the last method's ASR (PAR in the default order)."""
    import matplotlib.pyplot as plt
    order = sorted(summary, key=lambda t: summary[t][methods[-1]]["asr"] if methods else t)
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(order) + 2), 4))
    markers = {"clean": "*", "backdoor": "X"}
    for i, m in enumerate(("clean", "backdoor", *methods)):
        ax.plot(order, [summary[t][m]["asr"] for t in order], markers.get(m, "os^Dv"[i % 5]), color=f"C{i}",
                label=LABELS.get(m, m), linestyle="none", markersize=8)
    ax.axhline(0.05, color="grey", lw=0.8, ls=":")
    ax.set_ylabel("attack success rate")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel(PARAM)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_title(f"residual ASR per target ({len(order)} targets)")
    save_figure(fig, out, dpi=120)


def write(summary: dict[str, dict], methods: list[str], trigger: str, out_dir: Path,
          default_target: str | None = None) -> Path:
    """results/targets/: summary.json ({target: {model: {asr, zeroshot_top1, i2t_r5, t2i_r5, seeds}}}, the
    experiment of each), panel.json (the spread over targets), summary.md and residual_asr.png."""
    if len(summary) < 2:
        raise ValueError(f"the target panel needs two targets or more with metrics of clean, backdoor and "
                         f"{', '.join(methods)} for {trigger}; found {', '.join(summary) or 'none'}. Run "
                         f"`clipshield targets run` first")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out_dir / "panel.json").write_text(json.dumps({"trigger": trigger, **panel(summary, methods)}, indent=1) + "\n")
    md = out_dir / "summary.md"
    md.write_text(markdown(summary, methods, trigger, default_target))
    plot(summary, methods, out_dir / "residual_asr.png")
    return md
