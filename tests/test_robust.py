"""PGD, FARE, TeCoA and the worst-case robust evaluation, on tensors whose answer is known."""
from __future__ import annotations

import pytest
import torch

from clipshield.attacks.pgd import pgd, project
from clipshield.models import create, frozen_copy
from clipshield.objectives import build_objective
from clipshield.objectives.fare import fare_loss
from clipshield.robust import embedding_distortion, robust_accuracy


def test_pgd_on_a_linear_loss_reaches_the_analytic_optimum():
    torch.manual_seed(0)
    w = torch.randn(2, 3, 8, 8)
    x = torch.rand(2, 3, 8, 8) * 0.5 + 0.25  # far enough from 0 and 1 that the box never binds
    eps = 4 / 255
    x_adv = pgd(lambda z: (w * z).sum(), x, eps, steps=20, step_size=1 / 255, random_start=True)
    # max of <w, z> over the l-inf ball: z = x + eps * sign(w)
    assert torch.allclose(x_adv - x, eps * w.sign(), atol=1e-6)


def test_pgd_with_momentum_also_reaches_it_and_never_leaves_the_ball():
    torch.manual_seed(1)
    w = torch.randn(4, 3, 8, 8)
    x = torch.rand(4, 3, 8, 8)  # values near 0 and 1: the [0,1] box binds
    eps = 8 / 255
    x_adv = pgd(lambda z: (w * z).sum(), x, eps, steps=30, step_size=2 / 255, momentum=0.9)
    assert (x_adv - x).abs().max() <= eps + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert torch.allclose(x_adv, project(x + eps * w.sign(), x, eps), atol=1e-6)


def test_fare_loss_is_the_mean_squared_l2_distance():
    a = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    b = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    # (1 + 4) and (9 + 16), averaged over the batch
    assert fare_loss(a, b).item() == pytest.approx((5 + 25) / 2)


def _batch(n=8, labels=True):
    torch.manual_seed(0)
    return {"images": torch.rand(n, 3, 32, 32), "captions": ["a photo of a red star."] * n,
            "labels": torch.arange(n) % 10 if labels else torch.full((n,), -1)}


@pytest.mark.parametrize("method", ["fare", "tecoa"])
def test_only_vision_parameters_change(method):
    clip = create("smoke-rn", seed=0)
    frozen = frozen_copy(clip)
    objective = build_objective(method, steps=2)
    params = dict(objective.trainable(clip))
    assert params and all(n.startswith("visual.") for n in params)
    before = {n: p.detach().clone() for n, p in clip.model.named_parameters()}
    opt = torch.optim.SGD([p for p in params.values()], lr=0.1)
    loss, _ = objective(_batch(), clip, frozen)
    opt.zero_grad()
    loss.backward()
    opt.step()
    changed = {n for n, p in clip.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith("visual.") for n in changed)


def test_fare_loss_is_zero_at_the_start_without_attack_and_positive_under_attack():
    clip = create("smoke-rn", seed=0)
    frozen = frozen_copy(clip)
    no_attack = build_objective("fare", eps=0.0, steps=1)
    loss, _ = no_attack(_batch(), clip, frozen)
    clip.model.eval()
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    attacked, _ = build_objective("fare", eps=8.0, steps=3)(_batch(), clip, frozen)
    assert attacked.item() > 100 * max(loss.item(), 1e-12)


def test_tecoa_refuses_unlabelled_data():
    clip = create("smoke-rn", seed=0)
    with pytest.raises(ValueError, match="labels"):
        build_objective("tecoa", steps=1)(_batch(labels=False), clip, frozen_copy(clip))


def test_robust_accuracy_is_at_most_clean_accuracy_and_attacks_stay_in_the_ball():
    clip = create("smoke-rn", seed=0)
    batch = _batch(16)
    eps = 4 / 255
    res = robust_accuracy(clip, batch["images"], batch["labels"], eps, steps=3)
    assert res["max_perturbation"] <= eps + 1e-6
    zero = robust_accuracy(clip, batch["images"], batch["labels"], 0.0, steps=1)
    assert res["robust_top1"] <= zero["robust_top1"]


def test_distortion_of_a_model_against_itself_is_zero_clean():
    clip = create("smoke-rn", seed=0)
    d = embedding_distortion(clip, frozen_copy(clip), torch.rand(8, 3, 32, 32), eps=4 / 255, steps=2)
    assert d["distortion_clean"] == pytest.approx(0.0, abs=1e-8)
    assert d["distortion_adv"] > 0


@pytest.mark.parametrize("kwargs, match", [
    ({"eps": -1 / 255}, "outside"), ({"eps": 1.5}, "outside"), ({"steps": 0}, "steps = 0"),
    ({"step_size": 0.0}, "must be > 0")])
def test_pgd_refuses_impossible_settings_before_any_work(kwargs, match):
    calls = []
    with pytest.raises(ValueError, match=match):
        pgd(lambda z: calls.append(1) or z.sum(), torch.rand(1, 3, 4, 4), **{"eps": 4 / 255, **kwargs})
    assert calls == []  # the loss was never evaluated


@pytest.mark.parametrize("method", ["fare", "tecoa"])
@pytest.mark.parametrize("kwargs", [{"eps": -1.0}, {"eps": 256.0}, {"steps": 0}])
def test_objectives_refuse_impossible_settings_when_built(method, kwargs):
    with pytest.raises(ValueError):
        build_objective(method, **kwargs)


def test_unknown_objective_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown objective 'fair'; valid: clip, finetune, cleanclip, par, fare, tecoa"):
        build_objective("fair")


@pytest.mark.parametrize("n_classes", [5, 12])
def test_apgd_t_targets_the_nine_most_likely_wrong_classes_of_each_sample(n_classes, monkeypatch):
    import torchattacks

    from clipshield.data.classes import ClassSpace
    from clipshield.evaluation import class_embeddings
    from clipshield.robust import ZeroShotClassifier
    clip = create("smoke-rn", seed=0)
    space = ClassSpace(tuple(f"thing{i}" for i in range(n_classes)), ("a photo of a {}.",), "test")
    images = _batch(6)["images"]
    clf = ZeroShotClassifier(clip, class_embeddings(clip, space)).eval()
    with torch.no_grad():
        logits = clf(images)
    labels = logits.argmax(-1)  # every sample correct: APGD-T attacks all of them
    seen = []
    original = torchattacks.APGDT.dlr_loss_targeted

    def spy(self, x, y, y_target):
        seen.append(y_target.detach().cpu().clone())
        return original(self, x, y, y_target)
    monkeypatch.setattr(torchattacks.APGDT, "dlr_loss_targeted", spy)
    # eps 0: nothing is ever fooled, so every target runs on every sample
    res = robust_accuracy(clip, images, labels, 0.0, steps=2, classes=space)
    assert res["robust_top1"] == 1.0
    targets = [set() for _ in labels]
    for y_target in seen:
        for i, t in enumerate(y_target.tolist()):
            targets[i].add(t)
    expected = min(9, n_classes - 1)
    for i, got in enumerate(targets):
        ranked = [c for c in logits[i].argsort(descending=True).tolist() if c != labels[i]]
        assert len(got) == expected
        assert got == set(ranked[:expected])


def test_n_target_classes_must_be_positive():
    from clipshield.robust import target_classes
    assert target_classes(1000) == 9 and target_classes(10) == 9 and target_classes(4) == 3
    with pytest.raises(ValueError, match="n_target_classes"):
        target_classes(10, 0)


def test_pgd_momentum_is_the_reference_renormalised_sign_a_no_op_where_the_gradient_is_not_zero():
    torch.manual_seed(2)
    w = torch.randn(3, 3, 8, 8)
    x = torch.rand(3, 3, 8, 8)
    noise = torch.rand(x.shape) * 2 - 1
    loss = lambda z: (w * torch.tanh(4 * z - 2)).sum() + (z - 0.5).pow(3).sum()  # noqa: E731  (gradients never 0)
    plain = pgd(loss, x, 8 / 255, steps=6, step_size=1 / 255, start_noise=noise)
    heavy = pgd(loss, x, 8 / 255, steps=6, step_size=1 / 255, start_noise=noise, momentum=0.9)
    assert torch.equal(plain, heavy)


def test_pgd_momentum_carries_the_last_direction_over_a_zero_gradient():
    x = torch.full((1, 1, 2, 2), 0.5)
    calls = []

    def loss(z):  # gradient +1 at the first step, 0 afterwards
        calls.append(1)
        return z.sum() * (1.0 if len(calls) == 1 else 0.0)
    still = pgd(loss, x, 8 / 255, steps=4, step_size=1 / 255, random_start=False, momentum=0.0)
    calls.clear()
    moving = pgd(loss, x, 8 / 255, steps=4, step_size=1 / 255, random_start=False, momentum=0.9)
    assert torch.allclose(still - x, torch.full_like(x, 1 / 255))   # one step, then sign(0) = 0
    assert torch.allclose(moving - x, torch.full_like(x, 4 / 255))  # v = sign(0.9 v + 0) = v: four steps


def test_robust_accuracy_says_how_many_samples_each_attack_ran_on(capsys):
    """APGD-T runs only on what APGD-CE left correct: the stage's log says on how many, with the targets per sample."""
    from clipshield.robust import robust_batch
    clip = create("tiny-rn", seed=0)
    images = torch.rand(6, 3, 32, 32)
    from clipshield.evaluation import class_embeddings, encode_images, zeroshot_logits
    labels = zeroshot_logits(encode_images(clip, images), class_embeddings(clip)).argmax(-1)  # all correct clean
    labels[:2] = (labels[:2] + 1) % 10  # two wrong from the start: never attacked
    out = robust_accuracy(clip, images, labels, eps=0.0001, steps=1)
    log = capsys.readouterr()
    line = " ".join((log.out + log.err).split())
    assert "APGD-CE ran on 4 of 6" in line and "9 target classes each" in line, line
    assert out["robust_top1"] <= 4 / 6 + 1e-6
    attacked = [0, 0]
    robust_batch(lambda x: torch.zeros(len(x), 3), [lambda x, y: x, lambda x, y: x], images, torch.zeros(6).long(), 0.1,
                 attacked)
    assert attacked == [6, 6]
