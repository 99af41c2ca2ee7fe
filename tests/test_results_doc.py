"""docs/results.md and README.md's headline table (`clipshield docs`): the committed page is what the command writes
now, results/ holds only what it cites, and the generator on small hand-made projects."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from clipshield import results_doc as R
from clipshield.cli import app
from clipshield.stage import machine, record_time

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()

REPORT = """# clipshield report

Target class `square`; triggers blended. One training seed.

| model | seeds | zeroshot_top1 | asr |
|---|---|---|---|
| clean (blended) | 1 | 0.950 | 0.030 |
| par-blended | 1 | 0.930 | 0.050 |

## State of every model

- **par-blended**: backdoor removed

## Detecting the poisoned training pairs

AUROC of ranking the poisoned pairs first.

| trigger | embeddings of | k-distance AUROC |
|---|---|---|
| blended | backdoored model | 0.603 |

## Against the PAR paper

ASR (%) after cleaning, this run beside the paper's.

| trigger | PAR | CleanCLIP | paper: PAR | paper: CleanCLIP |
|---|---|---|---|---|
| blended | 5.0 | – | 0 | 19.5 |

## Where the time went

| stage | seconds | minutes |
|---|---|---|
| data | 60 | 1.0 |
| clean@blended-par-0 | 90 | 1.5 |
| clean@blended-finetune-0 | 30 | 0.5 |
| **total** | **180** | **3.0** |

![ASR vs accuracy](asr_vs_accuracy.png)
"""
COMPARISON = {"models": [
    {"model": "clean (blended)", "method": "clean", "trigger": "blended", "asr": 0.03, "zeroshot_top1": 0.95,
     "i2t_r5": 0.88, "robust_top1_eps4": 0.2},
    {"model": "clean (wanet)", "method": "clean", "trigger": "wanet", "asr": 0.01, "zeroshot_top1": 0.95},
    {"model": "fare-par-blended", "method": "fare", "trigger": "blended", "start": "par-blended-s0", "asr": 0.0104,
     "zeroshot_top1": 0.9, "i2t_r5": 0.7, "robust_top1_eps4": 0.61},
    {"model": "backdoor-blended", "method": "backdoor", "trigger": "blended", "asr": 0.98, "zeroshot_top1": 0.99,
     "i2t_r5": 0.9},
    {"model": "par-blended", "method": "par", "trigger": "blended", "asr": 0.05, "asr_ci": 0.0123,
     "zeroshot_top1": 0.93, "i2t_r5": 0.76},
    {"model": "fare-clean", "method": "fare", "trigger": "-", "start": "clean", "zeroshot_top1": 0.89,
     "i2t_r5": 0.82, "robust_top1_eps4": 0.62}]}
PARAMS = {"seeds": [0], "attack": {"triggers": ["blended"], "target": "square"}, "poison": {"rate": 0.01},
          "clean": {"methods": ["finetune", "par"], "steps": 500, "data": "data/synth"},
          "harden": {"runs": {"fare-par-blended-s0": {"method": "fare", "start": "par-blended-s0"}}},
          "robust": {"eps": [4.0]}}
TIMES = {"data": 60, "clean@blended-par-0": 90, "clean@blended-finetune-0": 30}
EPYC = "AMD EPYC (2 cores, AVX-512)"


def make_run(root: Path, report: Path = Path("reports"), metrics: Path = Path("metrics"), times: Path = Path("times"),
             params: Path = Path("reports/params.yaml"), cpu: dict | None = None) -> None:
    """A finished run: report.md and its figure, comparison.json, params, one metrics file, one record per stage
    (with `cpu`'s keys) and a record of a stage no longer in the pipeline (not in report.md's time table)."""
    for folder in (report, metrics, times):
        (root / folder).mkdir(parents=True, exist_ok=True)
    (root / report / "report.md").write_text(REPORT)
    (root / report / "asr_vs_accuracy.png").write_bytes(b"png")
    (root / report / "comparison.json").write_text(json.dumps(COMPARISON))
    (root / params).write_text(yaml.safe_dump(PARAMS))
    (root / metrics / "clean.json").write_text("{}")
    for stage, seconds in {**TIMES, "harden@tecoa-clean": 600}.items():
        (root / times / f"{stage}.json").write_text(json.dumps({"stage": stage, "seconds": seconds, **(cpu or {})}))


def machine_json(path: Path, cpu: str = EPYC) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"cpu": cpu}))


# The repository itself

def test_committed_results_page_is_what_clipshield_docs_writes():
    assert (REPO / R.RESULTS_MD).read_text() == R.results_markdown(REPO), \
        "docs/results.md differs from what the runs give: run `clipshield docs` and commit it"


def test_readme_headline_block_is_what_clipshield_docs_writes():
    readme = (REPO / "README.md").read_text()
    if R.BEGIN not in readme or R.END not in readme:
        pytest.skip(f"README.md has no `{R.BEGIN}` / `{R.END}` lines yet: nothing to keep current")
    assert R.replace_headline(readme, R.headline(REPO)) == readme, \
        "README.md's headline differs from the default run's: run `clipshield docs` and commit it"


def test_results_holds_only_what_the_results_page_cites():
    targets = {(REPO / "docs" / t).resolve() for t in re.findall(r"\]\(([^)#]+)\)",
                                                                   (REPO / R.RESULTS_MD).read_text())}
    files = [f.resolve() for f in (REPO / "results").rglob("*") if f.is_file()]
    uncited = [f.relative_to(REPO).as_posix() for f in files if not targets & {f, *f.parents}]
    assert files and not uncited


def test_committed_params_copies_speak_of_no_sessions():
    for params in (REPO / "results").glob("*/params.yaml"):
        assert not re.search(r"sessions? \d", params.read_text(), flags=re.I), params


# The generator on hand-made projects

def test_a_run_section_reuses_the_reports_tables_and_links_its_files(tmp_path):
    make_run(tmp_path)
    machine_json(tmp_path / R.DEFAULT_MACHINE)
    text = R.results_markdown(tmp_path)
    assert text.startswith(R.GENERATED + "\n")
    main_table = REPORT.split("\n\n")[2]
    paper_table = REPORT.split("## Against the PAR paper\n\n")[1].split("\n\n")[1]
    detection_table = REPORT.split("## Detecting the poisoned training pairs\n\n")[1].split("\n\n")[1]
    assert main_table in text and paper_table in text
    detection = "### Detecting the poisoned training pairs\n\nAUROC of ranking the poisoned pairs first.\n\n"
    assert detection + detection_table in text
    assert "backdoor removed" not in text  # the state of every model stays in report.md
    assert "| triggers | blended |" in text and "| poison rate | 0.01 |" in text
    assert "| hardening | fare from par: 1 runs |" in text
    # the report's stages only (tecoa-clean is an older pipeline's record): 180 s, clean first (most time)
    assert "| wall time | 3.0 minutes of stages, one after another |" in text
    assert "| clean | 2 | 2.0 |\n| data | 1 | 1.0 |\n| **total** | **3** | **3.0** |" in text
    assert f"| CPU | {EPYC} ([machine.json](../results/default/machine.json)) |" in text
    assert "- [ASR vs accuracy](../reports/asr_vs_accuracy.png)" in text
    assert "[metrics/](../metrics)" in text and "[times/](../times)" in text
    assert R.results_markdown(tmp_path) == text  # nothing in it changes between two calls


def test_cpu_comes_from_the_stage_records_before_machine_json(tmp_path):
    make_run(tmp_path)
    machine_json(tmp_path / R.DEFAULT_MACHINE, "Some Other CPU (64 cores, no AVX-512)")
    for stage in TIMES:  # what every stage writes now: its time and the CPU it ran on
        record_time(stage, tmp_path / "times")
    text = R.results_markdown(tmp_path)
    assert f"| CPU | {R.cpu_label(machine())} ([times/](../times)) |" in text
    assert "Some Other CPU" not in text


def test_stages_on_several_cpus_name_each_with_its_stage_count(tmp_path):
    make_run(tmp_path, cpu={"cpu": "AMD EPYC", "cores": 2, "avx512": True})
    (tmp_path / "times/data.json").write_text(json.dumps({"stage": "data", "seconds": 60, "cpu": "Intel Xeon",
                                                          "cores": 8, "avx512": False}))
    assert ("| CPU | AMD EPYC (2 cores, AVX-512): 2 stages; Intel Xeon (8 cores, no AVX-512): 1 stage "
            "([times/](../times)) |") in R.results_markdown(tmp_path)


def test_a_run_without_any_cpu_says_which_file_to_write(tmp_path):
    make_run(tmp_path)
    with pytest.raises(ValueError, match=r"times/: no stage record names its CPU .*write results/default/machine.json"):
        R.results_markdown(tmp_path)


def test_a_missing_metrics_folder_is_a_clear_error(tmp_path):
    make_run(tmp_path, report=Path("results/full"), metrics=Path("results/full/elsewhere"),
             times=Path("results/full/times"), params=Path("results/full/params.yaml"))
    make_run(tmp_path)
    machine_json(tmp_path / R.DEFAULT_MACHINE)
    machine_json(tmp_path / "results/full/machine.json")
    with pytest.raises(ValueError, match=r"^results/full/metrics: no such folder; a run needs .*metrics/"):
        R.results_markdown(tmp_path)


def test_profile_runs_and_sweeps_get_their_sections(tmp_path):
    make_run(tmp_path)
    full = Path("results/full")
    make_run(tmp_path, full, full / "metrics", full / "times", full / "params.yaml")
    for path in (R.DEFAULT_MACHINE, full / "machine.json", Path("results/sweeps/par.eps.machine.json")):
        machine_json(tmp_path / path)
    (tmp_path / "results/sweeps/par.eps.md").write_text("| experiment | par.eps |\n|---|---|\n| a | 1 |\n")
    text = R.results_markdown(tmp_path)
    assert "- [Profile `full`](#profile-full-resultsfull)" in text
    assert "## Profile `full` (results/full/)" in text
    assert "profile `full` (`clipshield profile full`): [params.yaml](../results/full/params.yaml)" in text
    assert "### `par.eps` (results/sweeps/)" in text and "| a | 1 |" in text
    assert "Detection scores" not in text  # no score plots kept: no links to them
    (tmp_path / full / "detect").mkdir()
    (tmp_path / full / "detect/wanet.png").write_bytes(b"png")
    assert ("- [Detection scores, poisoned against clean pairs: wanet](../results/full/detect/wanet.png)"
            in R.results_markdown(tmp_path))
    (tmp_path / "results/sweeps/par.eps.machine.json").unlink()
    with pytest.raises(ValueError, match=r"par.eps.md: the sweep's CPU is not recorded: write "
                                         r"results/sweeps/par.eps.machine.json"):
        R.results_markdown(tmp_path)


def test_the_target_panel_gets_its_section_with_its_cpu_and_files(tmp_path):
    assert R.targets_section(tmp_path) == []  # no panel run: no section
    folder = tmp_path / "results/targets"
    folder.mkdir(parents=True)
    (folder / "summary.md").write_text("| target | PAR ASR % |\n|---|---|\n| circle | 30.8 |\n")
    (folder / "summary.json").write_text("{}")
    with pytest.raises(ValueError, match="results/targets: the panel's CPU is not recorded: write "
                                         "results/targets/machine.json"):
        R.targets_section(tmp_path)
    machine_json(folder / "machine.json")
    text = "\n".join(R.targets_section(tmp_path))
    assert text.startswith("## Targets") and "| circle | 30.8 |" in text
    assert "[machine.json](../results/targets/machine.json)" in text
    assert "[results/targets/summary.json](../results/targets/summary.json)" in text and "panel.json" not in text


def test_headline_table_has_one_row_per_model_of_the_first_trigger():
    lines = R.headline_table(COMPARISON, "blended").splitlines()
    assert lines[0] == "| model | run | ASR | zero-shot top-1 | i2t R@5 | robust top-1 (4/255) |"
    assert lines[2:] == [
        "| clean | `clean (blended)` | 0.030 | 0.950 | 0.880 | 0.200 |",
        "| backdoored | `backdoor-blended` | 0.980 | 0.990 | 0.900 | – |",
        "| PAR | `par-blended` | 0.050 ± 0.012 | 0.930 | 0.760 | – |",
        "| FARE from PAR | `fare-par-blended` | 0.010 | 0.900 | 0.700 | 0.610 |",
        "| FARE from clean | `fare-clean` | – | 0.890 | 0.820 | 0.620 |"]
    no_robust = {"models": [{k: v for k, v in r.items() if k != "robust_top1_eps4"} for r in COMPARISON["models"]]}
    assert "robust" not in R.headline_table(no_robust, "blended")
    with pytest.raises(ValueError, match="no model for trigger badnet"):
        R.headline_table(COMPARISON, "badnet")


def test_replace_headline_keeps_the_rest_and_is_idempotent():
    readme = f"# clipshield\n\nintro\n{R.BEGIN}\nold table\n{R.END}\n\nmore\n"
    new = R.replace_headline(readme, "| a |\n|---|\n")
    assert new == f"# clipshield\n\nintro\n{R.BEGIN}\n\n| a |\n|---|\n\n{R.END}\n\nmore\n"
    assert R.replace_headline(new, "| a |\n|---|\n") == new


@pytest.mark.parametrize("readme", ["# clipshield\n", f"{R.END}\n{R.BEGIN}\n", f"{R.BEGIN}\n{R.END}\n{R.BEGIN}\n"])
def test_replace_headline_without_the_two_markers_is_a_clear_error(readme):
    with pytest.raises(ValueError, match=r"README.md needs one line `<!-- headline:begin -->` and, below it, one line "
                                         r"`<!-- headline:end -->`"):
        R.replace_headline(readme, "| a |")


def test_clipshield_docs_writes_both_and_check_fails_when_either_would_change(tmp_path, monkeypatch):
    make_run(tmp_path)
    machine_json(tmp_path / R.DEFAULT_MACHINE)
    monkeypatch.chdir(tmp_path)
    Path("README.md").write_text("# clipshield\n")
    result = runner.invoke(app, ["docs"])
    assert result.exit_code == 1 and "README.md needs one line" in result.stderr
    assert "(docs/results.md written)" in result.stderr and Path(R.RESULTS_MD).is_file()

    Path("README.md").write_text(f"# clipshield\n{R.BEGIN}\n{R.END}\nrest\n")
    result = runner.invoke(app, ["docs", "--check"])
    assert result.exit_code == 1 and result.stderr.strip() == \
        "error: README.md would change: run `clipshield docs` and commit the result"
    assert runner.invoke(app, ["docs"]).exit_code == 0
    assert "| PAR | `par-blended` | 0.050 ± 0.012 |" in Path("README.md").read_text()
    assert "3.0 minutes of stages on AMD EPYC (2 cores, AVX-512)" in Path("README.md").read_text()
    assert runner.invoke(app, ["docs", "--check"]).exit_code == 0

    Path(R.RESULTS_MD).write_text("edited by hand\n")
    result = runner.invoke(app, ["docs", "--check"])
    assert result.exit_code == 1 and "docs/results.md would change" in result.stderr
    assert Path(R.RESULTS_MD).read_text() == "edited by hand\n"  # --check writes nothing


def test_the_detection_results_get_their_section_with_the_runs_setting_and_cpu(tmp_path):
    assert R.detection_section(tmp_path) == []  # nothing kept: no section
    folder = tmp_path / "results/detection"
    folder.mkdir(parents=True)
    (folder / "summary.md").write_text("| trigger | embeddings of | k-distance AUROC |\n|---|---|---|\n| wanet | clean | 0.3 |\n")
    (folder / "params.yaml").write_text("attack: {target: circle}\npoison: {rate: 0.01}\ndetect: {k: 16, batch_size: 512}\n")
    with pytest.raises(ValueError, match="results/detection: the CPU of its detect stages is not recorded"):
        R.detection_section(tmp_path)
    machine_json(folder / "machine.json")
    text = "\n".join(R.detection_section(tmp_path))
    assert text.startswith("## Detection") and "| wanet | clean | 0.3 |" in text
    assert "### results/detection/" in text
    assert "target `circle`, poison rate 0.01, detect.k 16, batches of 512; no filter-then-train;" in text
    other = tmp_path / "results/detection-full"  # a second kept run: a subsection of its own, after the first
    other.mkdir()
    (other / "summary.md").write_text("| trigger | embeddings of | k-distance AUROC |\n|---|---|---|\n| badnet | b | 0.9 |\n")
    (other / "params.yaml").write_text("attack: {target: square}\npoison: {rate: 0.01}\ndetect: {k: 16, batch_size: 512, "
                                       "filter_triggers: [badnet, wanet], score: dao}\n")
    machine_json(other / "machine.json")
    text = "\n".join(R.detection_section(tmp_path))
    assert text.count("## Detection") == 1 and text.index("### results/detection/") < text.index(
        "### results/detection-full/") < text.index("| badnet | b | 0.9 |")
    assert "target `square`, poison rate 0.01, detect.k 16, batches of 512; filter-then-train on badnet, wanet by dao;" in text
