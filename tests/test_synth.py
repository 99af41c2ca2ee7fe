import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before anything imports huggingface_hub

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))

from clipshield.data import shards, synth  # noqa: E402
from clipshield.data.world import SHAPES  # noqa: E402
from sd_tiny import build_tiny_sd_pipeline, clip_tokenizer_from_open_clip  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: the tiny models gain nothing from two, and a busy 2-core machine makes
    spinning OpenMP threads 100x slower."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "tiny-sd"
    build_tiny_sd_pipeline(path)
    return path


def diffusion_params(model, **kw):
    p = {"generator": "diffusion", "model": str(model), "n": 8, "seed": 5, "per_shard": 3,
         "image_size": 16, "height": 32, "width": 32, "steps": 2, "guidance": 2.0, "batch_size": 4,
         "scheduler": "ddim"}
    p.update(kw)
    return p


def files(d: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(d.iterdir())}


@pytest.fixture(scope="module")
def reference(tiny_sd, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "synth"
    r = synth.generate(diffusion_params(tiny_sd), out, progress=False)
    assert r["complete"] and r["generated"] == 3 and r["images"] == 8
    return out


# -- captions ------------------------------------------------------------------------------------

def test_default_bank_classes_are_the_shapes():
    bank = synth.load_bank()
    assert tuple(bank["classes"]) == SHAPES


def test_captions_deterministic_and_independent_of_n():
    bank = synth.load_bank()
    a = synth.captions(60, 3, bank)
    assert a == synth.captions(60, 3, bank) == synth.captions(60, 3)
    assert synth.captions(7, 3, bank) == a[:7]
    assert [synth.caption(3, i, bank)[0] for i in (59, 10, 0)] == [a[59], a[10], a[0]]
    assert synth.captions(60, 4, bank) != a
    assert len(set(a)) > 40


def test_caption_metadata_names_the_class():
    bank = synth.load_bank()
    metas = [synth.caption(1, i, bank) for i in range(300)]
    classes = {m["class"] for _, m in metas}
    assert -1 in classes and len(classes - {-1}) == len(SHAPES)
    for text, m in metas:
        named = [c for c in SHAPES if re.search(rf"\b{c}\b", text)]
        if m["class"] == -1:
            assert named == [] and m["label"] in bank["concepts"]
        else:
            assert named == [SHAPES[m["class"]]] and m["label"] == SHAPES[m["class"]]


def test_bank_rejects_class_names_outside_classes():
    bank = dict(synth.load_bank())
    bank["settings"] = bank["settings"] + ["next to a star"]
    with pytest.raises(ValueError, match="names the class 'star'"):
        synth.check_bank(bank)


def test_tokenizer_from_open_clip_matches_simple_tokenizer(tiny_sd):
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    st = SimpleTokenizer()
    built = clip_tokenizer_from_open_clip()
    saved = CLIPTokenizer.from_pretrained(tiny_sd / "tokenizer", local_files_only=True)
    texts = synth.captions(5, 0) + ["A Crescent, large & crimson!! over a pale backdrop."]
    for text in texts:
        want = [st.encoder["<start_of_text>"]] + st.encode(text) + [st.encoder["<end_of_text>"]]
        assert built(text).input_ids == want
        assert saved(text).input_ids == want
    assert len(built) == 49408 and saved.model_max_length == 77


# -- diffusion -----------------------------------------------------------------------------------

def test_diffusion_shards_are_valid(reference):
    names = sorted(p.name for p in reference.iterdir())
    assert names == ["sizes.json", "synth-000000.tar", "synth-000001.tar", "synth-000002.tar"]
    assert json.loads((reference / "sizes.json").read_text()) == {
        "synth-000000.tar": 3, "synth-000001.tar": 3, "synth-000002.tar": 2}
    samples = list(shards.iter_samples(reference))
    assert [s["key"] for s in samples] == [synth.sample_key(i) for i in range(8)]
    bank = synth.load_bank()
    for i, s in enumerate(samples):
        assert s["image"].shape == (16, 16, 3)
        text, cap = synth.caption(5, i, bank)
        assert s["caption"] == text
        m = s["meta"]
        assert {"class", "label", "source", "seed", "index", "prompt"} <= set(m)
        assert (m["class"], m["label"], m["source"], m["seed"], m["index"], m["prompt"]) == (
            cap["class"], cap["label"], "diffusion", 5, i, text)
        assert m["generator"]["model"] == "tiny-sd" and m["generator"]["steps"] == 2
    assert len({s["image"].tobytes() for s in samples}) == 8
    assert shards.collate(samples)["labels"].tolist() == [s["meta"]["class"] for s in samples]


def test_image_independent_of_batch_size(reference, tiny_sd, tmp_path):
    r = synth.generate(diffusion_params(tiny_sd, batch_size=1), tmp_path, progress=False)
    assert r["complete"]
    assert files(tmp_path) == files(reference)


def test_resume_regenerates_only_missing_shard(reference, tiny_sd, tmp_path):
    out = tmp_path / "synth"
    shutil.copytree(reference, out)
    (out / "synth-000001.tar").unlink()
    before = {n: ((out / n).stat().st_ino, (out / n).stat().st_mtime_ns)
              for n in ("synth-000000.tar", "synth-000002.tar")}
    r = synth.generate(diffusion_params(tiny_sd), out, progress=False)
    assert (r["generated"], r["skipped"], r["images"], r["complete"]) == (1, 2, 3, True)
    after = {n: ((out / n).stat().st_ino, (out / n).stat().st_mtime_ns) for n in before}
    assert after == before
    assert files(out) == files(reference)
    # nothing to do: nothing is rewritten
    stats = {f.name: (f.stat().st_ino, f.stat().st_mtime_ns) for f in out.iterdir()}
    r = synth.generate(diffusion_params(tiny_sd), out, progress=False)
    assert (r["generated"], r["images"], r["complete"]) == (0, 0, True)
    assert {f.name: (f.stat().st_ino, f.stat().st_mtime_ns) for f in out.iterdir()} == stats


def test_two_ranks_union_equals_one_rank(reference, tiny_sd, tmp_path):
    r0 = synth.generate(diffusion_params(tiny_sd), tmp_path, rank=0, world_size=2, progress=False)
    assert r0["complete"] is False and not (tmp_path / "sizes.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synth-000000.tar", "synth-000002.tar"]
    r1 = synth.generate(diffusion_params(tiny_sd), tmp_path, rank=1, world_size=2, progress=False)
    assert r1["complete"] is True and r1["generated"] == 1
    assert files(tmp_path) == files(reference)


# -- procedural ----------------------------------------------------------------------------------

PROC = {"generator": "procedural", "n": 25, "seed": 11, "per_shard": 10, "image_size": 24, "world": "shifted"}


def test_procedural_byte_identical(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    synth.generate(PROC, a, progress=False)
    synth.generate(PROC, b, progress=True)
    assert files(a) == files(b)
    samples = list(shards.iter_samples(a))
    assert len(samples) == 25 and samples[0]["image"].shape == (24, 24, 3)
    m = samples[3]["meta"]
    assert m["source"] == "procedural-shifted" and m["index"] == 3 and m["seed"] == 11
    assert m["prompt"] == samples[3]["caption"] and SHAPES[m["class"]] == m["label"]
    assert m["label"] in samples[3]["caption"]


def test_resume_detects_changed_params_and_tampering(tmp_path):
    synth.generate(PROC, tmp_path, progress=False)
    first = files(tmp_path)
    # another seed: every shard is stale
    r = synth.generate({**PROC, "seed": 12}, tmp_path, progress=False)
    assert r["generated"] == 3
    # back to the first seed, fewer samples: shard 0 regenerated, shard 1 shorter, shard 2 removed
    r = synth.generate({**PROC, "n": 15}, tmp_path, progress=False)
    assert r["generated"] == 2 and r["complete"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sizes.json", "synth-000000.tar", "synth-000001.tar"]
    assert files(tmp_path)["synth-000000.tar"] == first["synth-000000.tar"]
    assert shards.num_samples(tmp_path) == 15
    # back to n=25; then a truncated shard and a stray partial are repaired
    synth.generate(PROC, tmp_path, progress=False)
    data = (tmp_path / "synth-000001.tar").read_bytes()
    (tmp_path / "synth-000001.tar").write_bytes(data[: len(data) // 2])
    (tmp_path / "synth-000002.tar.partial").write_bytes(b"junk")
    r = synth.generate(PROC, tmp_path, progress=False)
    assert (r["generated"], r["skipped"]) == (1, 2)
    assert files(tmp_path) == first


def test_resume_redraws_shards_of_another_renderer(tmp_path, monkeypatch):
    synth.generate(PROC, tmp_path, progress=False)
    first = files(tmp_path)
    assert synth.generate(PROC, tmp_path, progress=False)["generated"] == 0
    # data/world.py edited (say, a background drawn another way): same params, every shard is redrawn
    monkeypatch.setattr(synth, "renderer_digest", lambda: "another-renderer")
    r = synth.generate(PROC, tmp_path, progress=False)
    assert (r["generated"], r["skipped"], r["complete"]) == (3, 0, True)
    assert files(tmp_path) != first
    assert {s["meta"]["generator"]["renderer"] for s in shards.iter_samples(tmp_path)} == {"another-renderer"}


def stage_params(tmp_path, synth_section: dict) -> None:
    """The repo's params.yaml with another synth section (the stage validates the whole file first)."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({**params, "synth": synth_section}))


def test_stage_script(tmp_path):
    stage_params(tmp_path, {"generator": "procedural", "n": 6, "seed": 2, "per_shard": 4, "image_size": 32})
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1"}
    res = subprocess.run([sys.executable, str(REPO / "stages" / "synth.py"), "--out", "data/synth"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("\n") == 1 and "generated=2" in res.stdout
    assert shards.num_samples(tmp_path / "data" / "synth") == 6
    stage_params(tmp_path, {"generator": "gan", "n": 6})
    res = subprocess.run([sys.executable, str(REPO / "stages" / "synth.py"), "--out", "data/synth"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and "`synth.generator` = 'gan'" in res.stderr and "Traceback" not in res.stderr


# -- bad params ----------------------------------------------------------------------------------

@pytest.mark.parametrize("change, match", [
    ({"generator": "gan"}, r"`synth.generator` = 'gan' is not allowed; choose procedural or diffusion"),
    ({"height": 30}, r"`synth.height` = 30 is not allowed; Stable Diffusion needs a multiple of 8"),
    ({"width": 100}, r"`synth.width` = 100 is not allowed; .* e.g. 96 or 104"),
    ({"steps": 0}, r"`synth.steps` = 0 is not allowed; set the number of denoising steps >= 1"),
    ({"n": None}, r"`synth.n` = None is not allowed; set it to the number of image-text pairs"),
    ({"guidanc": 2.0}, r"unknown param `synth.guidanc` in params.yaml; did you mean `synth.guidance`\?"),
    ({"scheduler": "euler"}, r"`synth.scheduler` = 'euler' is not allowed"),
    ({"model": None}, r"`synth.model` = None is not allowed; set it to a local diffusers pipeline folder"),
    ({"batch_size": True}, r"synth.batch_size = True has the wrong type"),
])
def test_bad_params(tiny_sd, tmp_path, change, match):
    with pytest.raises(ValueError, match=match):
        synth.generate({**diffusion_params(tiny_sd), **change}, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_missing_model_folder(tmp_path):
    with pytest.raises(ValueError, match=r"model folder .*nope does not exist"):
        synth.generate(diffusion_params(tmp_path / "nope"), tmp_path / "out", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"folder without model_index.json"):
        synth.generate(diffusion_params(tmp_path / "empty"), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_uncached_hub_id_offline_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"cannot load a StableDiffusionPipeline from "
                                         r"'no-such-org/no-such-model': it is not a local folder.*HF_HUB_OFFLINE"):
        synth.generate(diffusion_params("no-such-org/no-such-model"), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_bad_rank(tmp_path):
    with pytest.raises(ValueError, match="need 0 <= rank < world_size"):
        synth.generate(PROC, tmp_path, rank=2, world_size=2, progress=False)
