"""Hardening: safe loading, one params schema, malformed data, resumable runs, NaN guard, determinism."""
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from clipshield import models
from clipshield.data import shards
from clipshield.data.shards import DataError
from clipshield.objectives import Objective
from clipshield.params import ParamsError, check_params, read_yaml, validate
from clipshield.training import Checkpoint, TrainConfig, TrainingError, train

ROOT = Path(__file__).resolve().parents[1]


# ---- 1. no code execution on load ---------------------------------------------------------------

class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling this object calls open(marker, "w"): it writes a file
        return (open, (self.marker, "w"))


def evil_checkpoint(path: Path, marker: Path) -> Path:
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": RunsCode(str(marker))}, path)
    return path


def test_pickled_code_in_pretrained_weights_is_refused(tmp_path):
    marker = tmp_path / "owned"
    evil = evil_checkpoint(tmp_path / "weights.pt", marker)
    with pytest.raises(models.ModelError, match="could run code on load: refused"):
        models.create("smoke-rn", pretrained=str(evil))
    assert not marker.exists()


def test_pickled_code_in_a_checkpoint_is_never_run(tmp_path):
    marker = tmp_path / "owned"
    path = tmp_path / "run.pt"
    torch.save({"run_id": "r", "step": 3, "payload": RunsCode(str(marker))}, path)
    assert Checkpoint(path, 1, "r").load() is None  # refused, so the run starts over
    assert not marker.exists()


def test_model_folder_loads_safetensors_only(tmp_path):
    clip = models.create("smoke-rn", seed=0)
    folder = models.save(clip, tmp_path / "m", {"name": "m"})
    (folder / models.WEIGHTS_FILE).unlink()
    marker = tmp_path / "owned"
    evil_checkpoint(folder / "open_clip_pytorch_model.bin", marker)  # a pickle beside the config
    with pytest.raises(models.ModelError, match="not a model folder"):
        models.load(f"local-dir:{folder}")
    assert not marker.exists()


# ---- 2. one schema, every problem at once ---------------------------------------------------------

@pytest.fixture
def params():
    return read_yaml(ROOT / "params.yaml")


@pytest.mark.parametrize("edit, expected", [
    (lambda p: p["par"].update(eps=-1), "`par.eps` = -1 is not allowed; use a number >= 0"),
    (lambda p: p["par"].update(eps="big"), "`par.eps` = 'big' must be a number"),
    (lambda p: p["poison"].update(rate=1.5), "`poison.rate` = 1.5 is not allowed; use a fraction in [0, 1]"),
    (lambda p: p["poison"].update(rate=-0.1), "`poison.rate` = -0.1 is not allowed"),
    (lambda p: p["attack"]["triggers"].append("badnett"), "valid triggers: badnet, badnet_stripes, blended"),
    (lambda p: p["clean"]["methods"].append("parr"), "`clean.methods` = 'parr' is not allowed; valid cleaning"),
    (lambda p: p["pretrain"].update(model="tiny-rnn"), "`pretrain.model` = 'tiny-rnn' is not allowed"),
    (lambda p: p.pop("eval"), "params.yaml has no `eval` section"),
    (lambda p: p["backdoor"].update(stepz=3), "unknown param `backdoor.stepz` in params.yaml; did you mean `backdoor.steps`?"),
    (lambda p: p["fare"].update(eps=300), "`fare.eps` = 300 is not allowed; it is in 1/255 units"),
    (lambda p: p["fare"].update(eps=-2), "`fare.eps` = -2 is not allowed"),
    (lambda p: p["fare"].update(steps=0), "`fare.steps` = 0 is not allowed; use a whole number >= 1"),
    (lambda p: p["harden"].update(steps=0), "`harden.steps` = 0 is not allowed"),
    (lambda p: p["robust"].update(eps=[2, -4]), "`robust.eps` = -4.0 is not allowed"),
    (lambda p: p["harden"]["runs"].update(x={"method": "fair", "start": "clean"}), "`harden.runs.x.method` = 'fair'"),
    (lambda p: p["attack"].update(target="dragon"), "`attack.target` = 'dragon' is not allowed; choose a class"),
    (lambda p: p["clean"].update(schedule="linear"), "choose cosine, par or constant"),
])
def test_each_bad_param_is_named_with_what_is_allowed(params, edit, expected):
    assert validate(params) == []
    edit(params)
    problems = validate(params)
    assert len(problems) == 1 and expected in problems[0], problems


def test_harden_matrix_makes_a_run_per_method_start_trigger_and_seed(params):
    from clipshield.params import harden_runs
    params["seeds"], params["attack"]["triggers"] = [0, 1], ["badnet", "blended"]
    params["harden"]["matrix"] = {"methods": ["fare", "tecoa"], "starts": ["par", "backdoor"]}
    assert validate(params) == []
    runs = harden_runs(params)
    assert list(runs)[:5] == ["fare-clean", "fare-par-badnet-s0", "fare-par-badnet-s1", "fare-par-blended-s0",
                              "fare-par-blended-s1"]
    assert len(runs) == 1 + 2 * 2 * 2 * 2 and list(runs)[-1] == "tecoa-backdoor-blended-s1"
    assert runs["tecoa-backdoor-badnet-s1"] == {"method": "tecoa", "start": "backdoor-badnet-s1"}
    assert runs["fare-clean"] == {"method": "fare", "start": "clean"}  # harden.runs as written
    params["harden"]["matrix"] = {"methods": ["fare"], "starts": []}  # an empty list: no run (DVC: no stage)
    assert validate(params) == [] and list(harden_runs(params)) == ["fare-clean"]


@pytest.mark.parametrize("matrix, expected", [
    ({"methods": ["fare"], "starts": ["parr"]},
     "`harden.matrix.starts` = 'parr' is not allowed; valid starts: finetune, cleanclip, par, backdoor"),
    ({"methods": ["fair"], "starts": ["par"]}, "`harden.matrix.methods` = 'fair' is not allowed; valid harden methods"),
    ({"methods": ["fare"], "start": ["par"]}, "did you mean `harden.matrix.starts`?"),
    ({"methods": ["fare"], "starts": ["par", "par"]}, "harden.matrix lists fare or par twice; list each once"),
])
def test_each_bad_harden_matrix_is_named(params, matrix, expected):
    params["harden"]["matrix"] = matrix
    problems = validate(params)
    assert len(problems) == 1 and expected in problems[0], problems


def test_a_run_given_by_hand_and_by_the_matrix_is_refused(params):
    params["harden"]["runs"]["fare-par-blended_stripes-s0"] = {"method": "fare", "start": "par-blended_stripes-s0"}
    assert validate(params) == ["`harden.runs.fare-par-blended_stripes-s0` is also made by harden.matrix (fare from "
                                "par-blended_stripes-s0); remove it from harden.runs"]


def test_a_profile_gives_the_harden_matrix_whole(params):
    from clipshield.params import merge_profile
    merged = merge_profile(params, {"harden": {"matrix": {"methods": ["tecoa"]}}})
    assert merged["harden"]["matrix"] == {"methods": ["tecoa"]} and merged["harden"]["runs"] == params["harden"]["runs"]


def test_every_problem_is_listed_at_once(params, tmp_path):
    params["par"]["eps"] = -1
    params["poison"]["rate"] = 2
    params["attack"]["triggers"] = ["nope"]
    params["clean"]["lr"] = "fast"
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    with pytest.raises(ParamsError) as e:
        check_params(path)
    msg = str(e.value)
    assert msg.startswith(f"{path} has 4 problems:")
    for key in ("par.eps", "poison.rate", "attack.triggers", "clean.lr"):
        assert key in msg


@pytest.mark.parametrize("profile", sorted(p.stem for p in (ROOT / "profiles").glob("*.yaml")))
def test_shipped_params_and_profiles_are_valid(params, profile):
    from clipshield.cli import registry_profile
    from clipshield.params import deep_merge
    assert validate(deep_merge(params, registry_profile(read_yaml(ROOT / "profiles" / f"{profile}.yaml"), params))) == []


def test_a_stage_validates_before_any_work(tmp_path):
    params = read_yaml(ROOT / "params.yaml")
    params["poison"]["rate"] = 7
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    r = subprocess.run([sys.executable, "-m", "clipshield.cli", "data"], cwd=tmp_path, capture_output=True,
                       text=True, env={**os.environ, "COLUMNS": "300"})
    assert r.returncode == 1
    assert "`poison.rate` = 7.0 is not allowed" in r.stderr
    assert not (tmp_path / "data").exists()  # the data stage never started


# ---- 3. malformed data ---------------------------------------------------------------------------

def png() -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def handmade_shards(folder: Path, members: list[tuple[str, bytes]], count: int) -> Path:
    folder.mkdir()
    with tarfile.open(folder / "train-000000.tar", "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    (folder / "sizes.json").write_text(json.dumps({"train-000000.tar": count}))
    return folder


@pytest.mark.parametrize("key", ["../escape", "/etc/escape", "a/../../escape"])
def test_member_names_leaving_the_folder_are_refused(tmp_path, key):
    folder = handmade_shards(tmp_path / "ds", [(f"{key}.png", png()), (f"{key}.txt", b"a red star."),
                                               (f"{key}.json", b'{"class": 3}')], 1)
    with pytest.raises(DataError) as e:
        list(shards.iter_samples(folder))
    assert "train-000000.tar" in str(e.value) and repr(key) in str(e.value)


def test_poisoning_a_malicious_shard_writes_nothing_outside(tmp_path):
    from clipshield.attacks.poison import poison_stream
    folder = handmade_shards(tmp_path / "in", [("../../escape.png", png()), ("../../escape.txt", b"a star."),
                                               ("../../escape.json", b'{"class": 3}')], 1)
    out = tmp_path / "out" / "poisoned"
    with pytest.raises(DataError):
        shards.write_shards(poison_stream(shards.iter_samples(folder, decode=False), 1, "blended", 1.0, "star", 0,
                                          {}, []), out, prefix="train")
    # the output's parent folder exists; no data set, no partial folder, no escaped file
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == \
        ["in", "in/sizes.json", "in/train-000000.tar", "out"]


def test_sample_without_caption_names_shard_and_sample(tmp_path):
    folder = handmade_shards(tmp_path / "ds", [("s1.png", png()), ("s1.json", b'{"class": 3}')], 1)
    with pytest.raises(DataError) as e:
        list(shards.iter_samples(folder))
    assert "sample s1 in shard train-000000.tar" in str(e.value) and "'txt'" in str(e.value)


def test_truncated_shard_names_the_shard(tmp_path):
    samples = [(f"s{i}", np.full((4, 4, 3), i, np.uint8), f"caption {i}", {"class": i}) for i in range(6)]
    folder = tmp_path / "ds"
    shards.write_shards(samples, folder, prefix="train", per_shard=3)
    tar = folder / "train-000001.tar"
    tar.write_bytes(tar.read_bytes()[:700])
    with pytest.raises(DataError) as e:
        list(shards.iter_samples(folder))
    assert "train-000001.tar" in str(e.value)


# ---- 4. interrupted runs resume to the same weights ----------------------------------------------

TRAIN_SCRIPT = """
import sys, torch
torch.set_num_threads(1)
from clipshield import models
from clipshield.objectives import build_objective
from clipshield.params import TrainParams
from clipshield.pipeline import run_training
clip = models.create("smoke-rn", seed=0)
p = TrainParams(steps=int(sys.argv[2]), batch_size=8, lr=1e-3, warmup=2, checkpoint_every=int(sys.argv[3]), shuffle=16)
run_training(clip, build_objective(sys.argv[4]), sys.argv[1], p, "run", log_dir="logs", checkpoint_dir="ckpt")
models.save(clip, "model", {"name": "run"})
"""


def world_shards(folder: Path, n: int = 96) -> Path:
    from clipshield.pipeline import world_samples
    shards.write_shards(world_samples("base", 0, n, 32, "train"), folder, prefix="train", per_shard=48)
    return folder


def run_script(cwd: Path, data: Path, steps: int, every: int, objective: str = "clip", wait=True):
    cwd.mkdir(exist_ok=True)
    args = [sys.executable, "-c", TRAIN_SCRIPT, str(data), str(steps), str(every), objective]
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    if wait:
        r = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env)
        assert r.returncode == 0, r.stderr[-2000:]
        return r
    return subprocess.Popen(args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def weights(folder: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(folder / models.WEIGHTS_FILE)


@pytest.mark.parametrize("objective", ["clip", "cleanclip"])
def test_killed_run_resumes_to_identical_weights(tmp_path, objective):
    data = world_shards(tmp_path / "data")
    steps, every = 30, 4
    run_script(tmp_path / "straight", data, steps, every, objective)

    work = tmp_path / "killed"
    proc = run_script(work, data, steps, every, objective, wait=False)
    ckpt = work / "ckpt" / "run.pt"
    deadline = time.time() + 120
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed; give it more steps"
    os.kill(proc.pid, signal.SIGKILL)  # no clean-up code runs
    proc.wait()
    assert not (work / "model").exists()
    killed_at = torch.load(ckpt, weights_only=True)["step"]
    assert 0 < killed_at < steps

    resumed = run_script(work, data, steps, every, objective)
    assert f"resumed from step {killed_at}" in resumed.stderr
    assert not ckpt.exists()  # removed once the run completed
    a, b = weights(tmp_path / "straight" / "model"), weights(work / "model")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    log = [json.loads(line) for line in (work / "logs" / "run.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(10, steps + 1, 10))  # the log has no gap and no repeat
    live = (work / "logs" / "run" / "plots" / "metrics" / "loss.tsv").read_text().splitlines()  # DVCLive's too
    assert [int(row.split("\t")[0]) for row in live[1:]] == list(range(10, steps + 1, 10))
    assert [float(row.split("\t")[1]) for row in live[1:]] == pytest.approx([r["loss"] for r in log])


def test_checkpoint_of_another_run_is_ignored(tmp_path):
    clip = models.create("smoke-rn", seed=0)
    path = tmp_path / "c.pt"
    Checkpoint(path, 1, "other-params").save({"step": 5, "seen": 40, "model": clip.model.state_dict()})
    assert Checkpoint(path, 1, "these-params").load() is None
    assert Checkpoint(path, 1, "other-params").load()["step"] == 5


def test_a_run_of_other_code_params_or_start_weights_has_another_fingerprint(tmp_path, monkeypatch):
    from clipshield import pipeline
    from clipshield.objectives import build_objective
    from clipshield.params import TrainParams
    data = world_shards(tmp_path / "data", n=48)
    clip, p = models.create("smoke-rn", seed=0), TrainParams(steps=10, batch_size=8, lr=1e-3)
    first = pipeline.run_fingerprint(clip, build_objective("clip"), data, p)
    assert pipeline.run_fingerprint(clip, build_objective("clip"), data, p) == first
    assert pipeline.run_fingerprint(clip, build_objective("clip"), data, TrainParams(steps=10, batch_size=8, lr=2e-3)) != first
    assert pipeline.run_fingerprint(models.create("smoke-rn", seed=1), build_objective("clip"), data, p) != first
    monkeypatch.setattr("clipshield.work.train.code_digest", lambda: "edited objectives/clip.py")  # DVC reruns on a code change
    assert pipeline.run_fingerprint(clip, build_objective("clip"), data, p) != first


def test_iter_batches_start_skips_exactly(tmp_path):
    data = world_shards(tmp_path / "data", n=40)
    full = shards.iter_batches(data, 8, shuffle=16, seed=3)
    keys = [next(full)["keys"] for _ in range(12)]  # 5 batches per epoch: crosses two epoch boundaries
    for start in (0, 3, 5, 7):
        it = shards.iter_batches(data, 8, shuffle=16, seed=3, start=start)
        assert [next(it)["keys"] for _ in range(12 - start)] == keys[start:]


# ---- 5. NaN guard -----------------------------------------------------------------------------

class NanAfter(Objective):
    name = "clip"

    def __init__(self, bad_step):
        from clipshield.objectives.clip import ClipObjective
        self.inner, self.bad_step, self.calls = ClipObjective(), bad_step, 0

    def trainable(self, clip):
        return self.inner.trainable(clip)

    def __call__(self, batch, clip, frozen):
        loss, logs = self.inner(batch, clip, frozen)
        self.calls += 1
        return (loss * float("nan") if self.calls > self.bad_step else loss), logs


def test_nan_names_step_objective_and_last_finite_values(tmp_path):
    data = world_shards(tmp_path / "data", n=48)
    clip = models.create("smoke-rn", seed=0)
    batches = shards.iter_batches(data, 8, shuffle=0)
    with pytest.raises(TrainingError) as e:
        train(clip, NanAfter(3), batches, TrainConfig(steps=6, lr=1e-3), description="backdoor-blended")
    msg = str(e.value)
    assert "the clip loss is nan at step 3" in msg and "last finite values: {'step': 2, 'loss': " in msg
    assert "nothing was saved" in msg


def test_nan_in_a_stage_writes_no_model(tmp_path, monkeypatch):
    from clipshield import pipeline
    from clipshield.objectives import clip as clip_objective
    from clipshield.params import BackdoorParams, EvalParams, PoisonParams
    data = world_shards(tmp_path / "data" / "poisoned" / "blended", n=48)
    from clipshield.data.classes import classes_file, world_classes
    shards.write_shards(pipeline.world_samples("base", 1, 20, 32, "test"), tmp_path / "data" / "test", prefix="test",
                        extra_files=classes_file(world_classes()))  # a test set names its classes
    models.save(models.create("smoke-rn", seed=0), tmp_path / "models" / "clean", {"name": "clean"})
    monkeypatch.chdir(tmp_path)
    original = clip_objective.ClipObjective.__call__
    monkeypatch.setattr(clip_objective.ClipObjective, "__call__",
                        lambda self, *a: (original(self, *a)[0] * float("inf"), {}))
    attack = type("A", (), {"options": {}, "target": "star", "triggers": ["blended"]})()
    with pytest.raises(TrainingError, match="loss is nan at step 0|loss is inf at step 0"):
        pipeline.backdoor("blended", attack, PoisonParams(0.1, 0), BackdoorParams(steps=3, batch_size=8, lr=1e-3),
                          EvalParams(test_n=20, retrieval_n=20), 0, "models/clean", "data/poisoned/blended",
                          "data/test", "models/backdoor-blended-s0", "metrics/backdoor-blended-s0.json")
    assert not (tmp_path / "models" / "backdoor-blended-s0").exists()
    assert not (tmp_path / "metrics").exists()
    assert data.exists()


# ---- 6. determinism ---------------------------------------------------------------------------

def test_same_params_and_seed_give_identical_shards_and_metrics(tmp_path):
    from clipshield.evaluation import evaluate_model
    from clipshield.objectives import build_objective
    from clipshield.params import TrainParams
    from clipshield.pipeline import data_hash, run_training, world_samples
    results = []
    for run in ("a", "b"):
        folder = tmp_path / run
        shards.write_shards(world_samples("base", 0, 64, 32, "train"), folder / "train", prefix="train", per_shard=32)
        shards.write_shards(world_samples("base", 1, 40, 32, "test"), folder / "test", prefix="test")
        clip = models.create("smoke-rn", seed=0)
        p = TrainParams(steps=6, batch_size=16, lr=1e-3, shuffle=32, checkpoint_every=0)
        run_training(clip, build_objective("par"), folder / "train", p, "par", log_dir=folder / "logs")
        metrics = evaluate_model(clip, shards.load_all(folder / "test"), triggers={"blended": {}}, target="star",
                                 retrieval_n=40)
        results.append((data_hash(folder / "train"), data_hash(folder / "test"), metrics))
    assert results[0] == results[1]


def test_a_matrix_start_no_stage_makes_is_refused(params):
    params["clean"]["methods"] = ["finetune"]  # the default matrix starts from par and backdoor models
    assert validate(params) == ["`harden.matrix.starts` = ['par'] is not allowed; no stage makes those models: add par "
                                "to clean.methods or remove them from harden.matrix.starts"]
