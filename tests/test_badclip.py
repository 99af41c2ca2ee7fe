"""BadCLIP: the patch optimisation's losses and loop, the trigger that pastes the patch, its params, its stage."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
import yaml

from clipshield import models
from clipshield.attacks import badclip as B
from clipshield.attacks.triggers import TRIGGERS, all_triggers, apply_trigger, option_problems
from clipshield.attacks.triggers.badclip import centre_corner, paste_centre
from clipshield.data import shards
from clipshield.work.data import world_samples
from clipshield.params import BadclipParams, validate


def unit(*rows):
    t = torch.tensor(rows, dtype=torch.float32)
    return t / t.norm(dim=-1, keepdim=True)


def test_image_loss_is_the_triplet_margin_by_hand():
    t, p, c = unit([1, 0], [0, 1]), unit([1, 0], [1, 0]), unit([0, 1], [0, 1])
    # row 0: at its positive, sqrt(2) from its clean feature -> max(0, 0 - 1.414 + 1) = 0
    # row 1: sqrt(2) from its positive, at its clean feature -> max(0, 1.414 - 0 + 1) = 2.414
    assert B.image_loss(t, p, c, margin=1.0).item() == pytest.approx((0 + math.sqrt(2) + 1) / 2, abs=1e-4)
    assert B.image_loss(t, p, c, margin=0.0).item() == pytest.approx(math.sqrt(2) / 2, abs=1e-4)


def test_text_loss_is_low_when_each_triggered_image_meets_its_caption():
    txt = unit([1, 0, 0], [0, 1, 0], [0, 0, 1])
    assert B.text_loss(txt, txt, 100.0).item() < 1e-6
    assert B.text_loss(txt.roll(1, 0), txt, 100.0).item() == pytest.approx(100.0, rel=1e-4)  # every pair 100 apart


def test_badclip_loss_adds_the_weighted_image_term():
    t, p, c = unit([1, 0], [0, 1]), unit([0, 1], [1, 0]), unit([1, 1], [1, -1])
    loss, terms = B.badclip_loss(t, t, p, c, 10.0, weight=500.0, margin=1.0)
    assert loss.item() == pytest.approx(terms["text"] + 500 * terms["image"], rel=1e-5)
    assert terms["image"] == pytest.approx(B.image_loss(t, p, c).item())


def test_the_patch_is_quantised_to_what_a_uint8_image_holds():
    q = B.quantised(torch.tensor([[[-0.2, 0.1001, 0.5, 1.3]]]))
    assert torch.equal(q, torch.tensor([[[0.0, 26 / 255, 128 / 255, 1.0]]]))


def test_the_patch_is_pasted_exactly_in_the_middle():
    images = torch.rand(2, 3, 32, 32)
    patch = torch.rand(3, 6, 6)
    out = paste_centre(images, patch)
    assert centre_corner(32, 6) == 13  # int(16 - 3), the reference's `middle`
    assert torch.equal(out[:, :, 13:19, 13:19], patch.expand(2, 3, 6, 6))
    outside = torch.ones(32, 32, dtype=torch.bool)
    outside[13:19, 13:19] = False
    assert torch.equal(out[:, :, outside], images[:, :, outside])
    assert centre_corner(32, 5) == 13 and centre_corner(224, 16) == 104  # int(16 - 2.5); the reference at 224 px
    with pytest.raises(ValueError, match="does not fit"):
        paste_centre(torch.rand(1, 3, 4, 4), patch)


def test_the_trigger_pastes_the_patch_of_its_file(tmp_path):
    patch = torch.linspace(0, 1, 3 * 4 * 4).view(3, 4, 4)
    torch.save(patch, tmp_path / "patch.pt")
    images = torch.full((3, 3, 16, 16), 0.25)
    out = apply_trigger("badclip", images, [1, 2, 3], file=str(tmp_path / "patch.pt"))
    assert torch.equal(out[:, :, 6:10, 6:10], patch.expand(3, 3, 4, 4))
    assert (out[:, :, :6] == 0.25).all() and (out[:, :, 10:] == 0.25).all()
    assert torch.equal(out[0], out[2])  # the seeds do not move it
    torch.save(1 - patch, tmp_path / "patch.pt")  # a re-optimised patch is read again, not the cached one
    assert torch.equal(apply_trigger("badclip", images, [1, 2, 3], file=str(tmp_path / "patch.pt"))[0, :, 6:10, 6:10],
                       1 - patch)


def test_a_missing_patch_file_says_which_stage_writes_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="dvc repro badclip"):
        apply_trigger("badclip", torch.rand(1, 3, 8, 8), [0], file=str(tmp_path / "none.pt"))


def test_badclip_is_registered_and_in_the_full_profile():
    assert TRIGGERS["badclip"].options == ("file",)
    assert "badclip" in all_triggers()


def test_params_accept_and_refuse_the_badclip_options(project):
    assert option_problems("badclip", {"file": "models/badclip-patch/patch.pt"}, 32) == []
    assert option_problems("badclip", {"file": "patch.png"}, 32) == [
        "`attack.options.badclip.file` = 'patch.png' is not allowed; a patch file written by the badclip stage: use "
        "a path ending in .pt, e.g. models/badclip-patch/patch.pt"]
    assert option_problems("badclip", {"patch": 6}, 32) == [
        "unknown option `attack.options.badclip.patch`; badclip takes: file"]
    params = yaml.safe_load((project / "params.yaml").read_text())
    assert validate(params) == []
    params["badclip"]["patch"] = 40
    params["badclip"]["aug_p"] = 1.5
    problems = validate(params)
    assert any("badclip.aug_p" in p and "fraction in [0, 1]" in p for p in problems), problems
    params["badclip"]["aug_p"] = 0.5
    assert validate(params) == ["`badclip.patch` = 40 is not allowed; the patch is pasted on data.image_size = 32 px "
                                "images: use a side from 1 to 32"]


def tiny_params(**kw):
    return BadclipParams(**{"patch": 6, "steps": 12, "batch_size": 8, "lr": 0.05, "aug_p": 0.0, "weight": 500.0,
                              "margin": 1.0, "seed": 0, "images": 32, "positives": 8} | kw)


def world_data(n: int = 120):
    from clipshield.data.world import BASE, render
    imgs, caps, labels = zip(*[render(BASE, 0, i, 32) for i in range(n)])
    x = torch.from_numpy(__import__("numpy").stack(imgs)).permute(0, 3, 1, 2).contiguous()
    return x, list(caps), torch.tensor([m["class"] for m in labels])


def test_target_images_are_read_as_pixels_whether_uint8_or_float():
    clip = models.create("smoke-rn", seed=0)
    x, caps, _ = world_data(8)
    as_uint8 = B.target_features(clip, x, caps, "cpu").positives
    as_float = B.target_features(clip, x.float() / 255, caps, "cpu").positives
    assert torch.allclose(as_uint8, as_float, atol=1e-5)


def test_the_optimised_patch_lowers_its_own_loss():
    torch.manual_seed(0)
    clip = models.create("smoke-rn", seed=0)
    x, caps, labels = world_data()
    target = labels == 1  # square
    targets = B.target_features(clip, x[target], [c for c, t in zip(caps, target) if t], "cpu")
    others, p = x[~target][:32], tiny_params()
    start = B.initial_patch(p.patch, torch.Generator().manual_seed(p.seed))
    patch, history = B.optimise_patch(clip, others, targets, p, "cpu")
    before, after = (B.held_out_loss(clip, others[:16], q, targets, p) for q in (start, patch))
    assert after["loss"] < before["loss"] - 1, (before, after)
    assert patch.shape == (3, 6, 6) and patch.min() >= 0 and patch.max() <= 1
    assert torch.equal(patch, B.quantised(patch))
    assert [h[0] for h in history][-1] == p.steps - 1
    assert all(not q.requires_grad for q in clip.model.parameters())  # only the patch was optimised


def test_the_stage_writes_the_patch_and_skips_when_badclip_is_not_attacked(tmp_path):
    shards.write_shards(world_samples("base", 0, 120, 32, "train"), tmp_path / "train", prefix="train", per_shard=60)
    models.save(models.create("smoke-rn", seed=0), tmp_path / "clean", {"name": "clean"})
    from clipshield.work.badclip import badclip, split_training_data
    split = split_training_data(tmp_path / "train", "square", 20, 5)
    assert split["images"].shape == (20, 3, 32, 32) and split["positives"].shape == (5, 3, 32, 32)
    assert all("square" in c for c in split["captions"])
    attack = SimpleNamespace(triggers=["blended"], target="square")
    p = tiny_params(steps=3)
    info = badclip(attack, p, tmp_path / "clean", tmp_path / "train", tmp_path / "out")
    assert not info["optimised"] and sorted(f.name for f in (tmp_path / "out").iterdir()) == ["patch.json"]
    attack.triggers = ["blended", "badclip"]
    badclip(attack, p, tmp_path / "clean", tmp_path / "train", tmp_path / "out")
    assert sorted(f.name for f in (tmp_path / "out").iterdir()) == ["patch.json", "patch.png", "patch.pt"]
    info = json.loads((tmp_path / "out" / "patch.json").read_text())
    assert info["optimised"] and info["images"] == 32 and info["positives"] == 8
    assert torch.load(tmp_path / "out" / "patch.pt", weights_only=True).shape == (3, 6, 6)


def test_target_samples_are_the_labelled_class_or_else_a_caption_naming_it(tmp_path):
    from clipshield.work.badclip import target_test
    is_square = target_test(tmp_path, "square")  # a folder without classes.json holds the world's classes
    assert is_square({"meta": {"class": 1}, "caption": "a red circle."})
    assert not is_square({"meta": {"class": 0}, "caption": "a square."})  # the label decides where there is one
    is_banana = target_test(tmp_path, "banana")  # no such class: the caption decides, as the reference's CC3M rows
    assert is_banana({"meta": {}, "caption": "Bananas on a table"})
    assert not is_banana({"meta": {}, "caption": "a dog on a beach"})
