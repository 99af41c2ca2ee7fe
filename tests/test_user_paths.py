"""Every path a user can take: each bad input gives one line that says what is wrong and how to fix
it, before any work where it can be known before; good inputs at other sizes work."""
import io
import json
import os
import shutil
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
from typer.testing import CliRunner

from clipshield import models
from clipshield.cli import app
from clipshield.data import shards
from clipshield.data.classes import classes_file, world_classes
from clipshield.data.shards import DataError
from clipshield.objectives import Objective
from clipshield.params import ParamsError, check_params, load_section, read_yaml, validate
from clipshield.pipeline import world_samples

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def world_set(folder: Path, n: int, size: int = 32, seed: int = 1, prefix: str = "test", per_shard: int = 0) -> Path:
    """A labelled procedural-world data set (with its classes.json), as the data stage writes it."""
    shards.write_shards(world_samples("base", seed, n, size, prefix), folder, prefix=prefix, per_shard=per_shard or n,
                        extra_files=classes_file(world_classes()))
    return folder


def edit_params(path: Path, edit) -> None:
    params = read_yaml(path)
    edit(params)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    return lines[0]


# ---- 1. evaluation at any image size --------------------------------------------------------------

def test_a_model_is_scored_on_test_images_of_another_size_as_its_preprocessing_would(project):
    world_set(project / "data/test48", 8, size=48)
    edit_params(project / "params.yaml", lambda p: p["robust"].update(eps=[2.0], n=4, steps=2))
    result = runner.invoke(app, ["evaluate", "--model", "smoke-rn", "--random-init", "--test", "data/test48",
                                 "--trigger", "blended", "--robust"])
    assert result.exit_code == 0, result.stderr
    assert ("note: the test images are 48x48 px and smoke-rn takes 32 px: they are resized (shortest side, bicubic) "
            "and centre-cropped") in result.stderr
    metrics = json.loads(result.stdout)
    assert metrics["n_test"] == 8 and 0 <= metrics["asr"] <= 1 and 0 <= metrics["robust_top1_eps2"] <= 1


def test_images_at_the_model_size_are_not_resized_and_others_stay_in_pixel_range():
    from clipshield.evaluation import to_model_size
    clip = models.create("smoke-vit", seed=0)
    same = torch.rand(2, 3, 32, 32)
    assert to_model_size(clip, same) is same  # same-size evaluation is bit-identical to before
    wide = to_model_size(clip, torch.rand(2, 3, 24, 40))
    assert wide.shape == (2, 3, 32, 32) and wide.min() >= 0 and wide.max() <= 1


# ---- 2. attack.options ----------------------------------------------------------------------------

@pytest.fixture
def params():
    return read_yaml(REPO / "params.yaml")


@pytest.mark.parametrize("trigger, options, expected", [
    ("blended", {"aplha": 0.5}, "unknown option `attack.options.blended.aplha`; did you mean `attack.options.blended.alpha`?"),
    ("blended", {"alpha": -1}, "`attack.options.blended.alpha` = -1 is not allowed; a blend weight: use a number in (0, 1)"),
    ("blended", {"alpha": 7}, "`attack.options.blended.alpha` = 7 is not allowed; a blend weight"),
    ("blended", {"alpha": "high"}, "`attack.options.blended.alpha` = 'high' is not allowed; a blend weight"),
    ("badnet", {"patch": 100}, "`attack.options.badnet.patch` = 100 is not allowed; a side in pixels: use a whole number "
                               "from 1 to data.image_size (32)"),
    ("badnet", {"patch": -3}, "`attack.options.badnet.patch` = -3 is not allowed"),
    ("blended_triangles", {"tile": 2.5}, "`attack.options.blended_triangles.tile` = 2.5 is not allowed"),
    ("wanet", {"grid": 1}, "`attack.options.wanet.grid` = 1 is not allowed; control points per side: use a whole number >= 2"),
    ("wanet", {"strength": 0}, "`attack.options.wanet.strength` = 0 is not allowed; a warp strength: use a number > 0"),
    ("blended", 0.2, "`attack.options.blended` = 0.2 must be a mapping of option: value, e.g. {alpha: ...}"),
])
def test_each_bad_trigger_option_is_named_with_what_is_allowed(params, trigger, options, expected):
    params["attack"]["options"][trigger] = options
    problems = validate(params)
    assert len(problems) == 1 and expected in problems[0], problems


def test_trigger_option_names_come_from_the_trigger_registry(params, monkeypatch):
    from clipshield.attacks import triggers
    t = triggers.TRIGGERS["blended"]
    monkeypatch.setitem(triggers.TRIGGERS, "blended", triggers.Trigger(t.name, t.fn, (*t.options, "fixed_noise")))
    params["attack"]["options"]["blended"] = {"alpha": 0.2, "fixed_noise": True}
    assert validate(params) == []


def test_a_bad_trigger_option_stops_the_stage_before_work_in_one_line(project):
    edit_params(project / "params.yaml", lambda p: p["attack"]["options"]["blended"].update(alpha="high"))
    result = runner.invoke(app, ["poison", "blended"])
    assert result.exit_code == 1
    assert one_line(result.stderr).startswith("error: params.yaml: `attack.options.blended.alpha` = 'high' is not allowed")


# ---- 3. cleaning data that holds poison -----------------------------------------------------------

@pytest.fixture
def poisoned(project):
    from clipshield.params import AttackParams, PoisonParams
    from clipshield.pipeline import poison
    world_set(project / "data/train", 40, seed=0, prefix="train", per_shard=20)
    poison("blended", AttackParams(["blended"], "star", {}), PoisonParams(0.2, 1), "data/train", "data/poisoned/blended")
    return project / "data/poisoned/blended"


def test_cleaning_on_a_poisoned_data_set_is_refused(poisoned, project):
    edit_params(project / "params.yaml", lambda p: p["clean"].update(data="data/poisoned/blended"))
    result = runner.invoke(app, ["clean", "blended", "par"])
    assert result.exit_code == 1
    assert one_line(result.stderr).startswith(
        "error: clean.data = data/poisoned/blended holds poisoned samples: it holds a poisoning manifest "
        "(data/poisoned/blended/manifest.jsonl, 8 poisoned samples); cleaning on it would train the model on the poison")
    assert "set clean.allow_poisoned: true to do it on purpose" in result.stderr


def test_cleaning_on_a_copy_of_poisoned_shards_is_refused_unless_allowed(poisoned, project):
    from clipshield.pipeline import check_clean_source
    copy = project / "data/mine"
    shutil.copytree(poisoned, copy)
    (copy / "manifest.jsonl").unlink()
    with pytest.raises(DataError, match="its shard train-000000.tar is identical to data/poisoned/blended/train-000000.tar, "
                                        "which holds poisoned samples"):
        check_clean_source(copy, allow_poisoned=False)
    assert "identical" in check_clean_source(copy, allow_poisoned=True)  # on purpose: the evidence goes to provenance
    assert check_clean_source(project / "data/train", allow_poisoned=False) is None  # the clean source is fine


# ---- 4. corrupt shard content is named ------------------------------------------------------------

def png(side: int = 4) -> bytes:
    return shards.encode_png(np.zeros((side, side, 3), np.uint8))


def handmade(folder: Path, samples: list[dict], sizes: int | None = None) -> Path:
    folder.mkdir(parents=True)
    with tarfile.open(folder / "test-000000.tar", "w") as tf:
        for s in samples:
            for ext in ("png", "txt", "json"):
                info = tarfile.TarInfo(f"{s['key']}.{ext}")
                info.size = len(s[ext])
                tf.addfile(info, io.BytesIO(s[ext]))
    (folder / "sizes.json").write_text(json.dumps({"test-000000.tar": len(samples) if sizes is None else sizes}))
    (folder / "classes.json").write_text(classes_file(world_classes())["classes.json"])
    return folder


def good(key: str, side: int = 4) -> dict:
    return {"key": key, "png": png(side), "txt": b"a red star.", "json": b'{"class": 0}'}


@pytest.mark.parametrize("bad, expected", [
    ({"png": b"\x89PNG\r\n\x1a\n garbage"}, "sample s1 in shard test-000000.tar of ds: its image is not a readable PPM, PNG or JPEG"),
    ({"png": b"P6\n4 4\n255\n" + bytes(40)}, "sample s1 in shard test-000000.tar of ds: its image is not a readable PPM, PNG or "
                                              "JPEG (a 4x4 PPM holds 48 pixel bytes, this one 40)"),
    ({"txt": b"a red \xff star."}, "sample s1 in shard test-000000.tar of ds: its caption (s1.txt) is not UTF-8 text"),
    ({"json": b'{"class": '}, "sample s1 in shard test-000000.tar of ds: s1.json is not valid JSON"),
    ({"png": png(8)}, "sample s1 in shard test-000000.tar of ds is 8x8 px, but sample s0 in shard test-000000.tar of ds is 4x4"),
])
def test_a_corrupt_sample_is_named_with_its_shard(tmp_path, monkeypatch, bad, expected):
    monkeypatch.chdir(tmp_path)
    handmade(Path("ds"), [good("s0"), good("s1") | bad, good("s2")])
    for read in (lambda: shards.load_all("ds"), lambda: next(shards.iter_batches("ds", 3, shuffle=0))):
        with pytest.raises(DataError) as e:
            read()
        assert expected in str(e.value) and "dvc repro" in str(e.value)


def test_a_corrupt_png_in_the_test_set_is_one_line(project):
    handmade(project / "data/test", [good("s0"), good("s1") | {"png": b"\x89PNG broken"}])
    result = runner.invoke(app, ["evaluate", "--model", "smoke-rn", "--random-init"])
    assert result.exit_code == 1
    # evaluation streams the test set: the note on resizing these 4-px images may come before the error line
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("note: the test images")]
    assert one_line("\n".join(lines)).startswith("error: sample s1 in shard test-000000.tar of data/test: its image is not")


def test_a_test_set_without_classes_json_is_refused(project):
    folder = world_set(project / "data/test", 8)
    (folder / "classes.json").unlink()
    result = runner.invoke(app, ["evaluate", "--model", "smoke-rn", "--random-init"])
    assert result.exit_code == 1
    assert one_line(result.stderr).startswith("error: test set data/test has no classes.json, so its labels name no "
                                              "classes; re-create it with `clipshield data`")


def test_sizes_json_claiming_fewer_samples_than_a_shard_holds_is_refused(tmp_path):
    folder = handmade(tmp_path / "ds", [good("s0"), good("s1"), good("s2")], sizes=2)
    with pytest.raises(DataError, match=r"shard test-000000.tar of .*ds holds more samples than its sizes.json says "
                                        r"\(2; sample s2 is one more\)"):
        shards.load_all(folder)


# ---- 5. model folders and weights -----------------------------------------------------------------

@pytest.fixture
def folder(project):
    world_set(project / "data/test", 8)
    return models.save(models.create("smoke-rn", seed=0), project / "models/m", {"name": "m"})


@pytest.mark.parametrize("make, expected", [
    (lambda f: Path("w.safetensors").write_bytes((f / models.WEIGHTS_FILE).read_bytes()[:3000]),
     "cannot load pretrained weights 'w.safetensors' for smoke-rn: not a valid safetensors file, truncated or another "
     "format renamed .safetensors"),
    (lambda f: torch.save({"x": torch.zeros(2)}, "w.safetensors"), "not a valid safetensors file"),
])
def test_a_broken_safetensors_file_as_pretrained_is_one_line(folder, make, expected):
    make(folder)
    result = runner.invoke(app, ["evaluate", "--model", "smoke-rn", "--pretrained", "w.safetensors"])
    assert result.exit_code == 1
    assert expected in one_line(result.stderr)


def set_width(f: Path) -> None:
    cfg = json.loads((f / models.CONFIG_FILE).read_text())
    cfg["model_cfg"]["vision_cfg"]["width"] = 32
    (f / models.CONFIG_FILE).write_text(json.dumps(cfg))


@pytest.mark.parametrize("edit, expected", [
    (lambda f: (f / models.CONFIG_FILE).write_text("{"), "error: models/m/open_clip_config.json is not valid JSON"),
    (lambda f: (f / models.PROVENANCE_FILE).write_text(""), "error: models/m/provenance.json is not valid JSON"),
    (lambda f: (f / models.CONFIG_FILE).write_text('{"model_cfg": {"embed_dim": 32, "vision_cfg": {"layers": "x"}}}'),
     "error: models/m/open_clip_config.json does not describe a model open_clip can build"),
    (set_width, "error: models/m/open_clip_config.json does not match the weights in open_clip_model.safetensors "
                "(size mismatch for visual.conv1.weight"),
    (lambda f: (f / models.WEIGHTS_FILE).write_bytes((f / models.WEIGHTS_FILE).read_bytes()[:2000]),
     "error: cannot load weights from models/m/open_clip_model.safetensors"),
])
def test_a_broken_model_folder_names_the_broken_file(folder, edit, expected):
    edit(folder)
    result = runner.invoke(app, ["evaluate", "--model", "local-dir:models/m"])
    assert result.exit_code == 1
    assert one_line(result.stderr).startswith(expected)


def test_a_model_config_without_weights_needs_random_init(folder):
    result = runner.invoke(app, ["evaluate", "--model", "smoke-rn"])
    assert result.exit_code == 1
    assert one_line(result.stderr) == (
        "error: --model smoke-rn without --pretrained would score randomly initialised weights; give --pretrained (an "
        "open_clip tag or a weight file), a model folder (--model local-dir:PATH), or --random-init to score a random "
        "model on purpose")
    assert runner.invoke(app, ["evaluate", "--model", "smoke-rn", "--random-init"]).exit_code == 0


def test_evaluate_takes_the_target_from_params_unless_given(folder):
    def asr_of(*extra):
        result = runner.invoke(app, ["evaluate", "--model", "local-dir:models/m", "--trigger", "blended", *extra])
        assert result.exit_code == 0, result.stderr
        return json.loads(result.stdout)["asr"]

    by_target = {name: asr_of("--target", name) for name in world_classes().names}
    a = world_classes().names[0]
    b = next(name for name in by_target if by_target[name] != by_target[a])  # a target this model scores otherwise
    for target in (a, b):
        edit_params(Path("params.yaml"), lambda p: p["attack"].update(target=target))
        assert asr_of() == by_target[target]
    result = runner.invoke(app, ["evaluate", "--model", "local-dir:models/m", "--trigger", "blended", "--params",
                                 "elsewhere.yaml"])
    assert result.exit_code == 1
    assert one_line(result.stderr) == ("error: --trigger needs a target class: give --target, or --params with an "
                                       "attack section (elsewhere.yaml does not exist)")


# ---- 6. interruption messages that are true -------------------------------------------------------

class StopAt(Objective):
    """The CLIP objective, with Ctrl-C pressed during call number `at`."""
    name = "clip"

    def __init__(self, at):
        from clipshield.objectives.clip import ClipObjective
        self.inner, self.at, self.calls = ClipObjective(), at, 0

    def trainable(self, clip):
        return self.inner.trainable(clip)

    def __call__(self, batch, clip, frozen):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return self.inner(batch, clip, frozen)


def interrupted_training(tmp_path, capsys, every: int) -> str:
    from clipshield.params import TrainParams
    from clipshield.pipeline import run_training
    from clipshield.stage import run
    data = world_set(tmp_path / "data", 32, seed=0, prefix="train")
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs/run.jsonl").write_text("".join(json.dumps({"step": i}) + "\n" for i in range(150)))
    p = TrainParams(steps=20, batch_size=8, lr=1e-3, checkpoint_every=every, shuffle=0)
    clip = models.create("smoke-rn", seed=0)
    with pytest.raises(SystemExit) as e:
        run(lambda: run_training(clip, StopAt(8), data, p, "run", log_dir=tmp_path / "logs",
                                 checkpoint_dir=tmp_path / "ckpt"), params=None)
    assert e.value.code == 130
    assert len((tmp_path / "logs/run.jsonl").read_text().splitlines()) == 150  # the previous log is whole
    (line,) = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("run ")]  # not the bar
    return line


def test_ctrl_c_in_training_says_what_was_kept_and_where_the_rerun_resumes(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("DVC_STAGE", raising=False)
    line = interrupted_training(tmp_path, capsys, every=3)
    logs = tmp_path / "logs"
    assert line == (f"interrupted: run stopped at step 7 of 20; {logs}/run.jsonl was left as it was; this run's log so "
                    f"far is in {logs}/run.jsonl.partial; no model, metrics or data set was written (each output is "
                    f"written whole at its end; half-written data sets were removed) and the outputs from before are "
                    f"unchanged; rerunning the stage with the same params and data resumes from checkpoint step 6 ({tmp_path}/ckpt/run.pt)")


def test_ctrl_c_under_dvc_repro_says_dvc_removed_the_outputs(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DVC_STAGE", "backdoor@blended-0")
    line = interrupted_training(tmp_path, capsys, every=0)
    assert "`dvc repro` had already removed the outputs of stage backdoor@blended-0 before it ran" in line
    assert "outputs from before are unchanged" not in line
    assert line.endswith("rerunning the stage starts training over")


def test_an_interrupted_stage_names_the_outputs_it_had_already_written(project, capsys):
    from clipshield.stage import run

    def work():
        world_set(Path("data/test"), 4)
        raise KeyboardInterrupt
    with pytest.raises(SystemExit):
        run(work, params=None)
    assert one_line(capsys.readouterr().err) == (
        "interrupted: already written: data/test; nothing else was written (each output is written whole at its end; "
        "half-written data sets were removed) and the other outputs from before are unchanged; rerunning the stage "
        "starts it over")


def test_sigterm_is_handled_like_ctrl_c(project):
    edit_params(project / "params.yaml", lambda p: (p["data"].update(train_n=10 ** 6, test_n=20, per_shard=50),
                                                    p["eval"].update(test_n=20)))
    proc = subprocess.Popen([sys.executable, "-m", "clipshield.cli", "data"], cwd=project, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "COLUMNS": "400"})
    deadline = time.time() + 60
    while not list((project / "data").glob("train.partial/*.tar")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143
    assert [line for line in err.splitlines() if line.startswith("terminated")] == [
        "terminated (SIGTERM): no model, metrics or data set was written (each output is written whole at its end; "
        "half-written data sets were removed) and the outputs from before are unchanged; rerunning the stage starts it over"]
    assert not list((project / "data").iterdir())  # no data/train.partial left behind


# ---- 7. params read as DVC reads them -------------------------------------------------------------

def test_an_exponent_float_is_a_float(project):
    text = (project / "params.yaml").read_text()
    (project / "params.yaml").write_text(text.replace("  lr: 0.0001\n", "  lr: 1e-4\n", 1))
    check_params(project / "params.yaml")
    from clipshield.params import CleanParams
    assert load_section(CleanParams, "clean", project / "params.yaml").lr == 0.0001


def test_a_key_given_twice_is_refused_naming_its_line(project):
    lines = (project / "params.yaml").read_text().splitlines()
    at = lines.index("  lr: 0.0001")
    lines.insert(at + 1, "  lr: 0.5")
    (project / "params.yaml").write_text("\n".join(lines) + "\n")
    result = runner.invoke(app, ["data"])
    assert result.exit_code == 1
    assert one_line(result.stderr) == (f"error: params.yaml line {at + 2}: key `lr` is given twice (first on line "
                                       f"{at + 1}); DVC calls such a file corrupted: keep one of them")


# ---- 8. checks before writing or working -----------------------------------------------------------

def test_a_profile_with_a_bad_value_leaves_params_yaml_as_it_was(project):
    (project / "profiles/bad.yaml").write_text("poison: {rate: 3}\n")
    before = (project / "params.yaml").read_text()
    result = runner.invoke(app, ["profile", "bad"])
    assert result.exit_code == 1
    assert one_line(result.stderr).startswith("error: profile profiles/bad.yaml would make 1 problem(s), so params.yaml "
                                              "was left as it was; fix the profile: `poison.rate` = 3.0 is not allowed")
    assert (project / "params.yaml").read_text() == before


def test_a_profile_keeps_the_comments_of_params_yaml(project):
    before = (project / "params.yaml").read_text()
    (project / "profiles/nothing.yaml").write_text("{}\n")
    assert runner.invoke(app, ["profile", "nothing"]).exit_code == 0
    assert (project / "params.yaml").read_text() == before  # byte for byte
    assert runner.invoke(app, ["profile", "smoke"]).exit_code == 0
    after = (project / "params.yaml").read_text()
    comments = lambda text: [line.split("#", 1)[1] for line in text.splitlines() if "#" in line]
    assert comments(after) == comments(before)
    assert read_yaml(project / "params.yaml")["data"]["train_n"] == 1200


def test_evaluate_out_to_a_folder_is_refused_before_any_work(project):
    (project / "metrics").mkdir()
    result = runner.invoke(app, ["evaluate", "--model", "smoke-rn", "--random-init", "--test", "data/none",
                                 "--out", "metrics"])
    assert result.exit_code == 1  # the test set does not even exist: refused before reading it
    assert one_line(result.stderr) == ("error: --out metrics is a folder; give the path of the metrics JSON to write, "
                                       "e.g. --out metrics/smoke-rn.json")


def test_an_image_size_the_model_does_not_take_is_refused(params):
    params["data"]["image_size"] = 64
    problems = validate(params)
    assert problems == ["`data.image_size` = 64 is not allowed; pretrain.model tiny-rn takes 32 px images: set "
                        "data.image_size: 32 (or choose a model configured for 64 px)"]


def test_training_on_images_the_model_does_not_take_is_refused_before_it_starts(tmp_path):
    from clipshield.params import TrainParams
    from clipshield.pipeline import run_training
    data = world_set(tmp_path / "data", 16, size=24, seed=0, prefix="train")
    with pytest.raises(DataError) as e:
        run_training(models.create("smoke-vit", seed=0), None, data, TrainParams(steps=2, batch_size=8, lr=1e-3),
                     "run", log_dir=tmp_path / "logs")
    assert str(e.value) == (f"{data} holds 24x24 px images but the model (smoke-vit) takes 32 px; make the data at 32 px "
                            f"(data.image_size or synth.image_size: 32) or train a model configured for 24 px")
    assert not (tmp_path / "logs").exists()


def test_a_poison_rate_that_poisons_nothing_is_refused(project):
    world_set(project / "data/train", 20, seed=0, prefix="train")
    edit_params(project / "params.yaml", lambda p: p["poison"].update(rate=0))
    result = runner.invoke(app, ["poison", "blended_stripes"])
    assert result.exit_code == 1
    assert one_line(result.stderr) == (
        "error: poison.rate = 0 poisons round(0 x 20) = 0 of the 20 samples of data/train: data/poisoned/blended_stripes would "
        "be an unpoisoned copy and its backdoor would not take; raise poison.rate (e.g. 0.05) or poison a larger data set")
    assert not (project / "data/poisoned").exists()


def test_a_stage_is_named_by_its_matrix_keys_not_its_paths():
    from clipshield.stage import stage_name
    assert stage_name(["stages/clean.py", "blended", "par", "0", "--start", "models/backdoor-blended-s0"]) == \
        "clean@blended-par-0"
    assert stage_name(["stages/pretrain.py", "--train", "data/train", "--out", "models/clean"]) == "pretrain"
