"""Gradient accumulation: a step over a batch in k micro-batches equals one pass over the batch, for every
objective (the contrastive ones need every pair of the batch: features are cached, then re-encoded with
their slice of d loss / d features)."""
import pytest
import torch

from clipshield import models
from clipshield.data import shards
from clipshield.objectives import build_objective
from clipshield.pipeline import world_samples
from clipshield.training import TrainConfig, accumulate, split_batch, train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("accum") / "train"
    shards.write_shards(world_samples("base", 0, 64, 32, "train"), folder, prefix="train", per_shard=32)
    return folder


def run(data, model, objective, accum, steps=5):
    torch.manual_seed(0)
    clip = models.create(model, seed=0)
    obj = build_objective(objective)
    frozen = models.frozen_copy(clip) if getattr(obj, "needs_frozen", False) else None
    if objective == "fare":  # FARE's loss starts at ~0 (f = f0): Adam's first step would follow rounding noise
        with torch.no_grad():
            for p in clip.model.visual.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    cfg = TrainConfig(steps=steps, lr=1e-3, warmup=0, schedule="constant", weight_decay=0.0, log_every=1, accum=accum)
    result = train(clip, obj, shards.iter_batches(data, 16, shuffle=32, seed=1), cfg, frozen=frozen)
    return [row["loss"] for row in result.history]


# smoke-rn's batch norm normalises with batch statistics when it trains (clip, and cleanclip as its reference),
# so those are checked on the ViT; the other fine-tuning objectives keep batch norm frozen and are checked on the
# ResNet. Augmentations (PAR's noise and erasing, CleanCLIP's AutoAugment + EDA, PGD's random start) are on.
@pytest.mark.parametrize("model, objective", [("smoke-vit", "clip"), ("smoke-rn", "par"), ("smoke-vit", "cleanclip"),
                                              ("smoke-rn", "finetune"), ("smoke-rn", "fare"), ("smoke-vit", "tecoa")])
def test_accumulated_steps_match_one_pass(data, model, objective):
    one = run(data, model, objective, 1)
    four = run(data, model, objective, 4)
    assert len(one) == len(four) == 5
    assert four == pytest.approx(one, abs=1e-5)
    assert one[-1] != pytest.approx(one[0], abs=1e-4)  # it trained: the comparison is not vacuous


def test_accumulated_gradient_equals_full_batch_gradient(data):
    """One step's gradients, element by element (no optimiser in between): CLIP with a trainable logit scale."""
    torch.manual_seed(0)
    clip = models.create("smoke-vit", seed=0)
    batch = shards.load_all(data, limit=12)
    obj = build_objective("clip")
    params = [p for _, p in obj.trainable(clip)]
    clip.model.train()
    loss, _ = obj(batch, clip, None)
    loss.backward()
    full = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    loss3, _ = accumulate(obj, batch, clip, None, parts=3, bf16=False)
    assert loss3.item() == pytest.approx(loss.item(), abs=1e-6)
    for p, g in zip(params, full):
        torch.testing.assert_close(p.grad, g, atol=1e-6, rtol=1e-4)
    assert clip.model.logit_scale.grad.abs() > 0  # the loss's own parameter got its gradient once


def test_split_batch_cuts_rows_and_refuses_uneven_parts():
    batch = {"images": torch.arange(6).view(6, 1, 1, 1).float(), "captions": list("abcdef"), "labels": torch.arange(6),
             "meta": "kept"}
    parts = split_batch(batch, 3)
    assert [p["captions"] for p in parts] == [["a", "b"], ["c", "d"], ["e", "f"]]
    assert parts[2]["labels"].tolist() == [4, 5] and parts[1]["meta"] == "kept"
    with pytest.raises(ValueError, match="multiple of train.nproc x train.accum"):
        split_batch(batch, 4)
