import json
import math

import pytest
import torch

from clipshield import models
from clipshield.objectives import Objective, build_objective
from clipshield.objectives.clip import ClipObjective, clip_loss
from clipshield.training import TrainConfig, TrainingError, lr_at, param_groups, train


# ---- learning-rate schedules ------------------------------------------------------------------

def test_lr_cosine_with_warmup_hand():
    cfg = TrainConfig(steps=10, lr=1.0, warmup=2, schedule="cosine")
    assert lr_at(0, cfg) == pytest.approx(0.5)     # (0 + 1) / 2
    assert lr_at(1, cfg) == pytest.approx(1.0)     # end of warm-up
    assert lr_at(2, cfg) == pytest.approx(1.0)     # cosine progress 0
    assert lr_at(6, cfg) == pytest.approx(0.5)     # progress 4/8 -> 0.5 (1 + cos(pi/2))
    assert lr_at(9, cfg) == pytest.approx(0.5 * (1 + math.cos(7 * math.pi / 8)))  # 0.0380602
    assert lr_at(9, cfg) == pytest.approx(0.0380602, abs=1e-7)


def test_lr_cosine_without_warmup():
    cfg = TrainConfig(steps=4, lr=0.2)
    assert [round(lr_at(s, cfg), 6) for s in range(4)] == [0.2, round(0.1 * (1 + math.cos(math.pi / 4)), 6), 0.1,
                                                           round(0.1 * (1 + math.cos(3 * math.pi / 4)), 6)]


def test_lr_par_schedule_hand():
    cfg = TrainConfig(steps=10, lr=1.0, schedule="par")
    # first half (5 steps): linear 1.0 -> 0.1, i.e. 1 - 0.9 * step / 5
    assert lr_at(0, cfg) == pytest.approx(1.0)
    assert lr_at(1, cfg) == pytest.approx(0.82)
    assert lr_at(4, cfg) == pytest.approx(0.28)
    # second half: cosine from 0.1 to ~0 over 5 steps
    assert lr_at(5, cfg) == pytest.approx(0.1)
    assert lr_at(7, cfg) == pytest.approx(0.05 * (1 + math.cos(0.4 * math.pi)))   # 0.0654508
    assert lr_at(7, cfg) == pytest.approx(0.0654508, abs=1e-7)
    assert lr_at(9, cfg) == pytest.approx(0.05 * (1 + math.cos(0.8 * math.pi)))   # 0.0095492
    lrs = [lr_at(s, cfg) for s in range(10)]
    assert all(a > b for a, b in zip(lrs, lrs[1:]))  # monotone decreasing


def test_lr_par_paper_values():
    cfg = TrainConfig(steps=1000, lr=3e-5, schedule="par")
    assert lr_at(0, cfg) == pytest.approx(3e-5)
    assert lr_at(500, cfg) == pytest.approx(3e-6)
    assert lr_at(250, cfg) == pytest.approx(1.65e-5)
    assert lr_at(999, cfg) < 1e-9


def test_lr_constant_and_unknown():
    assert lr_at(7, TrainConfig(steps=10, lr=0.3, schedule="constant")) == 0.3
    assert lr_at(0, TrainConfig(steps=10, lr=0.3, warmup=3, schedule="constant")) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="cosine"):
        lr_at(0, TrainConfig(steps=10, lr=0.3, schedule="linear"))


# ---- parameter groups ------------------------------------------------------------------------

class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)
        self.norm = torch.nn.LayerNorm(2)
        self.emb = torch.nn.Parameter(torch.zeros(4, 3))
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.0))


def test_param_groups_toy():
    m = Toy()
    groups = param_groups(list(m.named_parameters()), 0.1)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(groups[0]["params"]) == ids([m.lin.weight, m.emb])
    assert ids(groups[1]["params"]) == ids([m.lin.bias, m.norm.weight, m.norm.bias, m.logit_scale])


def test_param_groups_logit_scale_by_name_even_if_2d():
    p = torch.nn.Parameter(torch.zeros(1, 1))
    w = torch.nn.Parameter(torch.zeros(2, 2))
    groups = param_groups([("logit_scale", p), ("w", w)], 0.5)
    assert groups[0]["params"] == [w] and groups[1]["params"] == [p]


def test_param_groups_real_model():
    clip = models.create("smoke-rn")
    named = list(clip.model.named_parameters())
    groups = param_groups(named, 0.1)
    decay = {id(p) for p in groups[0]["params"]}
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(named)
    for n, p in named:
        assert (id(p) in decay) == (p.ndim >= 2 and n != "logit_scale"), n
    assert id(clip.model.logit_scale) not in decay


# ---- the loop --------------------------------------------------------------------------------

CAPTIONS = ["a red circle.", "a blue square.", "a green triangle.", "a yellow star.",
            "a white ring.", "a pink cross.", "a cyan diamond.", "a brown heart."]


def fixed_batch():
    images = torch.rand((8, 3, 32, 32), generator=torch.Generator().manual_seed(0))
    return {"images": images, "captions": list(CAPTIONS), "labels": torch.arange(8)}


def repeat(batch):
    while True:
        yield {**batch}


@torch.no_grad()
def batch_clip_loss(clip, batch):
    """L_CLIP on `batch` as the loop sees it (train mode: BatchNorm uses the batch's statistics)."""
    clip.model.train()
    img = clip.encode_images(batch["images"], normalize=True)
    txt = clip.encode_texts(batch["captions"], normalize=True)
    loss = clip_loss(img, txt, clip.model.logit_scale.exp()).item()
    clip.model.eval()
    return loss


def test_train_lowers_clip_loss(tmp_path):
    clip = models.create("smoke-rn", seed=0)
    batch = fixed_batch()
    before = batch_clip_loss(clip, batch)
    cfg = TrainConfig(steps=12, lr=2e-3, warmup=0, schedule="constant", weight_decay=0.0, log_every=1)
    result = train(clip, ClipObjective(), repeat(batch), cfg, log_file=tmp_path / "log.jsonl")
    assert not clip.model.training  # the loop leaves the model in eval mode
    after = batch_clip_loss(clip, batch)
    assert after < before - 0.1, (before, after)
    assert result.steps == 12 and len(result.history) == 12
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert result.history[0]["step"] == 1 and result.history[-1]["step"] == 12
    assert result.final_logs == result.history[-1]
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13))


def test_train_logs_every_and_evaluates(tmp_path):
    clip = models.create("smoke-rn", seed=0)
    calls = []

    def evaluate(c):
        calls.append(c.model.training)
        with torch.no_grad():
            c.model.encode_image(fixed_batch()["images"])  # a forward pass, as a real evaluation makes
        return {"acc": 0.5}

    cfg = TrainConfig(steps=4, lr=1e-4, log_every=3, eval_every=2)
    result = train(clip, ClipObjective(), repeat(fixed_batch()), cfg, evaluate=evaluate)
    assert [r["step"] for r in result.history] == [0, 2, 3, 4]  # step 0: the start model, before any update
    assert result.history[0] == {"step": 0, "acc": 0.5}
    assert [("acc" in r) for r in result.history] == [True, True, False, True]
    assert calls == [False, False, False]  # evaluated in eval mode
    assert result.history[1]["lr"] == pytest.approx(lr_at(1, cfg))
    plain = models.create("smoke-rn", seed=0)
    train(plain, ClipObjective(), repeat(fixed_batch()), TrainConfig(steps=4, lr=1e-4, log_every=3))
    trained, untouched = clip.model.state_dict(), plain.model.state_dict()
    assert all(torch.equal(trained[k], untouched[k]) for k in trained)  # evaluating does not change the training


def test_fixed_logit_scale_is_not_trained():
    clip = models.create("smoke-rn", seed=0)
    start = clip.model.logit_scale.detach().clone()
    obj = ClipObjective(fix_logit_scale=True)
    train(clip, obj, repeat(fixed_batch()), TrainConfig(steps=2, lr=1e-2, weight_decay=0.0))
    assert torch.equal(clip.model.logit_scale.detach(), start)
    assert obj.fixed_scale == pytest.approx(math.exp(start.item()))


def test_cleanclip_trains_the_logit_scale_as_its_reference():
    clip = models.create("smoke-rn", seed=0)
    start = clip.model.logit_scale.detach().clone()
    result = train(clip, build_objective("cleanclip"), repeat(fixed_batch()), TrainConfig(steps=2, lr=1e-2, log_every=1))
    assert not torch.equal(clip.model.logit_scale.detach(), start)
    assert result.history[0]["logit_scale"] == pytest.approx(math.exp(start.item()), rel=1e-5)


def test_par_training_moves_away_from_frozen():
    clip = models.create("smoke-rn", seed=0)
    frozen = models.frozen_copy(clip)
    obj = build_objective("par", eps=2.15, noise_p=0.0, erase_p=0.0)
    cfg = TrainConfig(steps=3, lr=1e-3, schedule="par", weight_decay=1e-4, log_every=1)
    result = train(clip, obj, repeat(fixed_batch()), cfg, frozen=frozen)
    assert [set(r) >= {"clip_loss", "s_i", "s_t"} for r in result.history] == [True] * 3
    assert result.history[-1]["s_t"] > result.history[0]["s_t"]
    # the frozen copy did not move
    assert all(not p.requires_grad for p in frozen.model.parameters())
    assert not torch.equal(frozen.model.visual.conv1.weight, clip.model.visual.conv1.weight)


class NanAt(Objective):
    name = "nan-test"

    def __init__(self, at):
        self.at, self.calls = at, 0
        self.inner = ClipObjective()

    def trainable(self, clip):
        return self.inner.trainable(clip)

    def __call__(self, batch, clip, frozen):
        loss, logs = self.inner(batch, clip, frozen)
        if self.calls == self.at:
            loss = loss * float("nan")
        self.calls += 1
        return loss, logs


def test_nan_loss_raises_training_error_naming_step():
    clip = models.create("smoke-rn", seed=0)
    cfg = TrainConfig(steps=5, lr=1e-4, warmup=2)
    with pytest.raises(TrainingError) as e:
        train(clip, NanAt(2), repeat(fixed_batch()), cfg, description="backdoor")
    msg = str(e.value)
    assert "step 2" in msg and "lower the learning rate" in msg and "backdoor" in msg and "nan" in msg
    assert not clip.model.training


def test_nan_at_first_step_changes_nothing():
    clip = models.create("smoke-rn", seed=0)
    before = {k: v.clone() for k, v in clip.model.state_dict().items()}
    with pytest.raises(TrainingError, match="step 0"):
        train(clip, NanAt(0), repeat(fixed_batch()), TrainConfig(steps=3, lr=1e-2))
    after = clip.model.state_dict()
    # parameters are untouched (BatchNorm running statistics did see the forward pass)
    for k, v in before.items():
        if "running" not in k and "num_batches" not in k:
            assert torch.equal(after[k], v), k


def test_no_trainable_parameters():
    class Empty(Objective):
        name = "empty"

        def trainable(self, clip):
            return []

    clip = models.create("smoke-rn", seed=0)
    with pytest.raises(TrainingError, match="no trainable"):
        train(clip, Empty(), repeat(fixed_batch()), TrainConfig(steps=1, lr=1e-3))


def test_par_s_i_is_zero_before_any_update_resnet():
    clip = models.create("smoke-rn", seed=0)
    frozen = models.frozen_copy(clip)
    obj = build_objective("par", eps=2.15, noise_p=0.0, erase_p=0.0)
    cfg = TrainConfig(steps=1, lr=0.0, log_every=1)  # one step that cannot change the weights
    result = train(clip, obj, repeat(fixed_batch()), cfg, frozen=frozen)
    assert result.history[0]["s_t"] == pytest.approx(0.0, abs=1e-6)
    assert result.history[0]["s_i"] == pytest.approx(0.0, abs=1e-6)


def test_dvclive_log_in_a_repository_without_a_commit_is_skipped_with_a_message(tmp_path, monkeypatch, capsys):
    """DVCLive raises on a DVC repository whose git has no commit yet; training must go on, with the JSON log."""
    import subprocess
    import sys

    from clipshield.livelog import LiveLog
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=tmp_path, check=True)
    monkeypatch.chdir(tmp_path)
    live = LiveLog(tmp_path / "dvclive" / "run", {"lr": 0.1})
    live({"step": 1, "loss": 2.0})
    live.end({"train_steps": 1})
    assert live.live is None
    assert "DVCLive log" in capsys.readouterr().err and not (tmp_path / "dvclive" / "run" / "metrics.json").exists()
