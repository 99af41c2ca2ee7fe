import json
import subprocess
import sys
import textwrap

import pytest
import torch

from clipshield import models
from clipshield.models import ModelError


@pytest.fixture(scope="module")
def smoke():
    return models.create("smoke-rn", seed=0)


def test_create_registered_config(smoke):
    assert smoke.name == "smoke-rn" and smoke.image_size == 32
    assert not smoke.model.training
    x = torch.rand((2, 3, 32, 32), generator=torch.Generator().manual_seed(0))
    f = smoke.encode_images(x, normalize=True)
    assert f.shape == (2, smoke.model_cfg["embed_dim"])
    assert torch.allclose(f.norm(dim=-1), torch.ones(2), atol=1e-5)
    t = smoke.encode_texts(["a red circle.", "a star."], normalize=True)
    assert t.shape == (2, smoke.model_cfg["embed_dim"])


def test_encode_images_applies_openai_mean_std(smoke):
    x = torch.rand((2, 3, 32, 32), generator=torch.Generator().manual_seed(1))
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(smoke.encode_images(x), smoke.model.encode_image((x - mean) / std), atol=1e-6)


def test_create_seeded():
    a, b, c = models.create("smoke-rn", seed=0), models.create("smoke-rn", seed=0), models.create("smoke-rn", seed=1)
    sa, sb, sc = a.model.state_dict(), b.model.state_dict(), c.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["visual.conv1.weight"], sc["visual.conv1.weight"])


@pytest.fixture
def counted_register(monkeypatch):
    """models.register_configs, made cheap (the real one rescans all of open_clip's configs) and counted."""
    names = models.register_configs()
    calls = []
    monkeypatch.setattr(models, "register_configs", lambda: calls.append(1) or list(names))
    return calls


def test_create_unknown_names_tiny_configs(counted_register):
    with pytest.raises(ModelError) as e:
        models.create("no-such-model")
    msg = str(e.value)
    assert "no-such-model" in msg
    for name in ("smoke-rn", "tiny-rn", "tiny-rn16", "tiny-vit"):
        assert name in msg


def test_create_unknown_registers_configs_once(counted_register):
    with pytest.raises(ModelError):
        models.create("no-such-model")
    assert len(counted_register) <= 1


def test_saved_folder_loads_in_plain_open_clip(tmp_path):
    clip = models.create("tiny-rn", seed=3)
    out = models.save(clip, tmp_path / "model", {"name": "tiny-test", "stage": "unit"})
    assert sorted(p.name for p in out.iterdir()) == ["open_clip_config.json", "open_clip_model.safetensors",
                                                     "provenance.json"]
    assert not (tmp_path / "model.partial").exists()
    x = torch.rand((3, 3, 32, 32), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = clip.encode_images(x)
    torch.save(x, tmp_path / "x.pt")
    torch.save(expected, tmp_path / "expected.pt")
    script = textwrap.dedent(f"""
        import os, sys
        os.environ["HF_HUB_OFFLINE"] = "1"
        import torch
        torch.set_num_threads(1)
        import open_clip
        model, _, preprocess = open_clip.create_model_and_transforms("local-dir:{out}")
        model.eval()
        normalize = preprocess.transforms[-1]
        assert type(normalize).__name__ == "Normalize", preprocess
        x = torch.load("{tmp_path / 'x.pt'}")
        with torch.no_grad():
            feats = model.encode_image(normalize(x))
        expected = torch.load("{tmp_path / 'expected.pt'}")
        assert "clipshield" not in sys.modules, "the check must not import clipshield"
        assert feats.shape == expected.shape, (feats.shape, expected.shape)
        err = (feats - expected).abs().max().item()
        assert err < 1e-5, err
        tok = open_clip.get_tokenizer("local-dir:{out}")
        assert tok(["a star."]).shape == (1, 20)
        print("OK", err)
    """)
    r = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("OK")


def test_save_load_round_trip(tmp_path, smoke):
    out = models.save(smoke, tmp_path / "m", {"name": "smoke-copy", "steps": 3})
    assert json.loads((out / "provenance.json").read_text()) == {"name": "smoke-copy", "steps": 3}
    cfg = json.loads((out / "open_clip_config.json").read_text())
    assert cfg["model_cfg"] == smoke.model_cfg and cfg["preprocess_cfg"] == smoke.preprocess_cfg
    loaded = models.load(f"local-dir:{out}")
    assert loaded.name == "smoke-copy"
    assert models.load(str(out)).name == "smoke-copy"  # a bare path works too
    assert models.create(f"local-dir:{out}").name == "smoke-copy"
    sd, sl = smoke.model.state_dict(), loaded.model.state_dict()
    assert sd.keys() == sl.keys() and all(torch.equal(sd[k], sl[k]) for k in sd)
    assert models.read_provenance(out)["steps"] == 3
    assert models.read_provenance(tmp_path) == {}


def test_save_replaces_existing_folder(tmp_path, smoke):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "stale.txt").write_text("x")
    models.save(smoke, tmp_path / "m", {})
    assert not (tmp_path / "m" / "stale.txt").exists()


def test_load_missing_folder(tmp_path):
    with pytest.raises(ModelError, match="dvc"):
        models.load(f"local-dir:{tmp_path / 'nope'}")


def test_load_missing_weights(tmp_path, smoke):
    out = models.save(smoke, tmp_path / "m", {})
    (out / "open_clip_model.safetensors").unlink()
    with pytest.raises(ModelError, match="open_clip_model.safetensors"):
        models.load(str(out))


def test_load_truncated_safetensors(tmp_path, smoke):
    out = models.save(smoke, tmp_path / "m", {})
    w = out / "open_clip_model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(ModelError, match="cannot load weights"):
        models.load(f"local-dir:{out}")


def test_frozen_copy_is_independent_and_frozen(smoke):
    frozen = models.frozen_copy(smoke)
    assert frozen.name == "smoke-rn-frozen"
    assert all(not p.requires_grad for p in frozen.model.parameters())
    assert all(p.requires_grad for p in smoke.model.parameters())
    with torch.no_grad():
        before = frozen.model.visual.conv1.weight.clone()
        smoke.model.visual.conv1.weight.add_(1.0)
        try:
            assert torch.equal(frozen.model.visual.conv1.weight, before)
        finally:
            smoke.model.visual.conv1.weight.sub_(1.0)


def test_tokenize_remembers_captions_and_gives_what_the_tokenizer_gives():
    clip = models.create("smoke-rn")
    first = ["a red star.", "a blue ring.", "a red star."]
    assert torch.equal(clip.tokenize(first), clip.tokenizer(first))
    assert len(clip._tokens) == 2  # each caption tokenised once
    again = ["a blue ring.", "a green cross.", "a red star."]
    assert torch.equal(clip.tokenize(again), clip.tokenizer(again))
    assert len(clip._tokens) == 3
