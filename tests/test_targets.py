"""The target panel from `dvc.api.exp_show()` rows: the mean over seeds per target, the spread over targets, only
the experiments that differ from the commit in the target alone."""
import json

import pytest

from clipshield.targets import panel, per_target, spread, write

T = "blended_stripes"
METHODS = ["finetune", "par"]


def metrics(model: str, asr: float, top1: float = 0.9, i2t: float = 0.8, t2i: float = 0.7) -> dict:
    return {f"metrics/{model}.json:{k}": v for k, v in
            (("asr", asr), ("zeroshot_top1", top1), ("i2t_r5", i2t), ("t2i_r5", t2i))}


def experiment(name, target, par_asr=(0.1,), eps=2.15, state=None, rev="abc"):
    """A row as dvc.api.exp_show gives it (DVC 3.67): params without their file, a metric key that one file alone
    holds without its path, State None for a finished experiment and for commits."""
    row = {"rev": rev, "Experiment": name, "State": state, "attack.target": target, "par.eps": eps,
           "asr_blended_stripes": 0.02,
           **metrics("clean", asr=0.5, top1=0.96)}
    for seed, asr in enumerate(par_asr):
        row |= metrics(f"backdoor-{T}-s{seed}", 0.99, top1=0.99)
        row |= metrics(f"finetune-{T}-s{seed}", 0.6, top1=0.66)
        row |= metrics(f"par-{T}-s{seed}", asr, top1=0.95, i2t=0.7)
    return row


def test_each_target_is_the_mean_over_its_seeds_and_the_clean_asr_is_its_baseline():
    rows = [experiment(None, "heart", rev="workspace"),             # its metrics may be older than its params
            experiment(None, "circle", rev="main"),
            experiment("target-square", "square", par_asr=(0.1, 0.3)),
            experiment("target-star", "star", eps=1.0),           # another par.eps: not this panel's
            experiment("target-heart", "heart", state="Running"),  # not finished
            {**experiment("target-ring", "ring"), "metrics/par-blended_stripes-s0.json:asr": "!"}]  # failed metric
    summary = per_target(rows, T, METHODS, others=("attack.target", "par.eps"))
    assert list(summary) == ["circle", "square"]
    assert summary["square"]["par"]["asr"] == pytest.approx(0.2) and summary["square"]["par"]["seeds"] == 2
    assert summary["circle"]["clean"] == {"zeroshot_top1": 0.96, "i2t_r5": 0.8, "t2i_r5": 0.7, "asr": 0.02}
    assert summary["square"]["experiment"] == "target-square" and summary["circle"]["experiment"] == "main"


def test_the_spread_over_targets_by_hand():
    s = spread([0.9, 0.1, 0.4, 0.2])
    assert (s["n"], s["median"], s["min"], s["max"], s["mean"]) == (4, pytest.approx(0.3), 0.1, 0.9,
                                                                     pytest.approx(0.4))
    sd = ((0.3 ** 2 + 0.2 ** 2 + 0.0 + 0.5 ** 2) / 3) ** 0.5
    assert s["ci95"] == pytest.approx(3.182 * sd / 2)
    assert spread([0.5])["ci95"] is None and spread([0.5])["median"] == 0.5


def test_costs_are_the_backdoored_model_minus_the_cleaned_one(tmp_path):
    rows = [experiment(f"target-{t}", t, par_asr=(a,)) for t, a in (("circle", 0.02), ("square", 0.3),
                                                                      ("star", 0.04))]
    summary = per_target(rows, T, METHODS, others=("attack.target", "par.eps"))
    stats = panel(summary, METHODS)
    assert stats["par"]["top1_cost"]["median"] == pytest.approx(0.99 - 0.95)
    assert stats["par"]["i2t_r5_cost"]["median"] == pytest.approx(0.8 - 0.7)
    assert stats["par"]["asr"]["median"] == pytest.approx(0.04)
    md = write(summary, METHODS, T, tmp_path, default_target="circle")
    text = md.read_text()
    assert "PAR leaves ≤ 5% on 2 of 3" in text and "fine-tuned leaves ≤ 5% on 0 of 3" in text
    assert "| median | 33.0 | 0.0 | 4.0 | 10.0 |" in text  # top-1 0.99 - 0.66 and 0.99 - 0.95; R@5 0.8 - 0.7
    assert "The default target, circle, ranks 1 of 3 by what PAR leaves" in text
    assert "| **circle** (default) | 2.0 | 99.0 | 60.0 | 2.0 |" in text
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert set(saved["star"]) == {"clean", "backdoor", "finetune", "par", "experiment"}
    assert set(saved["star"]["par"]) == {"asr", "zeroshot_top1", "i2t_r5", "t2i_r5", "seeds"}
    assert (tmp_path / "residual_asr.png").stat().st_size > 0
    assert json.loads((tmp_path / "panel.json").read_text())["par"]["asr"]["max"] == 0.3


def test_one_target_is_no_panel(tmp_path):
    summary = per_target([experiment("target-circle", "circle")], T, METHODS)
    with pytest.raises(ValueError, match="needs two targets or more.*found circle.*clipshield targets run"):
        write(summary, METHODS, T, tmp_path)
