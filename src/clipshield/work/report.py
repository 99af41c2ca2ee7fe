"""Stage `report`: reports/ from every model's metrics, the training logs and the stages' wall times."""
from __future__ import annotations

import shutil
from pathlib import Path

from ..objectives import methods
from ..params import AttackParams, CleanParams, DetectParams, HardenParams, harden_runs, load_section, read_yaml
from ..report import pipeline_stages, write_report


def report(params: str | Path, metrics_dir: str | Path, out: str | Path, log_dir: str | Path = "dvclive",
           times_dir: str | Path = "times") -> Path:
    """Write `out` (reports/): the comparison table, the plots and the trigger gallery, for the models that
    `params` makes."""
    attack, harden = load_section(AttackParams, "attack", params), load_section(HardenParams, "harden", params)
    cleaning = load_section(CleanParams, "clean", params)
    raw = read_yaml(params)
    seeds, runs = raw.get("seeds") or [0], harden_runs(raw)
    data = {m: cleaning.data for m in cleaning.methods} | {m: harden.data for m in methods("harden")}
    Path(out).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(params, Path(out) / "params.yaml")  # the params these results come from, beside them
    return write_report(attack, Path(metrics_dir), Path(out), runs, log_dir=Path(log_dir), data=data,
                        times_dir=Path(times_dir),
                        stages=pipeline_stages(attack.triggers, cleaning.methods, seeds, runs,
                                               load_section(DetectParams, "detect", params).filter_triggers))
