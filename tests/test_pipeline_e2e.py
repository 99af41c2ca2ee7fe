"""End to end: the real pipeline (`dvc repro`) on the smoke profile in a copy of the repo.

It really generates data, pre-trains, poisons, backdoors, synthesises and cleans, just small; then
checks the cache (a second repro runs nothing) and that `dvc exp run -S par.eps=...` re-runs exactly
the PAR stages.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def sh(cmd: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1", "DVC_NO_ANALYTICS": "1",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    r = subprocess.run(cmd, shell=True, cwd=cwd, env=env, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise AssertionError(f"`{cmd}` failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def copy_repo(dst: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    for f in files:
        if f.startswith((".dvc/", "dvc.lock", "metrics/", "dvclive/", "reports/", "times/")) or not (REPO / f).is_file():
            continue
        (dst / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, dst / f)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("project")
    copy_repo(root)
    sh("git init -q && dvc init -q && dvc config core.analytics false", root)
    sh("clipshield profile smoke", root)
    sh("git add -A && git commit -qm smoke", root)
    run = sh("dvc repro", root)
    return root, run


def test_repro_trains_and_evaluates_every_model(project):
    root, run = project
    stages = re.findall(r"Running stage '([^']+)'", run.stdout)
    assert stages[:2] == ["data", "pretrain"]
    assert {"poison@blended_stripes", "backdoor@blended_stripes-0", "synth", "clean@blended_stripes-finetune-0",
            "clean@blended_stripes-cleanclip-0", "clean@blended_stripes-par-0", "harden@fare-clean",
            "harden@tecoa-clean", "harden_matrix@fare-par-blended_stripes-0",
            "harden_matrix@fare-backdoor-blended_stripes-0", "badclip", "detect@blended_stripes",
            "report"} == set(stages) - {"data", "pretrain", "baseline", "robust"}
    assert "asr_blended_stripes" in json.loads((root / "metrics/baseline.json").read_text())
    clean = json.loads((root / "metrics/clean.json").read_text())
    for key in ("zeroshot_top1", "i2t_r1", "i2t_r5", "t2i_r5", "i2t_r10"):
        assert 0.0 <= clean[key] <= 1.0
    # Pre-training really trained: the logged loss fell.
    log = [json.loads(line) for line in (root / "dvclive/pretrain.jsonl").read_text().splitlines()]
    assert set(log[0]) == {"step", "zeroshot_top1"} and log[0]["step"] == 0  # the start model, before any update
    losses = [row["loss"] for row in log[1:]]
    assert losses[-1] < losses[0]
    assert "zeroshot_top1" in log[-1]
    for name in ("backdoor-blended_stripes-s0", "par-blended_stripes-s0", "cleanclip-blended_stripes-s0"):
        m = json.loads((root / f"metrics/{name}.json").read_text())
        assert {"asr", "asr_all", "retrieval_asr", "zeroshot_top1"} <= set(m)
        prov = json.loads((root / f"models/{name}/provenance.json").read_text())
        assert prov["metrics"]["asr"] == pytest.approx(m["asr"], abs=1e-4)
        assert prov["attack"]["trigger"] == "blended_stripes"
    manifest = (root / "data/poisoned/blended_stripes/manifest.jsonl").read_text().splitlines()
    assert len(manifest) == round(0.2 * 1200)
    shown = sh("dvc metrics show", root).stdout
    assert "metrics/clean.json" in shown and "zeroshot_top1" in shown
    # DVCLive: every training stage's series, summary and params where dvc.yaml declares them
    for name in ("pretrain", "backdoor-blended_stripes-s0", "par-blended_stripes-s0", "fare-clean"):
        live = json.loads((root / f"dvclive/{name}/metrics.json").read_text())
        rows = [json.loads(line) for line in (root / f"dvclive/{name}.jsonl").read_text().splitlines()]
        assert live["step"] == rows[-1]["step"] and live["loss"] == pytest.approx(rows[-1]["loss"])
        assert live["train_steps"] == rows[-1]["step"] and live["train_seconds"] > 0
        tsv = (root / f"dvclive/{name}/plots/metrics/loss.tsv").read_text().splitlines()
        assert tsv[0] == "step\tloss" and len(tsv) == len([r for r in rows if "loss" in r]) + 1  # not step 0
        assert "lr:" in (root / f"dvclive/{name}/params.yaml").read_text()
    assert "dvclive/par-blended_stripes-s0/metrics.json" in shown and "train_seconds" in shown
    fare = json.loads((root / "metrics/fare-par-blended_stripes-s0.json").read_text())
    assert {"asr", "robust_top1_eps4", "distortion_clean", "distortion_adv"} <= set(fare)  # robust.eps: [4]


def test_report_has_every_model_and_plots(project):
    root, _ = project
    report = (root / "reports/report.md").read_text()
    for model in ("clean (blended_stripes)", "backdoor-blended_stripes", "finetune-blended_stripes",
                  "cleanclip-blended_stripes", "par-blended_stripes", "fare-clean", "tecoa-clean",
                  "fare-par-blended_stripes", "fare-backdoor-blended_stripes"):
        assert f"| {model} | 1 |" in report, model
    assert "trained on `data/synth`" in report  # which data every defence saw
    times = report[report.index("## Where the time went"):]
    for stage in ("| data |", "| pretrain |", "| baseline |", "| clean@blended_stripes-par-0 |",
                  "| harden@fare-backdoor-blended_stripes-s0 |", "| **total** |"):
        assert stage in times, stage
    for png in ("asr_vs_accuracy", "asr_during_training", "robust_vs_eps", "training_curves", "triggers"):
        assert (root / f"reports/{png}.png").stat().st_size > 5000
    html = sh("dvc plots show -o plots_html", root)
    assert (root / "plots_html/index.html").exists(), html.stdout
    assert "dvclive/pretrain/plots/metrics/loss.tsv" in (root / "plots_html/index.html").read_text()


def test_second_repro_runs_nothing(project):
    root, _ = project
    again = sh("dvc repro", root)
    assert "Running stage" not in again.stdout
    assert "up to date" in (sh("dvc status", root).stdout + again.stdout).lower()


def test_exp_run_par_eps_reruns_only_par_stages_and_their_dependents(project):
    root, _ = project
    sh("git add -A && git commit -qm lock", root)
    exp = sh("dvc exp run -S par.eps=1.8", root)
    ran = re.findall(r"Running stage '([^']+)'", exp.stdout)
    # PAR, then FARE from the PAR model (its input changed: provenance records eps); the report re-runs
    # only if metrics changed. Never the data, backdoor or other cleaning stages.
    assert ran[0] == "clean@blended_stripes-par-0", exp.stdout
    assert set(ran) <= {"clean@blended_stripes-par-0", "harden_matrix@fare-par-blended_stripes-0", "report"}, exp.stdout
    # The sweep collects the experiment beside the commit it branched from, each with its own metrics.
    model = "par-blended_stripes-s0"
    sweep = sh(f"clipshield sweep par.eps --model {model} --out sweeps", root)
    rows = {r["par.eps"]: r for r in json.loads((root / "sweeps/par.eps.json").read_text())}
    committed_eps = yaml.safe_load(sh("git show HEAD:params.yaml", root).stdout)["par"]["eps"]
    assert sorted(rows) == sorted([1.8, committed_eps]), rows
    after = json.loads((root / f"metrics/{model}.json").read_text())
    before = json.loads(sh(f"git show HEAD:metrics/{model}.json", root).stdout)
    for eps, m in ((1.8, after), (committed_eps, before)):
        assert {k: rows[eps][f"{model}.{k}"] for k in ("asr", "zeroshot_top1")} == {
            k: m[k] for k in ("asr", "zeroshot_top1")}, (eps, rows[eps], m)
    assert sweep.stdout.startswith("| experiment | par.eps |") and (root / "sweeps/par.eps.png").exists()


def test_the_target_panel_runs_each_target_as_an_experiment_and_resumes(project):
    root, _ = project
    sh("git add -A && git commit -qm 'the panel starts from here'", root)
    default = yaml.safe_load((root / "params.yaml").read_text())["attack"]["target"]
    first = sh("clipshield targets run square", root)
    ran = set(re.findall(r"Running stage '([^']+)'", first.stdout + first.stderr))
    assert {"poison@blended_stripes", "backdoor@blended_stripes-0", "clean@blended_stripes-par-0"} <= ran, ran
    assert all(s.split("@")[0] in {"badclip", "baseline", "poison", "backdoor", "clean"} for s in ran), ran
    summary = json.loads((root / "results/targets/summary.json").read_text())
    assert sorted(summary) == sorted([default, "square"])  # the workspace's own target, then the experiment
    workspace = {m: json.loads((root / f"metrics/{m}-blended_stripes-s0.json").read_text()) for m in ("backdoor", "par")}
    assert summary[default]["par"]["asr"] == workspace["par"]["asr"]
    assert summary["square"]["experiment"] == "target-square"
    try:  # the experiment's own files hold the panel's numbers for its target
        sh("dvc exp apply target-square", root)
        par = json.loads((root / "metrics/par-blended_stripes-s0.json").read_text())
        assert summary["square"]["par"]["asr"] == par["asr"]
        assert summary["square"]["par"]["zeroshot_top1"] == par["zeroshot_top1"]
        assert yaml.safe_load((root / "params.yaml").read_text())["attack"]["target"] == "square"
    finally:
        sh("git checkout -q -- . && dvc checkout -q", root)
    again = sh("clipshield targets run square", root)
    progress = again.stderr  # progress on stderr, the panel's tables on stdout
    assert "2 measured" in progress and "0 to run" in progress and "Running stage" not in progress + again.stdout
    assert "PAR leaves ≤ 5% on" in again.stdout
    bad = sh("clipshield targets run sqaure", root, check=False)
    assert bad.returncode == 1 and "not a class of the data set: sqaure" in bad.stderr + bad.stdout
    params = (root / "params.yaml").read_text()
    try:  # an experiment would leave an uncommitted change out of the commit's own target
        (root / "params.yaml").write_text(params + "\n")
        dirty = sh("clipshield targets run star", root, check=False)
        assert dirty.returncode == 1 and "commit these first" in dirty.stderr + dirty.stdout
    finally:
        (root / "params.yaml").write_text(params)


def test_a_changed_attack_does_not_rerun_pretraining(project):
    root, _ = project
    params = (root / "params.yaml").read_text()
    try:
        changed = params.replace(f"target: {yaml.safe_load(params)['attack']['target']}", "target: heart")
        assert changed != params
        (root / "params.yaml").write_text(changed)
        status = sh("dvc status", root).stdout
        assert "baseline:" in status and "poison@blended_stripes:" in status, status
        assert "pretrain:" not in status and "data:" not in status, status
    finally:
        (root / "params.yaml").write_text(params)


def test_stage_with_bad_params_fails_with_one_line(project):
    root, _ = project
    params = (root / "params.yaml").read_text()
    broken = yaml.safe_load(params)
    broken["backdoor"]["stpes"] = broken["backdoor"].pop("steps")
    try:
        (root / "params.yaml").write_text(yaml.safe_dump(broken, sort_keys=False))
        r = sh("python stages/backdoor.py blended_stripes 0 --start models/clean --data data/poisoned/blended_stripes "
               "--test data/test --out models/backdoor-blended_stripes-s0 --metrics metrics/backdoor-blended_stripes-s0.json",
               root, check=False)
        assert r.returncode == 1
        assert "unknown param `backdoor.stpes`" in r.stderr and "did you mean `backdoor.steps`" in r.stderr
        assert "Traceback" not in r.stderr
    finally:
        (root / "params.yaml").write_text(params)


# ---- registry, remotes and scoring on the pipeline's real outputs ----------------------------------

def md5s(root: Path, folders=("models", "data")) -> dict[str, str]:
    import hashlib
    return {str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest()
            for f in folders for p in sorted((root / f).rglob("*")) if p.is_file()}


def test_evaluate_any_model_gives_the_pipelines_numbers(project, tmp_path):
    root, _ = project
    out = tmp_path / "scored.json"
    sh(f"clipshield evaluate --model local-dir:models/par-blended_stripes-s0 --trigger blended_stripes --out {out}",
       root)
    scored, stage = json.loads(out.read_text()), json.loads((root / "metrics/par-blended_stripes-s0.json").read_text())
    keys = {"zeroshot_top1", "asr", "asr_all", "retrieval_asr", "i2t_r1", "i2t_r5", "t2i_r5", "n_test"}
    assert keys <= set(scored)
    assert {k: scored[k] for k in keys} == {k: stage[k] for k in keys}
    robust = json.loads(sh("clipshield evaluate --model local-dir:models/fare-clean --robust", root).stdout)
    fare = json.loads((root / "metrics/fare-clean.json").read_text())
    assert robust["robust_top1_eps4"] == pytest.approx(fare["robust_top1_eps4"], abs=1e-4)


def test_the_registry_declares_every_final_model(project):
    root, _ = project
    artifacts = yaml.safe_load((root / "dvc.yaml").read_text())["artifacts"]
    models = sorted(p.name for p in (root / "models").iterdir() if (p / "provenance.json").is_file())
    assert "badclip-patch" in {p.name for p in (root / "models").iterdir()}  # an attack's patch, not a model
    assert sorted(artifacts) == models
    for name, a in artifacts.items():
        assert a["type"] == "model" and a["path"] == f"models/{name}" and a["desc"]
        assert any(label.startswith("defence:") for label in a["labels"])
        prov = json.loads((root / a["path"] / "provenance.json").read_text())
        assert {"name", "code_version", "metrics", "params"} <= set(prov)
    assert "trigger:blended_stripes" in artifacts["fare-par-blended_stripes-s0"]["labels"]
    assert "defence:par+fare" in artifacts["fare-par-blended_stripes-s0"]["labels"]


def test_push_then_fresh_clone_pull_restores_identical_models_and_shards(project, tmp_path):
    root, _ = project
    shutil.copy(REPO / ".dvc/config", root / ".dvc/config")  # the shipped default: a local folder remote
    sh("git add -A && git commit -qm 'remote and results'", root)
    sh("clipshield push", root)
    assert (root.parent / "clipshield-storage").is_dir()  # ../clipshield-storage, beside the repository
    clone = root.parent / "clone-beside"  # beside the original: the same ../clipshield-storage
    sh(f"git clone -q {root} {clone}", tmp_path)
    assert not (clone / "models").exists()
    sh("clipshield pull", clone)
    assert md5s(clone) == md5s(root)

    # a model by name, from another directory, without cloning
    got = tmp_path / "got"
    sh(f"clipshield get par-blended_stripes-s0 --repo {root} --out {got}", tmp_path)
    assert md5s(got, ["."]) == {k.removeprefix("models/par-blended_stripes-s0/"): v for k, v in md5s(root, ["models"]).items()
                                if k.startswith("models/par-blended_stripes-s0/")}
    # a registered version (a GTO tag NAME@vX.Y.Z), through `dvc artifacts get`
    sh("git tag -a par-blended_stripes-s0@v0.1.0 -m registered", root)  # GTO reads annotated tags
    sh(f"clipshield get par-blended_stripes-s0 --repo {root} --version v0.1.0 --out {tmp_path / 'v010'}", tmp_path)
    assert md5s(tmp_path / "v010", ["."]) == md5s(got, ["."])
    unknown = sh(f"clipshield get par-nope --repo {root}", tmp_path, check=False)
    assert unknown.returncode == 1
    assert "no artifact named 'par-nope'" in unknown.stderr and "clean, backdoor-blended_stripes-s0" in unknown.stderr


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def s3_server():
    yield from moto_server()


@pytest.fixture
def s3_server_checking_keys():
    """A moto S3 server that checks access keys against its (empty) IAM: every key pair is wrong."""
    yield from moto_server({"INITIAL_NO_AUTH_ACTION_COUNT": "0"})


def moto_server(env=None):
    """moto's S3 server on 127.0.0.1, started and stopped by the test."""
    import time
    import urllib.request
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(url, timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def test_push_pull_through_an_s3_server(project, tmp_path, s3_server, monkeypatch):
    import boto3
    root, _ = project
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="clipshield-test")
    sh(f"dvc remote add -f s3test s3://clipshield-test/store && dvc remote modify s3test endpointurl {s3_server}", root)
    sh("git add -A && git commit -qm 's3 remote' --allow-empty", root)
    sh("clipshield push -r s3test", root)
    listed = boto3.client("s3", endpoint_url=s3_server).list_objects_v2(Bucket="clipshield-test")
    assert listed["KeyCount"] > 10
    clone = tmp_path / "clone"
    sh(f"git clone -q {root} {clone}", tmp_path)
    sh("clipshield pull -r s3test", clone)
    assert md5s(clone) == md5s(root)


def test_unreachable_remote_says_how_to_configure_it(project):
    root, _ = project
    sh(f"dvc remote add -f dead s3://nowhere/store && dvc remote modify dead endpointurl http://127.0.0.1:{free_port()}",
       root)
    env_free = sh("clipshield push -r dead", root, check=False)
    assert env_free.returncode == 1
    assert "failed (DVC's message is above)" in env_free.stderr
    assert "dvc remote modify s3 endpointurl" in env_free.stderr and "dvc remote list" in env_free.stderr
    sh("dvc remote remove dead", root)


def test_wrong_s3_credentials_give_dvcs_error_and_how_to_set_them(project, s3_server_checking_keys, monkeypatch):
    root, _ = project
    for k, v in {"AWS_ACCESS_KEY_ID": "wrong", "AWS_SECRET_ACCESS_KEY": "wrong", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    sh(f"dvc remote add -f badkeys s3://clipshield-test/store && "
       f"dvc remote modify badkeys endpointurl {s3_server_checking_keys}", root)
    try:
        r = sh("clipshield push -r badkeys", root, check=False)
    finally:
        sh("dvc remote remove badkeys", root)
    assert r.returncode == 1
    assert "InvalidAccessKeyId" in r.stderr or "Forbidden" in r.stderr or "403" in r.stderr, r.stderr[-2000:]
    assert "failed (DVC's message is above)" in r.stderr and "access_key_id" in r.stderr
