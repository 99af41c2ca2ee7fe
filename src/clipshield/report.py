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
from .ui import console  # noqa: E402

METHOD_ORDER = ("backdoor", "finetune", "cleanclip", "par")


def collect(metrics_dir: Path, triggers: list[str]) -> list[dict]:
    """One row per model: clean, then per trigger the backdoored model and each cleaned one."""
    rows = []
    clean_file = metrics_dir / "clean.json"
    if clean_file.exists():
        m = json.loads(clean_file.read_text())
        for t in triggers:
            rows.append({"model": "clean", "trigger": t, "method": "clean", **m, "asr": m.get(f"asr_{t}"),
                         "asr_all": m.get(f"asr_all_{t}"), "retrieval_asr": m.get(f"retrieval_asr_{t}")})
        robust = metrics_dir / "robust-clean.json"
        if robust.exists():
            for r in rows:
                r.update(json.loads(robust.read_text()))
    for t in triggers:
        for method in METHOD_ORDER:
            f = metrics_dir / f"{method}-{t}.json"
            if f.exists():
                rows.append({"model": f"{method}-{t}", "trigger": t, "method": method, **json.loads(f.read_text())})
    for f in sorted(metrics_dir.glob("*.json")):  # robust fine-tunes: fare-<start>, tecoa-<start>, ...
        if f.stem.split("-")[0] in ("fare", "fare2", "tecoa"):
            m = json.loads(f.read_text())
            start = f.stem.split("-", 1)[1]
            trigger = next((t for t in triggers if start.endswith(t)), None)
            rows.append({"model": f.stem, "trigger": trigger or "-", "method": f.stem.split("-")[0], **m,
                         "asr": m.get("asr")})
    return rows


def markdown_table(rows: list[dict]) -> str:
    cols = ("model", "zeroshot_top1", "asr", "asr_all", "retrieval_asr", "i2t_r5", "t2i_r5",
            "robust_top1_eps2", "robust_top1_eps4", "distortion_clean", "distortion_adv")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    seen = set()
    for r in rows:
        key = r["model"] if r["method"] != "clean" else f"clean ({r['trigger']})"
        if key in seen:
            continue
        seen.add(key)
        cells = [key] + [f"{r[c]:.3f}" if isinstance(r.get(c), float) else "–" for c in cols[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def asr_vs_accuracy(rows: list[dict], out: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4.5))
    markers = {"clean": "*", "backdoor": "X", "finetune": "o", "cleanclip": "s", "par": "D", "fare": "P"}
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
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def trigger_gallery(out: Path, attack, n: int = 4) -> Path:
    """Rows: clean test images, then each trigger (at the configured strengths) applied to them."""
    out.parent.mkdir(parents=True, exist_ok=True)
    imgs = torch.stack([torch.from_numpy(render(BASE, 1, i, 32)[0]).permute(2, 0, 1).float() / 255 for i in range(n)])
    names = list(TRIGGERS)
    rows = [imgs] + [trigger_images(imgs, t, attack.options.get(t, {})) for t in names]
    fig, axes = plt.subplots(len(rows), n, figsize=(1.4 * n, 1.4 * len(rows)))
    for r, (label, batch) in enumerate(zip(["clean"] + names, rows)):
        for c in range(n):
            axes[r, c].imshow(batch[c].permute(1, 2, 0).numpy(), interpolation="nearest")
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
        axes[r, 0].set_ylabel(label, fontsize=7, rotation=0, ha="right", va="center")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    console.print(f"triggers: {', '.join(names)} -> {out}")
    return out


def training_curve(log: Path, out: Path) -> bool:
    """Loss and zero-shot accuracy vs step of a training log (JSON lines written by the loop)."""
    if not log.exists():
        return False
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], color="C0", label="CLIP loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    evals = [r for r in rows if "zeroshot_top1" in r]
    if evals:
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in evals], [100 * r["zeroshot_top1"] for r in evals], "o-", color="C3")
        ax2.set_ylabel("zero-shot top-1 (%, 500 test images)", color="C3")
    ax.set_title(f"training curve: {log.stem}")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return True


def write_report(attack, metrics_dir: Path, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    has_curve = training_curve(Path("dvclive/pretrain.jsonl"), out / "pretrain_curve.png")
    rows = collect(Path(metrics_dir), attack.triggers)
    asr_vs_accuracy(rows, out / "asr_vs_accuracy.png")
    trigger_gallery(out / "triggers.png", attack)
    text = ["# clipshield report", "",
            f"Target class `{attack.target}`; triggers {', '.join(attack.triggers)}. "
            "`asr`: triggered non-target test images classified as the target.", "",
            markdown_table(rows), "", "![ASR vs accuracy](asr_vs_accuracy.png)", "",
            "![triggers](triggers.png)", ""] + (["![pre-training](pretrain_curve.png)", ""] if has_curve else [])
    (out / "report.md").write_text("\n".join(text))
    (out / "comparison.json").write_text(json.dumps(rows, indent=1, sort_keys=True) + "\n")
    console.print(f"report -> {out / 'report.md'}")
    return out / "report.md"
