"""torchrun + DDP on CPU (gloo): 2 processes and 1 process with the same global batch and seed give the same
losses step by step; bad launch settings are refused before any work."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from clipshield.data import shards
from clipshield.pipeline import world_samples

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp") / "train"
    shards.write_shards(world_samples("base", 0, 64, 32, "train"), folder, prefix="train", per_shard=32)
    return folder


def losses(data, out, model, objective, nproc, steps=5, extra=(), expect=0, accum=1):
    cmd = [sys.executable, str(HERE / "ddp_losses.py"), str(data), str(out), model, objective, str(steps), "16",
           *map(str, extra)]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] + cmd[1:]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCUM": str(accum)}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if r.returncode != expect and nproc > 1 and any(w in r.stderr for w in ("Address already in use", "Rendezvous",
                                                                              "Connection reset", "Connection refused")):
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)  # a port race of the launcher
    assert r.returncode == expect, (r.returncode, r.stdout[-2000:], r.stderr[-4000:])
    return json.loads(Path(out).read_text()) if expect == 0 else r


@pytest.mark.parametrize("model, objective", [("smoke-vit", "clip"), ("smoke-rn", "par")])
def test_two_gloo_processes_match_one_process(data, tmp_path, model, objective):
    one = losses(data, tmp_path / "one.json", model, objective, 1)
    two = losses(data, tmp_path / "two.json", model, objective, 2)
    assert (one["world"], two["world"]) == (1, 2)
    assert len(one["loss"]) == len(two["loss"]) == 5
    assert one["loss"] == pytest.approx(two["loss"], abs=1e-5)
    if objective == "par":
        assert one["s_i"] == pytest.approx(two["s_i"], abs=1e-5)
    assert one["loss"][-1] != pytest.approx(one["loss"][0], abs=1e-4)  # it trained: the comparison is not vacuous
    # (weights are not compared element by element: parameters whose gradient is ~0, e.g. attention key
    # biases, take Adam steps of +-lr on summation-order noise; equal losses over 5 steps check the gradients)


def test_two_processes_with_accumulation_match_one_process(data, tmp_path):
    """Global batch 16 = 2 processes x 2 micro-batches of 4: the gathered-feature gradient cache and the
    averaged gradients give the losses of one process in one pass."""
    one = losses(data, tmp_path / "one.json", "smoke-vit", "clip", 1)
    two = losses(data, tmp_path / "two.json", "smoke-vit", "clip", 2, accum=2)
    assert two["world"] == 2
    assert one["loss"] == pytest.approx(two["loss"], abs=1e-5)
    assert one["loss"][-1] != pytest.approx(one["loss"][0], abs=1e-4)


def test_a_one_process_checkpoint_resumes_on_two_processes(data, tmp_path):
    straight = losses(data, tmp_path / "straight.json", "smoke-rn", "par", 1, steps=8)
    ckpt = tmp_path / "run.pt"
    crashed = losses(data, tmp_path / "crashed.json", "smoke-rn", "par", 1, steps=8, extra=(ckpt, 2, 5), expect=3)
    assert ckpt.exists() and not (tmp_path / "crashed.json").exists(), crashed.stderr[-2000:]
    resumed = losses(data, tmp_path / "resumed.json", "smoke-rn", "par", 2, steps=8, extra=(ckpt, 2))
    assert resumed["world"] == 2
    assert resumed["loss"] == pytest.approx(straight["loss"], abs=1e-5)  # steps 1-4 from the checkpoint, 5-8 on 2 ranks

ROOT = HERE.parent


def project(tmp_path, **train):
    """A project folder with the smoke profile, a few pre-training steps and `train` launch settings."""
    import yaml

    from clipshield.params import deep_merge, read_yaml
    params = deep_merge(read_yaml(ROOT / "params.yaml"), read_yaml(ROOT / "profiles" / "smoke.yaml"))
    params = deep_merge(params, {"train": train, "pretrain": {"steps": 4, "eval_every": 0}})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp_path


def clipshield(args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "300"}
    return subprocess.run([sys.executable, "-m", "clipshield.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=600)


def test_more_processes_than_devices_is_refused_before_any_work(tmp_path):
    root = project(tmp_path, nproc=4096)
    r = clipshield(["pretrain"], root)
    assert r.returncode == 1
    assert f"train.nproc = 4096 but this machine has {os.cpu_count()} CPU cores" in r.stderr
    assert not (root / "models").exists()


def test_a_stage_with_nproc_2_runs_under_torchrun_and_rank_0_writes(tmp_path):
    root = project(tmp_path, nproc=2)
    assert clipshield(["data"], root).returncode == 0
    r = clipshield(["pretrain"], root)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (root / "models/clean/open_clip_model.safetensors").exists()
    assert not (root / "models/clean.partial").exists() and not (root / "checkpoints/pretrain.pt").exists()
    log = [json.loads(line) for line in (root / "dvclive/pretrain.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [4]  # one writer: no line twice
    assert json.loads((root / "metrics/clean.json").read_text())["n_test"] == 200


def test_the_torchrun_command_for_one_and_for_several_machines():
    from clipshield.params import LaunchParams
    from clipshield.stage import torchrun_command
    one = torchrun_command(LaunchParams(nproc=4), ["-m", "clipshield.cli", "pretrain"])
    assert one[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4", "-m", "clipshield.cli",
                       "pretrain"]
    two = torchrun_command(LaunchParams(nproc=8, nnodes=2, rdzv_endpoint="10.0.0.1:29400"), ["stages/clean.py", "par"])
    assert two[1:6] == ["-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=8", "--rdzv-backend=c10d"]
    assert "--rdzv-endpoint=10.0.0.1:29400" in two and two[-2:] == ["stages/clean.py", "par"]
    def run_id(cmd):
        return [a for a in cmd if a.startswith("--rdzv-id=")]
    other = torchrun_command(LaunchParams(nproc=8, nnodes=2, rdzv_endpoint="h:1"), ["stages/clean.py", "finetune"])
    same = torchrun_command(LaunchParams(nproc=8, nnodes=2, rdzv_endpoint="h:1"), ["/elsewhere/stages/clean.py", "par"])
    assert run_id(two) and run_id(two) != run_id(other)   # two stages never join each other's group
    assert run_id(two) == run_id(same)                    # one stage on two machines does, wherever its checkout


@pytest.mark.parametrize("train, expected", [
    ({"nnodes": 2}, "`train.rdzv_endpoint` = '' is not allowed; with train.nnodes = 2 give HOST:PORT"),
    ({"nnodes": 2, "rdzv_endpoint": "10.0.0.1"}, "`train.rdzv_endpoint` = '10.0.0.1' is not allowed"),
    ({"nnodes": 0}, "`train.nnodes` = 0 is not allowed"),
    ({"nnodes": 3, "rdzv_endpoint": "h:29400"}, "`pretrain.batch_size` = 128 does not split over train.nproc x "
                                                "train.nnodes x train.accum = 1 x 3 x 1; use a multiple of 3"),
])
def test_bad_multi_machine_settings_are_named(train, expected):
    from clipshield.params import deep_merge, read_yaml, validate
    problems = validate(deep_merge(read_yaml(ROOT / "params.yaml"), {"train": train}))
    assert any(expected in p for p in problems), problems


def test_two_torchrun_agents_on_two_nodes_match_one_process(data, tmp_path):
    """--nnodes 2 with one process each, meeting at a c10d rendezvous on 127.0.0.1 (two agents standing in for two
    machines): the losses of one process."""
    import socket

    from clipshield.params import LaunchParams
    from clipshield.stage import torchrun_command
    one = losses(data, tmp_path / "one.json", "smoke-rn", "par", 1)
    for attempt in range(2):  # a port taken between choosing it and binding it: choose again
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = torchrun_command(LaunchParams(nproc=1, nnodes=2, rdzv_endpoint=f"127.0.0.1:{port}"),
                               [str(HERE / "ddp_losses.py"), str(data), str(tmp_path / "two.json"), "smoke-rn", "par",
                                "5", "16"])
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        agents = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                  for _ in range(2)]
        outs = [a.communicate(timeout=600) for a in agents]
        if all(a.returncode == 0 for a in agents):
            break
    assert all(a.returncode == 0 for a in agents), [o[1][-3000:] for o in outs]
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["world"] == 2
    assert one["loss"] == pytest.approx(two["loss"], abs=1e-5)
    assert one["s_i"] == pytest.approx(two["s_i"], abs=1e-5)
