"""The report's rows, seed aggregation (mean ± 95% t-interval) and verdicts, on hand-made metrics."""
import json
import math

import pytest

from clipshield.report import (aggregate, asr_during_training, asr_series, backdoor_verdict, collect, markdown_table,
                               paper_table, pipeline_stages, state, target_standing, time_table)


@pytest.fixture
def metrics(tmp_path):
    def write(name, **m):
        (tmp_path / f"{name}.json").write_text(json.dumps(m))
    write("clean", zeroshot_top1=0.9)
    write("baseline", asr_blended=0.05, asr_all_blended=0.1, retrieval_asr_blended=0.02)  # the baseline stage
    write("robust-clean", robust_top1_eps4=0.1)
    for seed, asr in enumerate([0.1, 0.2, 0.3]):
        write(f"par-blended-s{seed}", zeroshot_top1=0.8, asr=asr)
    write("backdoor-blended-s0", zeroshot_top1=0.9, asr=0.95)
    write("fare-par-blended-s0", zeroshot_top1=0.75, asr=0.02, robust_top1_eps4=0.5)
    write("par-blended_stripes-s0", zeroshot_top1=0.1, asr=0.9)  # another trigger: not a `blended` row
    return tmp_path


def test_rows_and_mean_with_t_interval_by_hand(metrics):
    runs = {"fare-par-blended-s0": {"method": "fare", "start": "par-blended-s0"}}
    rows = collect(metrics, ["blended"], runs)
    assert [r["model"] for r in rows] == ["clean", "backdoor-blended-s0", "par-blended-s0", "par-blended-s1",
                                          "par-blended-s2", "fare-par-blended-s0"]
    table = {r["model"]: r for r in aggregate(rows)}
    par = table["par-blended"]
    assert par["seeds"] == 3 and par["asr"] == pytest.approx(0.2)
    # sd of (0.1, 0.2, 0.3) is 0.1; t_{0.975,2} = 4.303
    assert par["asr_ci"] == pytest.approx(4.303 * 0.1 / math.sqrt(3))
    assert "zeroshot_top1_ci" in par and par["zeroshot_top1_ci"] == pytest.approx(0.0)
    assert "asr_ci" not in table["backdoor-blended"]
    assert table["clean (blended)"]["asr"] == 0.05 and table["clean (blended)"]["robust_top1_eps4"] == 0.1
    assert table["fare-par-blended"]["trigger"] == "blended"
    md = markdown_table(list(table.values()))
    assert "| par-blended | 3 | 0.800 ± 0.000 | 0.200 ± 0.248 |" in md


def test_verdicts_judge_against_the_clean_models_baseline():
    # removed: within 5 points of the clean model's ASR for the trigger; reduced: up to 20 above; else backdoored
    assert backdoor_verdict(0.08, 0.04) == "backdoor removed (ASR 8.0%, clean model 4.0%)"
    assert backdoor_verdict(0.10, 0.04, 0.99) == "backdoor reduced (ASR 10.0%, clean model 4.0%, backdoored model 99.0%)"
    assert backdoor_verdict(0.47, 0.034, 0.99).startswith("backdoored (ASR 47.0%")  # not "mostly removed"
    assert backdoor_verdict(0.25, 0.10).startswith("backdoor reduced")  # a high baseline moves the bar
    assert state({"method": "backdoor", "asr": 0.95}, 0.1, 0.05, 0.95) == "backdoored (ASR 95.0%, clean model 5.0%)"
    assert state({"method": "fare", "asr": 0.02, "robust_top1_eps4": 0.55}, 0.1, 0.03, 0.9) == \
        "backdoor removed (ASR 2.0%, clean model 3.0%, backdoored model 90.0%), robust (+45 pts at 4/255)"
    assert state({"method": "fare", "robust_top1_eps4": 0.15}, 0.1) == "not robust"


def test_time_table_in_pipeline_order_with_total(tmp_path):
    for stage, seconds in [("report", 5), ("clean@blended-par-0", 100), ("data", 30), ("pretrain", 200),
                           ("harden@fare-clean", 120), ("harden@tecoa-clean", 99)]:
        (tmp_path / f"{stage}.json").write_text(json.dumps({"stage": stage, "seconds": seconds}))
    stages = pipeline_stages(["blended"], ["par"], [0], {"fare-clean": {}}, filtered=["blended"])
    assert not {"filter@blended", "filtered@blended-0"} & pipeline_stages(["blended"], ["par"], [0], {})
    md, total, missing = time_table(tmp_path, stages)
    assert total == 455  # tecoa-clean is not a stage of this pipeline (an older run's record)
    # never ran here (restored from DVC's run cache): a dash, out of the total
    assert missing == ["backdoor@blended-0", "badclip", "baseline", "detect@blended", "filter@blended", "filtered@blended-0",
                       "poison@blended", "robust", "synth"]
    lines = md.splitlines()
    assert [line.split(" | ")[0].lstrip("| ") for line in lines[2:]] == [
        "data", "pretrain", "badclip", "baseline", "poison@blended", "backdoor@blended-0", "detect@blended", "filter@blended",
        "filtered@blended-0", "synth", "clean@blended-par-0",
        "robust", "harden@fare-clean", "report", "**total**"]
    assert "| baseline | – | – |" in lines
    assert lines[-1] == "| **total** | **455** | **7.6** |"


def test_a_robust_run_belongs_to_its_start_models_trigger_not_a_prefix_of_it(metrics):
    runs = {"fare-par-blended_stripes-s0": {"method": "fare", "start": "par-blended_stripes-s0"},
            "fare-backdoor-blended-s0": {"method": "fare", "start": "backdoor-blended-s0"},
            "fare-clean": {"method": "fare", "start": "clean"}}
    for run in runs:
        (metrics / f"{run}.json").write_text(json.dumps({"zeroshot_top1": 0.8}))
    rows = {r["model"]: r for r in collect(metrics, ["blended", "blended_stripes"], runs)}
    assert rows["fare-par-blended_stripes-s0"]["trigger"] == "blended_stripes"
    assert rows["fare-backdoor-blended-s0"]["trigger"] == "blended"
    assert rows["fare-clean"]["trigger"] == "-"


def test_the_table_has_a_robust_column_for_every_radius_scored(metrics):
    (metrics / "fare-clean.json").write_text(json.dumps({"zeroshot_top1": 0.8, "robust_top1_eps1_5": 0.7,
                                                         "robust_top1_eps4": 0.5}))
    rows = aggregate(collect(metrics, ["blended"], {"fare-clean": {"method": "fare", "start": "clean"}}))
    header = markdown_table(rows).splitlines()[0]
    assert "robust_top1_eps1_5 | robust_top1_eps4 | distortion_clean" in header and "eps2" not in header


def test_paper_table_puts_this_runs_asr_beside_the_papers(metrics):
    (metrics / "cleanclip-blended-s0.json").write_text(json.dumps({"zeroshot_top1": 0.85, "asr": 0.4}))
    table = aggregate(collect(metrics, ["blended"], {}))
    md = paper_table(table)
    # PAR over three seeds: 20.0 ± 24.8 (as the main table); the paper (RN50): PAR 0.0, CleanCLIP 19.5
    assert md.splitlines()[2] == "| blended | 20.0 ± 24.8 | 40.0 | 0 | 19.5 |"
    assert len(md.splitlines()) == 3  # no other trigger was run
    assert paper_table([r for r in table if r["trigger"] != "blended"]) == ""


def test_asr_during_training_reads_every_run_that_logged_it(metrics, tmp_path):
    logs = tmp_path / "dvclive"
    for run, values in {"par-blended-s0": [0.95, 0.3, 0.04], "par-blended-s1": [0.9, 0.5, 0.1],
                        "fare-par-blended-s0": [0.04, 0.02, 0.01]}.items():
        (logs / run / "plots" / "metrics").mkdir(parents=True)
        (logs / run / "plots" / "metrics" / "asr.tsv").write_text(
            "step\tasr\n" + "".join(f"{100 * i}\t{v}\n" for i, v in enumerate(values)))
    rows = collect(metrics, ["blended"], {"fare-par-blended-s0": {"method": "fare", "start": "par-blended-s0"}})
    panels = asr_series(rows, logs)
    assert list(panels) == ["blended"]  # backdoor-blended-s0 logged nothing; the clean model is the dashed line
    assert [name for name, _ in panels["blended"]] == ["par", "par", "fare-par"]
    assert panels["blended"][0][1] == [(0.0, 0.95), (100.0, 0.3), (200.0, 0.04)]
    assert asr_during_training(rows, logs, tmp_path / "asr.png") and (tmp_path / "asr.png").stat().st_size > 5000
    assert not asr_during_training(rows, tmp_path / "nowhere", tmp_path / "none.png")


def test_a_registered_cleaning_method_gets_its_rows_in_registration_order(metrics, monkeypatch):
    from clipshield import objectives
    monkeypatch.setitem(objectives.METHODS, "toy", objectives.Method("toy", objectives.ClipObjective, "clean"))
    (metrics / "toy-blended-s0.json").write_text(json.dumps({"zeroshot_top1": 0.7, "asr": 0.5}))
    (metrics / "finetune-blended-s0.json").write_text(json.dumps({"zeroshot_top1": 0.85, "asr": 0.6}))
    rows = collect(metrics, ["blended"])
    assert [r["model"] for r in rows] == ["clean", "backdoor-blended-s0", "finetune-blended-s0", "par-blended-s0",
                                          "par-blended-s1", "par-blended-s2", "toy-blended-s0"]
    assert rows[-1]["method"] == "toy"


def test_target_standing_ranks_the_target_among_every_class():
    per = {"square": 0.026, "heart": 0.020, "star": 0.09, "full": float("nan")}
    line, = target_standing({"blended": per}, "square")
    # three classes have a baseline (heart 2.0%, square 2.6%, star 9.0%): square is second lowest; nan is left out
    assert "2.6%" in line and "rank 2 of 3" in line and "lowest `heart` 2.0%" in line and "highest `star` 9.0%" in line
    assert target_standing({"blended": per}, "circle") == []
