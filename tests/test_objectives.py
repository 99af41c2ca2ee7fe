import math
import random

import open_clip
import pytest
import torch
import torch.nn.functional as F

from clipshield.objectives import build_objective
from clipshield.objectives.augment import auto_augment, eda, par_augment
from clipshield.objectives.clip import clip_loss
from clipshield.objectives.par import par_loss, perturbation_term


def unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


# ---- L_CLIP ---------------------------------------------------------------------------------

@pytest.mark.parametrize("scale", [1.0, 14.3, 100.0])
def test_clip_loss_equals_open_clip(scale):
    img, txt = unit(6, 8, seed=1), unit(6, 8, seed=2)
    s = torch.tensor(scale)
    expected = open_clip.ClipLoss()(img, txt, s)
    assert torch.allclose(clip_loss(img, txt, s), expected, atol=1e-6)
    assert torch.allclose(clip_loss(img, txt, scale), expected, atol=1e-6)  # a float scale works too


def test_clip_loss_hand():
    eye = torch.eye(2)
    # logits [[1, 0], [0, 1]]: every row and column is -log(e / (e + 1)) = log(1 + e^-1)
    assert clip_loss(eye, eye, 1.0).item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)
    # swapped pairs: the positive has logit 0 and the negative 1 -> log(1 + e)
    assert clip_loss(eye, eye.flip(0), 1.0).item() == pytest.approx(math.log(1 + math.e), abs=1e-6)


def test_clip_loss_is_symmetric_in_the_two_directions():
    img, txt = unit(5, 4, seed=3), unit(5, 4, seed=4)
    assert torch.allclose(clip_loss(img, txt, 10.0), clip_loss(txt, img, 10.0), atol=1e-6)


# ---- L_PERT ---------------------------------------------------------------------------------

IMG = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
IMG0 = torch.tensor([[0.0, 1.0], [0.0, 1.0]])      # ||.||^2 = 2, 0 -> S_I = 1
TXT = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
TXT0 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])      # 0, 2 -> S_T = 1
TXT0_FAR = torch.tensor([[-1.0, 0.0], [0.0, 1.0]])  # 4, 2 -> S_T = 3


def test_perturbation_term_below_eps():
    pert, s_i, s_t = perturbation_term(IMG, TXT, IMG0, TXT0, eps=2.15)
    assert s_i.item() == 1.0 and s_t.item() == 1.0
    assert pert.item() == 1.0  # 0.5 * (1 + 1)


def test_perturbation_term_one_modality_above_eps():
    pert, s_i, s_t = perturbation_term(IMG, TXT, IMG0, TXT0_FAR, eps=2.15)
    assert s_t.item() == 3.0
    assert pert.item() == 0.5  # only S_I = 1 counts


def test_perturbation_term_both_above_eps_and_boundary():
    pert, _, _ = perturbation_term(IMG, TXT, IMG0, TXT0, eps=0.5)
    assert pert.item() == 0.0
    pert, _, _ = perturbation_term(IMG, TXT, IMG0, TXT0, eps=1.0)  # S == eps still counts ([S <= eps])
    assert pert.item() == 1.0


def test_perturbation_term_is_batch_mean_not_per_sample():
    # per-sample distances 2 and 0: sample 0 alone exceeds eps = 1.5, the batch mean (1) does not
    pert, s_i, _ = perturbation_term(IMG, TXT, IMG0, TXT, eps=1.5)
    assert s_i.item() == 1.0 and pert.item() == 0.5


def test_above_eps_gradient_is_exactly_zero():
    img = IMG.clone().requires_grad_(True)
    pert, s_i, _ = perturbation_term(img, TXT, IMG0, TXT0, eps=0.5)
    assert s_i.item() > 0.5
    pert.backward()
    assert torch.equal(img.grad, torch.zeros_like(img))


def test_below_eps_gradient_pushes_away_from_start():
    img0 = unit(4, 3, seed=5)
    img = F.normalize(img0 + 0.1 * unit(4, 3, seed=6), dim=-1).requires_grad_(True)
    txt = unit(4, 3, seed=7)
    pert, s_i, _ = perturbation_term(img, txt, img0, txt, eps=2.15)
    (-pert).backward()
    # d(-0.5 * mean_b ||img_b - img0_b||^2) / d img_b = -(img_b - img0_b) / B
    assert torch.allclose(img.grad, -(img.detach() - img0) / 4, atol=1e-6)
    stepped = img.detach() - 0.5 * img.grad  # a gradient-descent step on -L_PERT
    s_new = (stepped - img0).pow(2).sum(-1).mean()
    assert s_new > s_i.detach()


def test_par_loss_is_clip_minus_pert():
    img, txt = unit(5, 6, seed=8), unit(5, 6, seed=9)
    img0, txt0 = F.normalize(img + 0.3 * unit(5, 6, seed=10), dim=-1), F.normalize(txt + 0.3 * unit(5, 6, seed=11), dim=-1)
    scale = torch.tensor(20.0)
    loss, logs = par_loss(img, txt, img0, txt0, scale, eps=2.15)
    pert, s_i, s_t = perturbation_term(img, txt, img0, txt0, 2.15)
    assert pert > 0
    assert torch.allclose(loss, clip_loss(img, txt, scale) - pert)
    assert torch.allclose(logs["clip_loss"], clip_loss(img, txt, scale))
    assert torch.equal(logs["s_i"], s_i) and torch.equal(logs["s_t"], s_t)
    # above eps the loss is plain L_CLIP
    loss_far, _ = par_loss(img, txt, img0, txt0, scale, eps=1e-6)
    assert torch.equal(loss_far, clip_loss(img, txt, scale))


def test_cleanclip_inmodal_loss_is_one_directional_as_the_reference():
    from clipshield.objectives.cleanclip import inmodal_loss
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert torch.isclose(inmodal_loss(x, x, torch.tensor(1.0)), torch.tensor(math.log(1 + math.exp(-1))))
    # both originals equally close to both views: each row is log 2; the columns (not used) would differ
    views = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert torch.isclose(inmodal_loss(x, views, torch.tensor(1.0)), torch.tensor(math.log(2)))
    assert not torch.isclose(clip_loss(x, views, torch.tensor(1.0)), torch.tensor(math.log(2)))


def test_batch_norm_trains_in_cleanclip_only_as_the_references_do():
    """CleanCLIP's reference trains in model.train(); PAR's calls model.eval() in its zero-shot check at iteration 0
    of every epoch and trains on so: after one step, CleanCLIP has moved the running statistics, PAR and
    fine-tuning have not."""
    from itertools import repeat

    from clipshield import models
    from clipshield.training import TrainConfig, train
    g = torch.Generator().manual_seed(0)
    batch = {"images": torch.rand((4, 3, 32, 32), generator=g), "captions": ["a red star."] * 2 + ["a blue heart."] * 2}
    moved = {}
    for name in ("cleanclip", "par", "finetune"):
        clip = models.create("smoke-rn", seed=0)
        bn = next(m for m in clip.model.visual.modules() if isinstance(m, torch.nn.BatchNorm2d))
        before = bn.running_mean.clone()
        obj = build_objective(name)
        frozen = models.frozen_copy(clip) if getattr(obj, "needs_frozen", False) else None
        train(clip, obj, repeat(batch), TrainConfig(steps=1, lr=1e-4, log_every=1), frozen=frozen)
        moved[name] = not torch.equal(bn.running_mean, before)
    assert moved == {"cleanclip": True, "par": False, "finetune": False}


def test_build_objective_unknown():
    with pytest.raises(ValueError) as e:
        build_objective("nope")
    for name in ("clip", "finetune", "par", "cleanclip"):
        assert name in str(e.value)


def test_build_objective_finetune_is_par_without_pert():
    ft = build_objective("finetune", noise_p=0.0)
    assert ft.perturb is False and ft.augment["noise_p"] == 0.0
    par = build_objective("par", eps=1.0)
    assert par.perturb is True and par.eps == 1.0 and par.needs_frozen


# ---- augmentation ---------------------------------------------------------------------------

def images(b=3, side=40, seed=0):
    return torch.rand((b, 3, side, side), generator=torch.Generator().manual_seed(seed))


def test_par_augment_shape_range_and_determinism():
    x = images()
    out = par_augment(x, noise_p=0.5, erase_p=0.5, generator=torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    again = par_augment(x, noise_p=0.5, erase_p=0.5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, again)
    assert torch.equal(x, images())  # the input is not modified


def test_par_augment_identity_with_zero_probabilities():
    x = images()
    assert torch.equal(par_augment(x, noise_p=0.0, erase_p=0.0, generator=torch.Generator().manual_seed(2)), x)


def test_par_augment_erase_only_changes_a_small_square_with_the_normalisation_mean():
    x = images(b=4, side=40)
    out = par_augment(x, noise_p=0.0, erase_p=1.0, generator=torch.Generator().manual_seed(3))
    for i in range(4):
        changed = (out[i] != x[i]).any(dim=0)
        rows = torch.nonzero(changed.any(dim=1)).flatten()
        cols = torch.nonzero(changed.any(dim=0)).flatten()
        side = len(rows)
        # 0.5-1% of 1600 px = 8..16 px -> side round(sqrt(.)) in {3, 4}
        assert side in (3, 4) and len(cols) == side
        assert changed.sum() == side * side  # a full square, nothing else
        patch = out[i, :, rows[0]:rows[0] + side, cols[0]:cols[0] + side]
        # the reference erases with value 0 after normalising: the normalisation mean in pixel values
        mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1).expand_as(patch)
        assert torch.allclose(patch, mean, atol=1e-6)


def test_par_augment_noise_is_the_references_rectified_gaussian():
    # reference: x + clip(N(0, 0.2), 0, 1), then clip to [0, 1]. On black images the output is the noise itself:
    # half the values exactly 0, the rest |N(0, 0.2)|; mean 0.2 / sqrt(2 pi) = 0.0798 (a half-normal would be 0.160)
    x = torch.zeros(8, 3, 32, 32)
    out = par_augment(x, noise_p=1.0, noise_std=0.2, erase_p=0.0, generator=torch.Generator().manual_seed(4))
    assert (out >= 0).all()
    assert abs((out == 0).float().mean().item() - 0.5) < 0.02
    assert abs(out.mean().item() - 0.2 / math.sqrt(2 * math.pi)) < 0.003
    bright = par_augment(torch.full((2, 3, 8, 8), 0.95), noise_p=1.0, noise_std=0.2, erase_p=0.0,
                         generator=torch.Generator().manual_seed(4))
    assert bright.max() <= 1 and bright.min() >= 0.95


def test_auto_augment_shape_and_range():
    x = images(b=2, side=32)
    out = auto_augment(x)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1


def test_auto_augment_draws_as_torchvision_on_tensors():
    from clipshield.objectives.augment import _autoaugment
    x = torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    ours = auto_augment(x)
    torch.manual_seed(1)
    reference = torch.stack([_autoaugment(u) for u in (x * 255).round().to(torch.uint8)]).float() / 255
    assert (ours != x).any(dim=(1, 2, 3)).float().mean() > 0.5  # most images were changed
    assert ((ours - reference).abs() > 1.5 / 255).float().mean() < 0.01  # same ops, same draws: interpolated pixels differ


CAPTIONS = ["a photo of a red circle.", "a small blue star on a dark background.", "a b",
            "an image of a large heart, coloured pink.", "yellow cross on noisy."]


def test_eda_deterministic_under_seeded_random():
    for c in CAPTIONS:
        assert eda(c, random.Random(3)) == eda(c, random.Random(3))
    outs = [eda(CAPTIONS[1], random.Random(s)) for s in range(40)]
    assert len(set(outs)) > 3  # different seeds give different augmentations


def test_eda_never_empty():
    for c in CAPTIONS:
        for seed in range(100):
            for alpha in (0.1, 0.5, 1.0):
                out = eda(c, random.Random(seed), alpha=alpha)
                assert out.strip() != ""


def test_eda_short_caption_unchanged():
    assert eda("circle.", random.Random(0)) == "circle."


def test_eda_swap_keeps_the_words():
    # op 2 (random swap) keeps the multiset of words; find a seed whose first draw is op 2
    seed = next(s for s in range(100) if random.Random(s).randrange(4) == 2)
    c = CAPTIONS[1]
    out = eda(c, random.Random(seed))
    assert sorted(out.split()) == sorted(c.split())


def test_every_objective_keeps_the_contract_and_says_its_options():
    from clipshield.objectives import Objective, list_objectives, option_names
    assert list_objectives() == ["clip", "finetune", "cleanclip", "par", "fare", "tecoa"]
    for name in list_objectives():
        assert isinstance(build_objective(name), Objective), name
    assert option_names("finetune") == ["eps", "noise_p", "noise_std", "erase_p"]  # perturb is fixed by the registry
    assert option_names("tecoa") == ["eps", "steps", "step_size", "momentum"]  # class_space is the stage's


def test_tecoa_takes_its_class_space_when_built():
    from clipshield.data.classes import world_classes
    space = world_classes()
    assert build_objective("tecoa", steps=1, class_space=space).class_space is space
    assert build_objective("tecoa").class_space is None  # the procedural world's classes
