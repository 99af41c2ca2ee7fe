"""A sweep: the experiments of one parameter (`dvc exp run [--queue] -S PARAM=V`) as one table and one plot.

DVC keeps each experiment's params and metrics; `dvc.api.exp_show()` lists them as flat rows whose columns are
named `PARAM` or `FILE:KEY` (with the file's path wherever two files share a key, as every model's metrics do).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from .report import save_figure

KEYS = ("zeroshot_top1", "asr", "i2t_r5", "t2i_r5")
MANY_MODELS = 3  # from this many models on, the table has a row per model and the plot's legend stands beside it


def cell(row: dict, *names: str) -> float | None:
    """The first of `names` that `row` holds as a finite number; None for a missing or failed value ('-', '!')."""
    for name in names:
        v = row.get(name)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            return float(v)
    return None


def expand_models(experiments: list[dict], patterns: list[str]) -> list[str]:
    """`patterns` with shell wildcards (`backdoor-*-s0`) replaced by the model names that the experiments' metric
    columns (`metrics/<model>.json:<key>`) hold, sorted; a name without wildcards is kept as it is."""
    import fnmatch
    import re
    found = {m.group(1) for e in experiments for k in e if (m := re.match(r"metrics/(.+)\.json:", str(k)))}
    models = []
    for pattern in patterns:
        names = sorted(fnmatch.filter(found, pattern)) if any(c in pattern for c in "*?[") else [pattern]
        models += [n for n in names if n not in models]
    return models


def param_names(params: dict, prefix: str = "") -> list[str]:
    """The dotted names of a params file's values, as exp_show names its columns: {'par': {'eps': 2}} -> ['par.eps']."""
    names = []
    for k, v in params.items():
        names += param_names(v, f"{prefix}{k}.") if isinstance(v, dict) and v else [f"{prefix}{k}"]
    return names


def sweep_rows(experiments: list[dict], param: str, models: list[str], keys: tuple[str, ...] = KEYS,
               others: tuple[str, ...] = ()) -> list[dict]:
    """One row per experiment that has a value of `param` and every metric: its name, the value, and
    `<model>.<key>` for each model (metrics/<model>.json) and key. Sorted by the value; an experiment that repeats
    another's value and metrics (the workspace beside its own commit) is listed once. Where experiments differ in
    another parameter of `others` too (a `-S attack.target=heart` run beside a par.eps sweep), only the group that
    agrees on all of them and spans the most values of `param` is kept (on a tie, the one with more queued or run
    experiments than commits): the others' models are not the sweep's."""
    revs = {str(e.get("rev")) for e in experiments if e.get("Experiment") is None}  # commits and the workspace

    def reach(group: list[dict]) -> tuple[int, int, int]:
        rows = rows_of(group, param, models, keys)
        return len({r[param] for r in rows}), len(rows), sum(r["experiment"] not in revs for r in rows)
    return rows_of(consistent_group(experiments, param, others, reach), param, models, keys)


def consistent_group(experiments: list[dict], param: str, others: tuple[str, ...], key) -> list[dict]:
    """Of the experiments grouped by their values of `others` (bar `param`), the group with the highest `key`."""
    groups: dict[str, list[dict]] = {}
    for e in experiments:
        groups.setdefault(repr([e.get(f"params.yaml:{n}", e.get(n)) for n in others if n != param]), []).append(e)
    return max(groups.values(), key=key, default=[])


def rows_of(experiments: list[dict], param: str, models: list[str], keys: tuple[str, ...]) -> list[dict]:
    rows, seen = [], set()
    # The workspace last: when it repeats a commit's or an experiment's results, the row keeps that name.
    for e in sorted(experiments, key=lambda e: e.get("rev") == "workspace"):
        value = cell(e, f"params.yaml:{param}", param)
        if value is None or e.get("State") in ("Queued", "Running", "Failed"):
            continue  # not finished: a running one shows its parent's metrics for the stages still to run
        row = {"experiment": str(e.get("Experiment") or e.get("rev")), param: value}
        for model in models:
            for key in keys:
                row[f"{model}.{key}"] = cell(e, f"metrics/{model}.json:{key}")
        if any(v is None for v in row.values()):
            continue  # a model this experiment has no metrics of
        signature = tuple(v for k, v in row.items() if k != "experiment")
        if signature in seen:
            continue
        seen.add(signature)
        rows.append(row)
    return sorted(rows, key=lambda r: (r[param], r["experiment"]))


def markdown(rows: list[dict], param: str, models: list[str], keys: tuple[str, ...] = KEYS) -> str:
    """A row per experiment and a column per model and key; from three models on (six backdoors x two keys would
    not fit one row), a table per key with a row per model and a column per experiment."""
    if len(models) < MANY_MODELS:
        head = ["experiment", param] + [f"{m} {k}" for m in models for k in keys]
        body = [[r["experiment"], f"{r[param]:g}"] + [f"{r[f'{m}.{k}']:.3f}" for m in models for k in keys]
                for r in rows]
        return table(head, body)
    head = ["model"] + [f"{param}={r[param]:g} ({r['experiment']})" for r in rows]
    return "\n".join(f"{k}:\n\n" + table(head, [[m] + [f"{r[f'{m}.{k}']:.3f}" for r in rows] for m in models])
                     for k in keys)


def table(head: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines) + "\n"


PLOTTED = {"asr": ("o-", "ASR"), "zeroshot_top1": ("s--", "clean top-1")}


def plot(rows: list[dict], param: str, models: list[str], out: Path, keys: tuple[str, ...] = KEYS) -> None:
    """ASR (solid) and clean top-1 (dashed) of every model against the value, where `keys` has them."""
    import matplotlib.pyplot as plt
    many = len(models) >= MANY_MODELS
    fig, ax = plt.subplots(figsize=(9 if many else 6, 4))
    x = [r[param] for r in rows]
    for i, m in enumerate(models):
        for key in (k for k in PLOTTED if k in keys):
            style, label = PLOTTED[key]
            ax.plot(x, [r[f"{m}.{key}"] for r in rows], style, color=f"C{i}", label=f"{m}: {label}")
    if min(x) > 0 and max(x) / min(x) >= 8:  # e.g. poison rates 0.25% .. 2%: equal steps per doubling
        ax.set_xscale("log", base=2)
        ax.set_xticks(x, [f"{v:g}" for v in x])
    ax.set_xlabel(param)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, **({"loc": "center left", "bbox_to_anchor": (1.01, 0.5)} if many else {}))
    ax.set_title(f"sweep of {param} ({len(rows)} experiments)")
    save_figure(fig, out, dpi=120)


def write_sweep(experiments: list[dict], param: str, models: list[str], out_dir: Path,
                keys: tuple[str, ...] = KEYS, others: tuple[str, ...] = ()) -> tuple[list[dict], Path]:
    """<out_dir>/<param>.{md,json,png} from `dvc.api.exp_show()`'s rows (of experiments that differ in `others`
    too, one group: `sweep_rows`). Needs two measured values."""
    patterns, models = models, expand_models(experiments, models)
    if not models:
        raise ValueError(f"no experiment has metrics of a model named {', '.join(patterns)}; `dvc exp show` lists "
                         f"the metric files (metrics/<model>.json)")
    rows = sweep_rows(experiments, param, models, keys, others)
    values = {r[param] for r in rows}
    if len(values) < 2:
        found = ", ".join(f"{r['experiment']} ({param}={r[param]:g})" for r in rows) or "none"
        raise ValueError(f"a sweep of {param} needs experiments at two values or more with metrics of "
                         f"{', '.join(models)}; found: {found}. Run e.g. `dvc exp run --queue -S {param}=...` "
                         f"for each value, then `dvc queue start` (or `dvc exp run -S {param}=...`); experiments run from "
                         f"an earlier commit than HEAD are collected with `clipshield sweep --commits N`")
    out_dir.mkdir(parents=True, exist_ok=True)
    base = out_dir / param
    Path(f"{base}.md").write_text(markdown(rows, param, models, keys))
    Path(f"{base}.json").write_text(json.dumps(rows, indent=1) + "\n")
    plot(rows, param, models, Path(f"{base}.png"), keys)
    return rows, Path(f"{base}.md")
