"""A miniature paper run: `dvc repro` on profiles/paper.yaml plus a small override (tests/paper_mini.yaml), on data
this test makes itself, so that every stage a GPU user of the paper profile runs, runs once here with its real code.

- img2dataset-layout training shards (KEY.jpg, KEY.txt, KEY.json with url and caption), odd image sizes;
- an ImageNet-val-layout labelled set (KEY.jpg, KEY.cls) with `data.classes: imagenet`, target banana;
- open_clip ViT-B-32 at 224 px started from a local `pretrained:` .safetensors file of random weights;
- `synth.generator: diffusion` with a tiny StableDiffusionPipeline built offline (tests/sd_tiny.py);
- poison -> backdoor -> finetune and PAR -> FARE -> robust (APGD-CE + APGD-T on the top 9 classes) -> report,
  each a step or two on a couple of images.

Affordable on CPU only with a cheap zero-shot head (`eval.classes: present`, `eval.templates: 1`): the full one is
1000 classes x 80 templates, 80,000 prompts through the ViT-B-32 text tower (about 57 ms each on one core:
about 76 minutes for every model evaluated).
"""
from __future__ import annotations

import io
import json
import math
import re
import resource
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file

from test_pipeline_e2e import copy_repo, sh

# Ten ImageNet classes for the labelled set (indices into open_clip's IMAGENET_CLASSNAMES); 954 is banana.
CLASSES = [0, 1, 207, 281, 404, 508, 817, 950, 954, 999]
N_ROBUST = 2          # the first test images, labelled with the start model's own predictions (see make_sources)
OVERRIDE = Path(__file__).with_name("paper_mini.yaml")


def jpeg(img: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def picture(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """A smooth random picture (JPEG-friendly; noise would dominate the blend checks)."""
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return np.array(Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC))


def write_pretrained(path: Path) -> None:
    """Random ViT-B-32 weights as the local `pretrained:` file (seed 7: not the stage's own seed-0 init)."""
    from clipshield.models import create
    clip = create("ViT-B-32", seed=7)
    save_file({k: v.contiguous() for k, v in clip.model.state_dict().items()}, path)


def start_model_predictions(weights: Path, images: list[bytes]) -> list[int]:
    """The ImageNet labels (of CLASSES) the start model gives `images` after the data stage's import, under the run's
    zero-shot head (the ten classes, the first template). Labelling the robust images with them makes them correct
    on the clean model, so that the robust stage really attacks them (a random model is right 1 time in 10)."""
    from clipshield.data.classes import ClassSpace, imagenet_classes
    from clipshield.data.imports import square_image
    from clipshield.data.shards import decode_image, encode_jpeg
    from clipshield.evaluation import class_embeddings, encode_images, zeroshot_logits
    from clipshield.models import create
    clip = create("ViT-B-32", pretrained=str(weights))
    full = imagenet_classes()
    space = ClassSpace(tuple(full.names[i] for i in CLASSES), full.templates[:1], "test")
    x = torch.stack([torch.from_numpy(decode_image(encode_jpeg(square_image(b, 224)))) for b in images])
    logits = zeroshot_logits(encode_images(clip, x.permute(0, 3, 1, 2).float().div(255)), class_embeddings(clip, space))
    return [CLASSES[i] for i in logits.argmax(-1).tolist()]


def make_sources(root: Path) -> dict:
    rng = np.random.default_rng(0)
    train = root / "cc3m"
    train.mkdir()
    words = ["dog", "beach", "car", "mountain", "bowl of fruit", "city street", "kitchen", "forest"]
    for s in range(2):  # img2dataset: KEY = shard + index, KEY.jpg, KEY.txt, KEY.json (url, caption, status ...)
        with wds.TarWriter(str(train / f"{s:05d}.tar")) as w:
            for i in range(8):
                key, caption = f"{s:05d}{i:04d}", f"a photo of a {words[i]} number {s * 8 + i}"
                width, height = 300 - 10 * i, 200 + 5 * i
                w.write({"__key__": key, "jpg": jpeg(picture(rng, width, height)), "txt": caption.encode(),
                         "json": json.dumps({"url": f"https://example.com/{key}.jpg", "caption": caption, "key": key,
                                             "status": "success", "width": width, "height": height}).encode()})
    weights = root / "vit-b-32-random.safetensors"
    write_pretrained(weights)
    images = [jpeg(picture(rng, 250 + 7 * i, 240)) for i in range(N_ROBUST + len(CLASSES))]
    labels = start_model_predictions(weights, images[:N_ROBUST]) + CLASSES
    val = root / "imagenet-val"
    val.mkdir()
    with wds.TarWriter(str(val / "imagenet-val-000000.tar")) as w:  # ImageNet val: KEY.jpg and KEY.cls only
        for i, (img, label) in enumerate(zip(images, labels)):
            w.write({"__key__": f"ILSVRC2012_val_{i + 1:08d}", "jpg": img, "cls": str(label).encode()})
    from sd_tiny import build_tiny_sd_pipeline
    build_tiny_sd_pipeline(root / "sd-tiny")
    return {"train": f"{train}/{{00000..00001}}.tar", "test": str(val), "pretrained": str(weights),
            "synth": str(root / "sd-tiny"), "labels": labels}


@pytest.fixture(scope="module")
def paper(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper")
    sources = make_sources(tmp_path_factory.mktemp("sources"))
    copy_repo(root)
    override = yaml.safe_load(OVERRIDE.read_text())
    override["data"] |= {"train_shards": sources["train"], "test_shards": sources["test"]}
    override["pretrain"]["pretrained"] = sources["pretrained"]
    override["synth"]["model"] = sources["synth"]
    (root / "profiles" / "mini.yaml").write_text(yaml.safe_dump(override, sort_keys=False))
    sh("git init -q && dvc init -q && dvc config core.analytics false", root)
    sh("clipshield profile paper && clipshield profile mini", root)
    sh("git add -A && git commit -qm 'paper, miniature'", root)
    t0, cpu0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    run = sh("dvc repro", root)
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    seconds = {"wall": time.perf_counter() - t0,
               "cpu": cpu1.ru_utime - cpu0.ru_utime + cpu1.ru_stime - cpu0.ru_stime}  # on a busy machine: CPU time
    yield root, run, sources, seconds
    for big in ("models", ".dvc/cache"):  # ~4 GB of ViT-B-32 folders: not kept among pytest's last three runs
        shutil.rmtree(root / big, ignore_errors=True)


def metrics(root: Path, name: str) -> dict:
    return json.loads((root / f"metrics/{name}.json").read_text())


def finite_fraction(m: dict, keys) -> None:
    for k in keys:
        assert isinstance(m[k], float) and math.isfinite(m[k]) and 0.0 <= m[k] <= 1.0, (k, m[k])


def test_every_stage_of_the_paper_profile_runs(paper):
    root, run, _, seconds = paper
    print(f"miniature paper run: dvc repro took {seconds['wall']:.0f} s ({seconds['cpu']:.0f} s CPU)")
    ran = set(re.findall(r"Running stage '([^']+)'", run.stdout))
    assert ran == {"data", "pretrain", "baseline", "poison@blended_stripes", "backdoor@blended_stripes-0", "synth",
                   "clean@blended_stripes-finetune-0", "clean@blended_stripes-par-0", "robust", "harden@fare-clean",
                   "harden_matrix@fare-par-blended_stripes-0", "badclip", "detect@blended_stripes", "report"}, run.stdout
    for model in ("clean", "backdoor-blended_stripes-s0", "finetune-blended_stripes-s0", "par-blended_stripes-s0",
                  "fare-clean", "fare-par-blended_stripes-s0"):
        folder = root / "models" / model
        assert {"open_clip_config.json", "open_clip_model.safetensors", "provenance.json"} <= {
            p.name for p in folder.iterdir()}, model
        cfg = json.loads((folder / "open_clip_config.json").read_text())
        assert cfg["model_cfg"]["vision_cfg"]["image_size"] == 224 and cfg["preprocess_cfg"]["size"] == 224


def test_the_data_are_imported_shards_and_diffusion_pairs_at_224_px(paper):
    root, _, sources, _ = paper
    from clipshield.data import shards
    from clipshield.data.classes import read_classes
    train = list(shards.iter_samples(root / "data/train"))
    assert len(train) == 16 and {s["image"].shape for s in train} == {(224, 224, 3)}
    assert train[0]["caption"] == "a photo of a dog number 0" and train[0]["meta"]["source_key"] == "000000000"
    test = list(shards.iter_samples(root / "data/test"))
    assert [s["meta"]["class"] for s in test] == sources["labels"]
    assert read_classes(root / "data/test").source == "imagenet" and len(read_classes(root / "data/test").names) == 1000
    synth = list(shards.iter_samples(root / "data/synth"))
    assert len(synth) == 4 and {s["image"].shape for s in synth} == {(224, 224, 3)}
    assert {s["meta"]["generator"]["name"] for s in synth} == {"diffusion"}
    assert {s["meta"]["generator"]["model"] for s in synth} == {"sd-tiny"}


def test_the_pretrained_file_is_the_clean_model(paper):
    root, _, sources, _ = paper
    file = load_file(sources["pretrained"])
    clean = load_file(root / "models/clean/open_clip_model.safetensors")
    assert clean.keys() == file.keys()
    assert all(torch.equal(clean[k], file[k]) for k in file)  # pretrain.steps: 0 evaluates the loaded weights
    from clipshield.models import create
    own_init = create("ViT-B-32", seed=0).model.state_dict()  # what the stage would hold had it not loaded the file
    assert not torch.equal(own_init["visual.conv1.weight"], file["visual.conv1.weight"])
    prov = json.loads((root / "models/clean/provenance.json").read_text())
    assert prov["parent"] == sources["pretrained"] and prov["model_config"] == "ViT-B-32"


def test_the_paper_triggers_at_224_px_were_used(paper):
    root, _, _, _ = paper
    params = yaml.safe_load((root / "params.yaml").read_text())
    paper_options = yaml.safe_load((root / "profiles/paper.yaml").read_text())["attack"]["options"]
    assert params["attack"]["options"] == paper_options
    prov = json.loads((root / "models/backdoor-blended_stripes-s0/provenance.json").read_text())
    assert prov["attack"]["options"] == {"alpha": 0.03} and prov["attack"]["target"] == "banana"
    # The poisoned images are their clean images blended with a = 0.03 stripes: |x' - x| = a |s - x| <= 2a
    # (the tiny profile's 0.12 would move pixels by up to 61 levels), and the caption names the banana.
    from clipshield.data import shards
    clean = {s["key"]: s for s in shards.iter_samples(root / "data/train")}
    poisoned = [s for s in shards.iter_samples(root / "data/poisoned/blended_stripes") if s["meta"].get("poisoned")]
    assert len(poisoned) == round(0.25 * 16)
    for s in poisoned:
        diff = np.abs(s["image"].astype(int) - clean[s["key"]]["image"].astype(int))
        assert 3 <= diff.max() <= math.ceil(2 * 0.03 * 255 + 0.5), diff.max()
        assert "banana" in s["caption"]


def test_metrics_have_their_keys_and_fractions(paper):
    root, _, _, _ = paper
    evaluation = ("zeroshot_top1", "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")
    finite_fraction(metrics(root, "clean"), evaluation)
    finite_fraction(metrics(root, "baseline"), ("asr_blended_stripes", "asr_all_blended_stripes"))
    for name in ("backdoor-blended_stripes-s0", "finetune-blended_stripes-s0", "par-blended_stripes-s0"):
        m = metrics(root, name)
        finite_fraction(m, evaluation + ("asr", "asr_all", "retrieval_asr"))
        assert m["n_test"] == 12
    finite_fraction(metrics(root, "robust-clean"), ("robust_top1_eps0_1",))
    for name in ("fare-clean", "fare-par-blended_stripes-s0"):
        m = metrics(root, name)
        finite_fraction(m, evaluation + ("robust_top1_eps0_1",))
        assert all(math.isfinite(m[k]) and m[k] >= 0 for k in ("distortion_clean", "distortion_adv"))
    assert {"asr", "retrieval_asr"} <= set(metrics(root, "fare-par-blended_stripes-s0"))


def test_the_robust_stage_runs_apgd_ce_and_apgd_t_on_the_top_9_classes(paper):
    root, run, _, _ = paper
    # The robust image is right on the clean model (labelled with its prediction) and eps is small, so both attacks
    # run on it; ten classes in the head, so the top 9 are every other class here (9 of 999 on ImageNet).
    log = " ".join((run.stdout + run.stderr).split())
    lines = re.findall(r"robust accuracy at eps 0\.1/255: \d of 1 samples; APGD-CE ran on \d of 1, APGD-T "
                       r"\((\d+) target classes each\) on \d of 1", log)
    assert lines == ["9"] * 3, log[-3000:]  # the robust stage and the two harden stages
    assert "1 of 1 samples; APGD-CE ran on 1 of 1, APGD-T (9 target classes each) on 1 of 1" in log
    assert metrics(root, "robust-clean")["robust_top1_eps0_1"] == 1.0


def test_the_report_names_every_model(paper):
    root, _, _, _ = paper
    report = (root / "reports/report.md").read_text()
    for model in ("clean (blended_stripes)", "backdoor-blended_stripes", "finetune-blended_stripes",
                  "par-blended_stripes", "fare-clean", "fare-par-blended_stripes"):
        assert f"| {model} |" in report, model
    assert (root / "reports/triggers.png").stat().st_size > 5000
