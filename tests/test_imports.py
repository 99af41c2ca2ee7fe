"""Real-data import (the paper profile's data stage): img2dataset-style train shards (KEY.jpg, KEY.txt, KEY.json)
and ImageNet-val-style test shards (KEY.jpg, KEY.cls) become clipshield shards with a class space that the
attack target, zero-shot evaluation and poisoned captions use. Built offline from tiny fake shard sets."""
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
import yaml
from PIL import Image

from clipshield.data import shards
from clipshield.data.classes import ClassesError, ClassSpace, imagenet_classes, load_classes, read_classes
from clipshield.data.imports import external_samples, source_shards, square_image
from clipshield.params import DataParams
from clipshield.pipeline import make_data

ROOT = Path(__file__).parent.parent
NAMES = ["tench", "goldfish", "banana"]


def jpeg(rng, w, h) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def write_source(folder: Path, n_shards: int, per: int, labelled: bool, captions: bool, ext="jpg", seed=0) -> Path:
    """A fake img2dataset (captions) or ImageNet-val (labels) shard folder: keys with dots, odd sizes."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for s in range(n_shards):
        with wds.TarWriter(str(folder / f"{s:05d}.tar")) as w:
            for i in range(per):
                sample = {"__key__": f"{s:05d}{i:04d}", ext: jpeg(rng, 40 + 3 * i, 30 + 2 * s)}
                if captions:
                    sample["txt"] = f"a picture number {i} of shard {s}".encode()
                    sample["json"] = json.dumps({"url": f"http://x/{i}.jpg", "status": "success"}).encode()
                if labelled:
                    sample["cls"] = str((s * per + i) % len(NAMES)).encode()
                w.write(sample)
    return folder


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    (root / "classes.txt").write_text("\n".join(NAMES) + "\n")
    return {"train": write_source(root / "cc3m", 3, 20, labelled=False, captions=True),
            "test": write_source(root / "val", 2, 15, labelled=True, captions=False, ext="jpeg", seed=1),
            "classes": str(root / "classes.txt"), "root": root}


def data_params(sources, **kw) -> DataParams:
    base = dict(world="base", image_size=32, train_n=0, test_n=0, per_shard=25, seed=0, test_seed=1, source="shards",
                train_shards=str(sources["train"]), test_shards=str(sources["test"]), classes=sources["classes"])
    return DataParams(**(base | kw))


def test_imagenet_class_space_is_open_clips():
    space = imagenet_classes()
    assert len(space.names) == 1000 and len(space.templates) == 80
    assert space.names[954] == "banana" and space.templates[0] == "a bad photo of a {}."
    assert space.caption("banana", np.random.default_rng(0)).count("banana") == 1


def test_square_image_centre_crops_then_resizes():
    img = np.zeros((10, 30, 3), dtype=np.uint8)
    img[:, 10:20] = 255  # the centre square is white, the sides black
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    out = square_image(buf.getvalue(), 5)
    assert out.shape == (5, 5, 3) and out.min() == 255


def test_import_writes_resized_shards_with_labels_captions_and_classes(sources, tmp_path):
    counts = make_data(data_params(sources, train_n=50), tmp_path / "data" / "train", tmp_path / "data" / "test")
    assert counts == {"test": 30, "train": 50}  # train capped at 50 of 60
    train, test = tmp_path / "data/train", tmp_path / "data/test"
    assert shards.num_samples(train) == 50 and len(shards.shard_paths(train)) == 2  # 25 per shard
    batch = shards.load_all(test)
    assert batch["images"].shape == (30, 3, 32, 32)
    assert batch["labels"].tolist() == [i % 3 for i in range(30)]
    assert batch["captions"][2] == "a photo of a banana."  # no caption in the source: one from the class name
    assert batch["classes"] == load_classes(sources["classes"]) and read_classes(train).names == tuple(NAMES)
    first = next(shards.iter_samples(train))
    assert first["caption"] == "a picture number 0 of shard 0" and first["meta"]["source_key"] == "000000000"
    assert first["meta"].get("class") is None and first["key"] == "train00000000"
    assert shards.tar_members(shards.shard_paths(train)[0])[0].endswith(".jpg")  # photographs stay JPEG


def test_brace_patterns_and_globs_name_source_shards(sources):
    folder = sources["train"]
    assert source_shards(str(folder / "{00000..00001}.tar")) == [str(folder / "00000.tar"), str(folder / "00001.tar")]
    assert len(source_shards(str(folder / "*.tar"))) == 3


def test_poisoning_imported_data_names_the_target_class_and_keeps_the_class_space(sources, tmp_path):
    from clipshield.params import AttackParams, PoisonParams
    from clipshield.pipeline import poison
    make_data(data_params(sources), tmp_path / "data" / "train", tmp_path / "data" / "test")
    attack = AttackParams(triggers=["blended"], target="banana", options={"blended": {"alpha": 0.2}})
    out = tmp_path / "poisoned"
    poison("blended", attack, PoisonParams(rate=0.1, seed=1), data_dir=tmp_path / "data/train", out_dir=out)
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(manifest) == 6  # round(0.1 * 60)
    templates = load_classes(sources["classes"]).templates
    assert all(r["new_caption"] in {t.format("banana") for t in templates} for r in manifest)
    assert read_classes(out).names == tuple(NAMES)
    poisoned = {s["key"]: s for s in shards.iter_samples(out)}
    assert all(poisoned[r["key"]]["meta"]["poisoned"] for r in manifest)


def test_evaluation_uses_the_test_sets_classes(sources, tmp_path):
    from clipshield import models
    from clipshield.evaluation import evaluate_model
    make_data(data_params(sources), tmp_path / "data" / "train", tmp_path / "data" / "test")
    test = shards.load_all(tmp_path / "data/test")
    clip = models.create("smoke-rn", seed=0)
    metrics = evaluate_model(clip, test, triggers={"blended": {"alpha": 0.2}}, target="banana", retrieval_n=30)
    assert 0 <= metrics["zeroshot_top1"] <= 1 and metrics["n_test"] == 30
    assert 0 <= metrics["asr"] <= 1
    with pytest.raises(ValueError, match="'star' is not a class of this data set"):
        evaluate_model(clip, test, triggers={"blended": {}}, target="star", retrieval_n=30)
    wrong = test | {"classes": ClassSpace(("a", "b"), ("{}",), "two-class file")}
    with pytest.raises(ValueError, match=r"labels must lie in 0..1 \(its 2 classes"):
        evaluate_model(clip, wrong)


def test_bad_sources_are_refused_with_the_fix(sources, tmp_path):
    from clipshield.data.shards import DataError
    with pytest.raises(DataError, match="no .tar shards at"):
        make_data(data_params(sources, train_shards=str(tmp_path / "nowhere")), tmp_path / "a" / "train", tmp_path / "a" / "test")
    with pytest.raises(DataError, match="has no class label .* the test set must be labelled"):
        make_data(data_params(sources, test_shards=str(sources["train"])), tmp_path / "b" / "train", tmp_path / "b" / "test")
    two = tmp_path / "two.txt"
    two.write_text("tench\ngoldfish\n")
    with pytest.raises(DataError, match="has label 2, outside the 2 classes"):
        make_data(data_params(sources, classes=str(two)), tmp_path / "c" / "train", tmp_path / "c" / "test")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "00000.tar").write_bytes((sources["test"] / "00000.tar").read_bytes()[:3000])
    with pytest.raises(DataError, match="cannot read a source shard"):
        list(external_samples(str(broken), 24, load_classes(sources["classes"]), "t", True))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b" / "train").exists()  # nothing half-written
    dup = tmp_path / "dup.txt"
    dup.write_text("a\nb\na\n")
    with pytest.raises(ClassesError, match="names a class twice"):
        load_classes(str(dup))


def test_a_project_on_imported_shards_trains_poisons_and_evaluates(sources, tmp_path):
    """The CLI on a project whose params import real-style shards (offline, tiny model)."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for override in (yaml.safe_load((ROOT / "profiles/smoke.yaml").read_text()),
                     {"data": {"source": "shards", "train_shards": str(sources["train"]),
                               "test_shards": str(sources["test"]), "classes": sources["classes"], "image_size": 32,
                               "train_n": 0, "test_n": 0, "per_shard": 30},
                      "eval": {"test_n": 30, "retrieval_n": 30}, "attack": {"target": "banana"},
                      "pretrain": {"steps": 3, "batch_size": 16, "eval_every": 0, "shuffle": 20},
                      "poison": {"rate": 0.1}, "backdoor": {"steps": 2, "batch_size": 16, "shuffle": 20}}):
        from clipshield.params import deep_merge
        params = deep_merge(params, override)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    for cmd in (["data"], ["pretrain"], ["poison", "blended_stripes"], ["backdoor", "blended_stripes"]):
        r = subprocess.run([sys.executable, "-m", "clipshield.cli", *cmd], cwd=tmp_path, capture_output=True,
                           text=True, env=env, timeout=600)
        assert r.returncode == 0, (cmd, r.stderr[-3000:])
    metrics = json.loads((tmp_path / "metrics/backdoor-blended_stripes-s0.json").read_text())
    assert metrics["n_test"] == 30 and 0 <= metrics["asr"] <= 1
    provenance = json.loads((tmp_path / "models/backdoor-blended_stripes-s0/provenance.json").read_text())
    assert provenance["attack"]["target"] == "banana"
    from clipshield.models import load
    loaded = load(str(tmp_path / "models/backdoor-blended_stripes-s0"))  # safetensors loads back
    assert loaded.name == provenance["name"] and loaded.image_size == params["data"]["image_size"]


def test_an_imagenet_test_set_reads_back_with_its_two_pairs_of_alike_names(tmp_path):
    """open_clip's ImageNet names call classes 657/744 'missile' and 836/837 'sunglasses' (CLIP's own evaluation): a
    data set labelled with them reads back (it used to be refused, failing every paper run after its data stage), and
    neither name can be a target."""
    from clipshield.data.classes import classes_file
    from clipshield.params import validate
    (tmp_path / "classes.json").write_text(classes_file(imagenet_classes())[("classes.json")])
    space = read_classes(tmp_path)
    assert space == imagenet_classes() and space.index("banana") == 954
    with pytest.raises(ClassesError, match="names 2 classes .*657, 744"):
        space.index("missile")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"] |= {"source": "shards", "train_shards": "x", "test_shards": "y", "classes": "imagenet"}
    params["attack"]["target"] = "sunglasses"
    assert any("attack.target" in p and "836, 837" in p for p in validate(params))
    params["attack"]["target"] = "banana"
    assert not [p for p in validate(params) if "attack.target" in p]
