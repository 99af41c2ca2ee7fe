"""The comparison table and pictures, from the metrics every model stage wrote."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from .attacks.triggers import TRIGGERS  # noqa: E402
from .data.world import BASE, render  # noqa: E402
from .evaluation import trigger_images  # noqa: E402
from .objectives import METHODS, methods  # noqa: E402
from .params import split_run_name  # noqa: E402
from .ui import console  # noqa: E402

# The rows that are no method of the registry (clean.methods and harden runs are): their plot markers.
REFERENCE_MARKERS = {"clean": "*", "backdoor": "X", "filtered": "h"}  # P, D, o, s, v: the methods'
# t_{0.975, n-1} for the 95% confidence interval of a mean over n seeds (n = 2..10)
T975 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 7: 2.447, 8: 2.365, 9: 2.306, 10: 2.262}
COLUMNS = ("zeroshot_top1", "asr", "asr_all", "retrieval_asr", "i2t_r5", "t2i_r5")
TAIL_COLUMNS = ("distortion_clean", "distortion_adv")


def columns(rows: list[dict]) -> tuple[str, ...]:
    """The table's columns: the fixed ones, then robust_top1_eps<E> for every radius the rows were scored at
    (robust.eps), in order of E, then the distortions."""
    eps = {k for r in rows for k in r if k.startswith("robust_top1_eps") and not k.endswith("_ci")}
    return COLUMNS + tuple(sorted(eps, key=lambda k: float(k.removeprefix("robust_top1_eps").replace("_", ".")))) \
        + TAIL_COLUMNS


def collect(metrics_dir: Path, triggers: list[str], runs: dict | None = None) -> list[dict]:
    """One row per model and seed: clean (once per trigger: its ASR is the baseline), then per trigger the
    backdoored model and each cleaned one, then the robust fine-tunes of `runs` (harden.runs)."""
    rows = []
    clean_file = metrics_dir / "clean.json"
    if clean_file.exists():
        m = json.loads(clean_file.read_text())
        for extra in ("robust-clean.json", "baseline.json"):  # its robust accuracy and its ASR per trigger
            m |= json.loads((metrics_dir / extra).read_text()) if (metrics_dir / extra).exists() else {}
        for t in triggers:
            rows.append({**m, "model": "clean", "group": f"clean ({t})", "trigger": t, "method": "clean", "seed": None,
                         "asr": m.get(f"asr_{t}"), "asr_all": m.get(f"asr_all_{t}"),
                         "retrieval_asr": m.get(f"retrieval_asr_{t}")})
    for t in triggers:
        for method in ("backdoor", "filtered", *methods("clean")):
            for f in sorted(metrics_dir.glob(f"{method}-{t}-s*.json")):
                group, seed = split_run_name(f.stem)
                if group == f"{method}-{t}":
                    rows.append({**json.loads(f.read_text()), "model": f.stem, "group": group, "trigger": t,
                                 "method": method, "seed": seed})
    for run, spec in (runs or {}).items():
        f = metrics_dir / f"{run}.json"
        if f.exists():
            group, seed = split_run_name(run)
            start = spec.get("start", "")
            start_trigger = split_run_name(start)[0].partition("-")[2]  # <kind>-<trigger>-s<seed>; "clean" has none
            trigger = start_trigger if start_trigger in triggers else "-"
            rows.append({**json.loads(f.read_text()), "model": run, "group": group, "trigger": trigger,
                         "method": spec.get("method"), "start": start, "seed": seed})
    return rows


def aggregate(rows: list[dict]) -> list[dict]:
    """One row per group (a model over its seeds): the mean of every column, and the 95% CI half-width
    (key `<column>_ci`) where there is more than one seed."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["group"], []).append(r)
    out, cols = [], columns(rows)
    for group, members in groups.items():
        row = {k: v for k, v in members[0].items() if k not in cols}
        row["model"], row["seeds"] = group, len(members)
        for c in cols:
            values = [m[c] for m in members if isinstance(m.get(c), (int, float))]
            if not values:
                continue
            n = len(values)
            mean = sum(values) / n
            row[c] = mean
            if n > 1:
                sd = (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5
                row[f"{c}_ci"] = T975.get(n, 1.96) * sd / n ** 0.5
        out.append(row)
    return out


def markdown_table(rows: list[dict]) -> str:
    """The aggregated rows as markdown; mean ± 95% CI where a model has several seeds."""
    cols = columns(rows)
    lines = ["| model | seeds | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 2)]
    for r in rows:
        def cell(c):
            v = r.get(c)
            if not isinstance(v, (int, float)):
                return "–"
            digits = 1 if c.startswith("distortion") else 3
            return f"{v:.{digits}f}" + (f" ± {r[c + '_ci']:.{digits}f}" if f"{c}_ci" in r else "")
        lines.append(f"| {r['model']} | {r.get('seeds', 1)} | " + " | ".join(cell(c) for c in cols) + " |")
    return "\n".join(lines)


def save_figure(fig, out: Path, dpi: int) -> None:
    fig.tight_layout()
    fig.savefig(out, dpi=dpi)
    plt.close(fig)


def robust_vs_eps(rows: list[dict], out: Path) -> bool:
    """Robust zero-shot accuracy against the attack radius, one line per model that has robust metrics."""
    series = []
    for r in rows:
        points = sorted((float(k.removeprefix("robust_top1_eps").replace("_", ".")), v) for k, v in r.items()
                        if k.startswith("robust_top1_eps") and not k.endswith("_ci") and isinstance(v, float))
        name = r["model"].split(" (")[0]  # the clean model has one row per trigger
        if points and name not in {s[0] for s in series}:
            series.append((name, [(0.0, r["zeroshot_top1"])] + points))
    if not series:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in series:
        ax.plot([p[0] for p in points], [100 * p[1] for p in points], "o-", label=name)
    ax.set_xlabel("l-inf radius eps (x 1/255)")
    ax.set_ylabel("zero-shot top-1 under APGD-CE + APGD-DLR-T (%)")
    ax.set_title("robust accuracy vs eps (eps 0: clean accuracy)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_figure(fig, out, dpi=120)
    return True


def asr_vs_accuracy(rows: list[dict], out: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4.5))
    # the reference rows, then every cleaning and hardening method (the registry's), named as in the table
    markers = REFERENCE_MARKERS | {m.name: m.marker for m in METHODS.values() if m.role != "pretrain"}
    colours = {t: f"C{i}" for i, t in enumerate(dict.fromkeys(r["trigger"] for r in rows if r["trigger"] != "-"))}
    for r in rows:
        if r.get("asr") is None or r["trigger"] not in colours:
            continue
        ax.scatter(100 * r["zeroshot_top1"], 100 * r["asr"], marker=markers.get(r["method"], "o"),
                   color=colours[r["trigger"]], s=70, edgecolor="black", linewidth=0.5)
    for method, marker in markers.items():
        ax.scatter([], [], marker=marker, color="grey", label=method)
    for t, c in colours.items():
        ax.scatter([], [], marker="o", color=c, label=t)
    ax.set_xlabel("clean zero-shot top-1 (%)")
    ax.set_ylabel("attack success rate (%)")
    ax.set_title("backdoor ASR vs clean accuracy, per trigger and defence")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    save_figure(fig, out, dpi=120)


def trigger_gallery(out: Path, attack, n: int = 4) -> Path:
    """Rows: clean test images, then each trigger (at the configured strengths) applied to them."""
    out.parent.mkdir(parents=True, exist_ok=True)
    imgs = torch.stack([torch.from_numpy(render(BASE, 1, i, 32)[0]).permute(2, 0, 1).float() / 255 for i in range(n)])
    names, rows = [], [imgs]
    for t in TRIGGERS:
        try:
            rows.append(trigger_images(imgs, t, attack.options.get(t, {})))
            names.append(t)
        except FileNotFoundError as e:  # a trigger that a stage makes (badclip's patch) before the stage ran
            console.print(f"note: {t} is not in the gallery: {e}")
    fig, axes = plt.subplots(len(rows), n, figsize=(1.4 * n, 1.4 * len(rows)))
    for r, (label, batch) in enumerate(zip(["clean"] + names, rows)):
        for c in range(n):
            axes[r, c].imshow(batch[c].permute(1, 2, 0).numpy(), interpolation="nearest")
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
        axes[r, 0].set_ylabel(label, fontsize=7, rotation=0, ha="right", va="center")
    save_figure(fig, out, dpi=120)
    console.print(f"triggers: {', '.join(names)} -> {out}")
    return out


def read_series(run: Path, metric: str) -> list[tuple[float, float]]:
    """(step, value) pairs of one DVCLive series, dvclive/RUN/plots/metrics/METRIC.tsv ([] if not logged)."""
    path = run / "plots" / "metrics" / f"{metric}.tsv"
    if not path.is_file():
        return []
    rows = [line.split("\t") for line in path.read_text().splitlines()[1:] if line.strip()]
    return [(float(r[0]), float(r[1])) for r in rows]


def training_curves(log_dir: Path, out: Path) -> bool:
    """One panel per training run (its DVCLive series in dvclive/RUN/): loss vs step, and zero-shot accuracy and
    ASR where the run evaluated during training (`eval_every`)."""
    logs = sorted(p for p in log_dir.iterdir() if read_series(p, "loss")) if log_dir.is_dir() else []
    if not logs:
        return False
    cols = 4
    nrows = -(-len(logs) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 2.4 * nrows), squeeze=False)
    for ax, log in zip(axes.flat, logs):
        loss = read_series(log, "loss")
        ax.plot([s for s, _ in loss], [v for _, v in loss], color="C0")
        ax.set_title(log.name, fontsize=8)
        ax.tick_params(labelsize=6)
        evals = {c: read_series(log, key) for c, key in (("C3", "zeroshot_top1"), ("C2", "asr"))}
        if any(evals.values()):
            ax2 = ax.twinx()
            for color, series in evals.items():
                ax2.plot([s for s, _ in series], [100 * v for _, v in series], "o-", color=color, ms=3)
            ax2.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(logs):]:
        ax.axis("off")
    fig.suptitle("training loss (blue); zero-shot top-1 % (red) and ASR % (green) where evaluated; vs step",
                 fontsize=9)
    save_figure(fig, out, dpi=110)
    return True


def asr_series(rows: list[dict], log_dir: Path) -> dict[str, list[tuple[str, list[tuple[float, float]]]]]:
    """{trigger: [(run, [(step, ASR)])]} for every run that logged its ASR while training (`eval_every`); the run
    named without its trigger and seed (par, fare-par, ...)."""
    panels: dict[str, list] = {}
    for r in rows:
        series = read_series(log_dir / r["model"], "asr") if r["method"] != "clean" else []
        if series:
            panels.setdefault(r["trigger"], []).append((r["group"].replace(f"-{r['trigger']}", ""), series))
    return panels


def asr_during_training(rows: list[dict], log_dir: Path, out: Path) -> bool:
    """ASR against training step, one panel per trigger, one line per run that logged it (step 0 is the model it
    started from): when an attack takes and when (or whether) each defence removes it, beside the clean model's
    ASR for that trigger (dashed)."""
    panels = asr_series(rows, log_dir)
    if not panels:
        return False
    baseline = {r["trigger"]: r.get("asr") for r in rows if r["method"] == "clean"}
    colours = {name: f"C{i}" for i, name in enumerate(dict.fromkeys(n for runs in panels.values() for n, _ in runs))}
    cols = min(3, len(panels))
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.4 * cols, 3.4 * nrows), squeeze=False)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    for ax, (trigger, runs) in zip(axes.flat, panels.items()):
        labelled = set()
        for name, series in runs:  # several seeds of a run share its colour and label
            ax.plot([s for s, _ in series], [100 * v for _, v in series], "o-", ms=3, color=colours[name],
                    label=None if name in labelled else name)
            labelled.add(name)
        if baseline.get(trigger) is not None:
            ax.axhline(100 * baseline[trigger], ls="--", color="grey", label="clean model")
        ax.set_title(trigger, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel("ASR on 500 test images (%)", fontsize=8)
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, out, dpi=110)
    return True


# A cleaned model's backdoor is "removed" when its ASR is within REMOVED_PTS of the clean model's own ASR for the
# trigger (images it already calls the target): the clean model differs by that much between training seeds, and
# it is the bar the PAR paper's results clear. "Reduced" up to REDUCED_PTS above the clean model (the trigger
# flips at most one prediction in five), "backdoored" beyond.
REMOVED_PTS, REDUCED_PTS = 0.05, 0.20


def backdoor_verdict(asr: float, baseline: float | None, attacker: float | None = None) -> str:
    """removed / reduced / backdoored, judged against the clean model's baseline ASR, with the numbers beside."""
    base = baseline or 0.0
    word = "backdoor removed" if asr <= base + REMOVED_PTS else (
        "backdoor reduced" if asr <= base + REDUCED_PTS else "backdoored")
    numbers = [f"ASR {100 * asr:.1f}%", f"clean model {100 * base:.1f}%"]
    if attacker is not None:
        numbers.append(f"backdoored model {100 * attacker:.1f}%")
    return f"{word} ({', '.join(numbers)})"


def state(row: dict, clean_robust: float | None, baseline: float | None = None, attacker: float | None = None) -> str:
    """A one-phrase verdict: does the model carry a backdoor, and is it adversarially robust?"""
    words = []
    if isinstance(row.get("asr"), float) and row["method"] != "clean":
        words.append(backdoor_verdict(row["asr"], baseline, None if row["method"] == "backdoor" else attacker))
    r4 = row.get("robust_top1_eps4")
    if isinstance(r4, float) and clean_robust is not None and row["method"] != "clean":
        words.append(f"robust (+{100 * (r4 - clean_robust):.0f} pts at 4/255)" if r4 - clean_robust >= 0.2
                     else "not robust")
    return ", ".join(words) or "reference"


# The PAR paper's ASR (%) after cleaning, PAR against CleanCLIP: RN50, ImageNet (docs/methods.md §4). badnet_stripes: the
# paper's run on synthetic pairs only, PAR alone.
PAPER_ASR = {"badnet": (6.3, 14.5), "blended": (0.0, 19.5), "blended_stripes": (0.1, 61.8),
             "blended_triangles": (10.3, 48.7), "badnet_stripes": (3.7, None)}


def target_standing(by_target: dict[str, dict[str, float]], target: str) -> list[str]:
    """Where the target stands among all classes by the clean model's baseline ASR (metrics/baseline-targets.json),
    one line per trigger: the rule for the default target reads only this (docs/decisions.md#target-class)."""
    lines = []
    for trigger, per in by_target.items():
        ranked = sorted((v, c) for c, v in per.items() if v == v)  # nan: a class that every test image belongs to
        if target not in per or not ranked:
            continue
        rank = 1 + sum(v < per[target] for v, _ in ranked)
        lines.append(f"- {trigger}: the clean model calls {100 * per[target]:.1f}% of triggered test images of "
                     f"other classes `{target}`, rank {rank} of {len(ranked)} classes (lowest `{ranked[0][1]}` "
                     f"{100 * ranked[0][0]:.1f}%, highest `{ranked[-1][1]}` {100 * ranked[-1][0]:.1f}%)")
    return lines


def detection_table(metrics_dir: Path, triggers: list[str]) -> str:
    """AUROC of every detection score per trigger (metrics/detect-<trigger>.json), with the backdoored model's and
    the clean model's image embeddings, beside 0.5 (a random ranking); "" when no trigger was scored."""
    from .detection import SCORE_LABELS
    found = {t: json.loads(f.read_text()) for t in triggers if (f := metrics_dir / f"detect-{t}.json").exists()}
    if not found:
        return ""
    lines = ["| trigger | embeddings of | " + " | ".join(f"{label} AUROC" for label in SCORE_LABELS.values())
             + " | random | poisoned / pairs |", "|---|---|" + "---|" * (len(SCORE_LABELS) + 2)]
    for trigger, by_model in found.items():
        for model in ("backdoored", "clean"):
            scores = by_model.get(model, {})
            aurocs = [scores.get(s, {}).get("auroc") for s in SCORE_LABELS]
            cells = [f"{a:.3f}" if isinstance(a, float) else "–" for a in aurocs]
            any_score = next(iter(scores.values()), {})
            lines.append(f"| {trigger} | {model} model | " + " | ".join(cells)
                         + f" | 0.5 | {any_score.get('n_poison', '–')} / {any_score.get('n', '–')} |")
    return "\n".join(lines)


def filter_lines(metrics_dir: Path, triggers: list[str]) -> list[str]:
    """What the filtering defence dropped per trigger (metrics/filter-<trigger>.json), a line each and a blank one."""
    lines = []
    for t in triggers:
        if (f := metrics_dir / f"filter-{t}.json").exists():
            m = json.loads(f.read_text())
            lines.append(f"- {t}: the {m['dropped']} of {m['pairs']} pairs with the highest {m['score']} dropped "
                         f"(detect.filter_fraction {m['filter_fraction']:g}): {m['poisoned_dropped']} of the "
                         f"{m['poisoned']} poisoned pairs among them, {m['poisoned_left']} left for the re-training "
                         f"(`filtered-{t}`)")
    return lines + [""] * bool(lines)


def paper_table(table: list[dict]) -> str:
    """PAR against CleanCLIP per trigger, this run's ASR (%) beside the PAR paper's; "" if no trigger is in both."""
    asr = {(r["trigger"], r["method"]): r for r in table if isinstance(r.get("asr"), float)}

    def cell(row: dict | None) -> str:
        if row is None:
            return "–"
        return f"{100 * row['asr']:.1f}" + (f" ± {100 * row['asr_ci']:.1f}" if "asr_ci" in row else "")

    lines = [f"| {t} | {cell(asr.get((t, 'par')))} | {cell(asr.get((t, 'cleanclip')))} | {par:g} | "
             + ("–" if cc is None else f"{cc:g}") + " |"
             for t, (par, cc) in PAPER_ASR.items() if (t, "par") in asr or (t, "cleanclip") in asr]
    if not lines:
        return ""
    par, cleanclip = METHODS["par"].label, METHODS["cleanclip"].label
    return "\n".join([f"| trigger | {par} | {cleanclip} | paper: {par} | paper: {cleanclip} |", "|---|---|---|---|---|",
                      *lines])


STAGE_ORDER = ("data", "pretrain", "badclip", "baseline", "poison", "backdoor", "detect", "filter", "filtered",
               "synth", "clean", "robust", "harden", "report")


def time_table(times_dir: Path, stages: set[str] | None = None) -> tuple[str, float, list[str]]:
    """Markdown table of the wall seconds every stage took (times/*.json, written by each stage), in pipeline
    order, the total (what `dvc repro` from scratch costs) and the stages without a record. `stages`: only these
    (the current pipeline's); one DVC restored from its run cache never ran here, so it has no time: a row with
    a dash, left out of the total."""
    rows = [json.loads(p.read_text()) for p in sorted(times_dir.glob("*.json"))]
    rows = [r for r in rows if stages is None or r["stage"] in stages]
    missing = sorted((stages or set()) - {r["stage"] for r in rows} - {"report"})  # report: timed after it writes
    rows += [{"stage": name, "seconds": None} for name in missing]
    order = {name: i for i, name in enumerate(STAGE_ORDER)}
    rows.sort(key=lambda r: (order.get(r["stage"].split("@")[0], len(order)), r["stage"]))
    total = sum(r["seconds"] for r in rows if r["seconds"] is not None)
    lines = ["| stage | seconds | minutes |", "|---|---|---|"]
    lines += [f"| {r['stage']} | {r['seconds']:.0f} | {r['seconds'] / 60:.1f} |" if r["seconds"] is not None
              else f"| {r['stage']} | – | – |" for r in rows]
    lines.append(f"| **total** | **{total:.0f}** | **{total / 60:.1f}** |")
    return "\n".join(lines), total, missing


def write_plot_data(table: list[dict], out: Path) -> None:
    """Data series for `dvc plots show/diff` (declared in dvc.yaml): ASR vs accuracy and robust accuracy vs eps
    as JSON lists (the training curves are each training stage's DVCLive series, declared with the stage)."""
    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    asr = [{"model": r["model"], "zeroshot_top1": r["zeroshot_top1"], "asr": r["asr"]} for r in table
           if isinstance(r.get("asr"), float) and isinstance(r.get("zeroshot_top1"), float)]
    (plots / "asr_vs_accuracy.json").write_text(json.dumps(asr, indent=1) + "\n")
    robust = [{"model": r["model"], "eps": float(k.removeprefix("robust_top1_eps").replace("_", ".")), "robust_top1": v}
              for r in table for k, v in r.items()
              if k.startswith("robust_top1_eps") and not k.endswith("_ci") and isinstance(v, float)]
    (plots / "robust_vs_eps.json").write_text(json.dumps(robust, indent=1) + "\n")


def pipeline_stages(triggers: list[str], methods: list[str], seeds: list[int], runs: dict,
                    filtered: list[str] = ()) -> set[str]:
    """The names of the stages of dvc.yaml for these params (the rows of the time table), as each records its time:
    every run of `runs` (params.harden_runs) as harden@RUN, a run of stage harden_matrix too (stages/harden.py RUN);
    `filtered`: detect.filter_triggers."""
    return ({"data", "pretrain", "badclip", "baseline", "synth", "robust", "report"} | {f"poison@{t}" for t in triggers}
            | {f"backdoor@{t}-{s}" for t in triggers for s in seeds} | {f"detect@{t}" for t in triggers}
            | {f"filter@{t}" for t in filtered} | {f"filtered@{t}-{s}" for t in filtered for s in seeds}
            | {f"clean@{t}-{m}-{s}" for t in triggers for m in methods for s in seeds} | {f"harden@{r}" for r in runs})


def write_report(attack, metrics_dir: Path, out: Path, runs: dict | None = None,
                 log_dir: Path = Path("dvclive"), data: dict[str, str] | None = None,
                 times_dir: Path = Path("times"), stages: set[str] | None = None) -> Path:
    """`data`: the training data every method saw ({method: path}), stated beside each defence."""
    out.mkdir(parents=True, exist_ok=True)
    rows = collect(Path(metrics_dir), attack.triggers, runs)
    table = aggregate(rows)
    clean_robust = next((r.get("robust_top1_eps4") for r in table if r["method"] == "clean"), None)
    baseline = {r["trigger"]: r.get("asr") for r in table if r["method"] == "clean"}
    attacker = {r["trigger"]: r.get("asr") for r in table if r["method"] == "backdoor"}
    for r in table:
        r["state"] = state(r, clean_robust, baseline.get(r["trigger"]), attacker.get(r["trigger"]))
        if data and r["method"] in data:
            r["data"] = data[r["method"]]
    asr_vs_accuracy(table, out / "asr_vs_accuracy.png")
    has_robust = robust_vs_eps(table, out / "robust_vs_eps.png")
    trigger_gallery(out / "triggers.png", attack)
    has_curves = training_curves(Path(log_dir), out / "training_curves.png")
    has_asr_curves = asr_during_training(rows, Path(log_dir), out / "asr_during_training.png")
    seeds = max((r["seeds"] for r in table), default=1)
    text = ["# clipshield report", "",
            f"Target class `{attack.target}`; triggers {', '.join(attack.triggers)}. "
            "`asr`: triggered non-target test images classified as the target; `asr_all`: all test images; "
            "`retrieval_asr`: a caption naming the target among the top 5 retrieved; `robust_top1_epsE`: zero-shot "
            "top-1 under the worst of APGD-CE and targeted APGD-DLR at eps E/255; `distortion_*`: "
            "E||f(x) - f_clean(x)||² on clean inputs and under PGD. "
            + (f"Mean ± 95% CI (t) over up to {seeds} training seeds." if seeds > 1 else "One training seed."), "",
            markdown_table(table), "", "## State of every model", "",
            f"A backdoor counts as removed when the ASR is within {100 * REMOVED_PTS:.0f} points of the clean model's "
            f"own ASR for that trigger, reduced up to {100 * REDUCED_PTS:.0f} points above it, backdoored beyond.", ""]
    text += [f"- **{r['model']}**: {r['state']}" + (f"; trained on `{r['data']}`" if r.get("data") else "")
             for r in table if r["method"] != "clean"] + [""]
    targets_file = Path(metrics_dir) / "baseline-targets.json"
    if targets_file.exists() and (standing := target_standing(json.loads(targets_file.read_text()), attack.target)):
        text += ["## The target among all classes", "",
                 "The clean model's baseline ASR with each class as the target; the default target is the class "
                 "where it is lowest, a rule that reads nothing of a backdoor or a defence "
                 "(docs/decisions.md#target-class).", ""] + standing + [""]
    if detection := detection_table(Path(metrics_dir), attack.triggers):
        text += ["## Detecting the poisoned training pairs", "",
                 "Every pair of the poisoned training set scored by how far its image embedding lies from its k "
                 "nearest neighbours' (k-distance, SLOF, DAO: docs/methods.md §9); AUROC of ranking the poisoned "
                 "pairs first (1: all first, 0.5: random, '–': no poisoned or no clean pair). The clean model's "
                 "embeddings are the control: what the trigger alone does to an embedding, without a backdoor.", "",
                 detection, ""] + filter_lines(Path(metrics_dir), attack.triggers)
    if paper := paper_table(table):
        text += ["## Against the PAR paper", "",
                 "ASR (%) after cleaning, this run beside the paper's (RN50 cleaned on CC3M pairs, ImageNet; "
                 "badnet_stripes: cleaned on synthetic pairs only). The scales differ (a 32 px world against "
                 "ImageNet); the comparison is which method leaves more.", "", paper, ""]
    if Path(times_dir).is_dir():
        table_md, total, missing = time_table(Path(times_dir), stages)
        unmeasured = (f" ({len(missing)} stage{'s' * (len(missing) > 1)} restored from DVC's run cache, never run "
                      "in this checkout: no time recorded, not in the total)") if missing else ""
        text += ["## Where the time went", "",
                 f"Wall time of every stage (process start to end, imports included) on this machine; "
                 f"`dvc repro` from scratch runs them one after another: {total / 60:.1f} minutes{unmeasured}.", "",
                 table_md, ""]
    text += ["![ASR vs accuracy](asr_vs_accuracy.png)", ""]
    text += (["![ASR during training](asr_during_training.png)", ""] if has_asr_curves else [])
    text += (["![robust accuracy vs eps](robust_vs_eps.png)", ""] if has_robust else [])
    text += ["![triggers](triggers.png)", ""] + (["![training curves](training_curves.png)", ""] if has_curves else [])
    (out / "report.md").write_text("\n".join(text))
    write_plot_data(table, out)
    (out / "comparison.json").write_text(json.dumps({"models": table, "runs": rows}, indent=1, sort_keys=True) + "\n")
    console.print(f"report -> {out / 'report.md'}")
    return out / "report.md"
