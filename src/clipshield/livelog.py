"""A training run's log as DVCLive writes it, for DVC: `dvclive/NAME/metrics.json` (the latest row and the final
summary: what `dvc exp show` and `dvc metrics show` read, also while `dvc exp run` is training),
`dvclive/NAME/plots/metrics/*.tsv` (one series per logged value: `dvc plots show`) and `dvclive/NAME/params.yaml`.
dvc.yaml declares these files for every training stage. The loop's own log (`dvclive/NAME.jsonl`) stays as it was:
it is the one a resumed run continues."""
from __future__ import annotations

from pathlib import Path

from .ui import console


class LiveLog:
    """Called with every row the training loop logs (a dict with `step`); `end(summary)` closes the run."""

    def __init__(self, folder: str | Path, params: dict):
        from dvclive import Live
        try:
            self.live = Live(str(folder), save_dvc_exp=False, dvcyaml=None, report=None)
        except Exception as e:  # e.g. a git repository without a commit: DVCLive cannot start there
            console.print(f"[yellow]DVCLive log {folder} not written ({type(e).__name__}: {e}); training goes on, "
                          f"logging to {folder}.jsonl[/yellow]")
            self.live = None
            return
        self.live.log_params(params)

    def __call__(self, row: dict) -> None:
        if self.live is None:
            return
        self.live.step = row["step"]
        for key, value in row.items():
            if key != "step":
                self.live.log_metric(key, value)
        self.live.next_step()

    def end(self, summary: dict) -> None:
        if self.live is None:
            return
        self.live.summary.update(summary)
        self.live.end()
        # dvc.yaml declares the series folder: a run of 0 steps (pretrained weights, evaluated only) leaves it empty
        (Path(self.live.plots_dir) / "metrics").mkdir(parents=True, exist_ok=True)
