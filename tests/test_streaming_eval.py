"""Evaluation streamed from the test shards gives exactly the numbers of the in-memory evaluation it replaced."""
from __future__ import annotations

import re

import pytest

from clipshield.data.classes import classes_file, world_classes
import torch

from clipshield.data import shards
from clipshield.evaluation import (attack_success_rate, class_embeddings, encode_images, encode_texts, evaluate_model,
                                   recall_at_k, retrieval_asr, top1, trigger_images, zeroshot_logits)
from clipshield.models import create, frozen_copy
from clipshield.pipeline import during_training, world_samples
from clipshield.params import RobustParams
from clipshield.robust import robust_accuracy, robust_metrics


def in_memory_evaluation(clip, test, triggers, target, retrieval_n):
    """The evaluation as it was before streaming (commit 1291836): every image and feature in memory at once."""
    images, labels, captions = test["images"], test["labels"], test["captions"]
    space = test["classes"]
    classes = class_embeddings(clip, space)
    feats = encode_images(clip, images)
    metrics = {"zeroshot_top1": top1(zeroshot_logits(feats, classes), labels), "n_test": len(labels)}
    n = min(retrieval_n, len(captions))
    texts = encode_texts(clip, captions[:n])
    ids = {c: i for i, c in enumerate(dict.fromkeys(captions[:n]))}
    groups = torch.tensor([ids[c] for c in captions[:n]])
    metrics.update(recall_at_k(feats[:n], texts, groups))
    t = space.index(target)
    names_target = torch.tensor([re.search(rf"\b{target}\b", c) is not None for c in captions[:n]])
    for name, options in triggers.items():
        trig = encode_images(clip, trigger_images(images, name, options))
        pred = zeroshot_logits(trig, classes).argmax(dim=-1)
        suffix = "" if len(triggers) == 1 else f"_{name}"
        asr = attack_success_rate(pred, labels, t)
        metrics[f"asr{suffix}"] = asr["asr"]
        metrics[f"asr_all{suffix}"] = asr["asr_all"]
        keep = labels[:n] != t
        metrics[f"retrieval_asr{suffix}"] = retrieval_asr(trig[:n][keep], texts, names_target)
    return metrics


@pytest.fixture(scope="module")
def test_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stream") / "test"
    shards.write_shards(world_samples("base", 1, 1150, 32, "test"), folder, prefix="test", per_shard=400,
                        extra_files=classes_file(world_classes()))
    return folder


@pytest.fixture(scope="module")
def clip():
    return create("smoke-rn", seed=0)


@pytest.mark.parametrize("limit, retrieval_n", [(1100, 700), (None, 2000), (300, 1000)])
def test_streamed_evaluation_equals_the_in_memory_one_exactly(test_dir, clip, limit, retrieval_n):
    triggers = {"blended": {"alpha": 0.2}, "badnet": {"patch": 4}, "blended_stripes": {"alpha": 0.03}}
    expected = in_memory_evaluation(clip, shards.load_all(test_dir, limit=limit), triggers, "star", retrieval_n)
    streamed = evaluate_model(clip, shards.EvalSet(test_dir, limit=limit), triggers, "star", retrieval_n)
    in_memory = evaluate_model(clip, shards.load_all(test_dir, limit=limit), triggers, "star", retrieval_n)
    assert streamed == expected == in_memory  # bit for bit, every metric
    assert streamed["n_test"] == (limit or 1150)


def test_one_trigger_keeps_the_unsuffixed_names(test_dir, clip):
    expected = in_memory_evaluation(clip, shards.load_all(test_dir, limit=600), {"blended": {}}, "heart", 100)
    assert evaluate_model(clip, shards.EvalSet(test_dir, limit=600), {"blended": {}}, "heart", 100) == expected
    assert "asr" in expected and "asr_blended" not in expected


def test_streamed_robust_metrics_equal_the_in_memory_ones(test_dir, clip):
    import torchattacks

    from clipshield.robust import ZeroShotClassifier, embedding_distortion
    rp = RobustParams(eps=[0.25, 1.0], n=300, steps=2, distortion_n=20)
    test = shards.load_all(test_dir)
    clf = ZeroShotClassifier(clip, class_embeddings(clip, test["classes"])).eval()
    labels = test["labels"]
    first = robust_accuracy(clip, test["images"][:rp.n], labels[:rp.n], rp.eps[0] / 255, rp.steps,
                            classes=test["classes"])["robust_top1"]
    expected = {}
    for e in rp.eps:  # the in-memory code as it was: all n images at once, batches of 250, a mean of booleans
        attacks = [torchattacks.APGD(clf, norm="Linf", eps=e / 255, steps=rp.steps, loss="ce", seed=0),
                   torchattacks.APGDT(clf, norm="Linf", eps=e / 255, steps=rp.steps, seed=0, n_classes=10)]
        robust = []
        for i in range(0, rp.n, 250):
            x, y = test["images"][:rp.n][i:i + 250], labels[:rp.n][i:i + 250]
            with torch.no_grad():
                ok = clf(x).argmax(-1) == y
            for attack in attacks:
                x_adv = attack(x, y)
                with torch.no_grad():
                    ok &= clf(x_adv).argmax(-1) == y
            robust.append(ok)
        expected[f"robust_top1_eps{e:g}".replace(".", "_")] = torch.cat(robust).float().mean().item()
    assert first == expected["robust_top1_eps0_25"]
    reference = frozen_copy(clip)  # the distortion's PGD start draws from the global RNG the attacks left
    expected |= embedding_distortion(clip, reference, test["images"][:rp.distortion_n], max(rp.eps) / 255)
    assert robust_metrics(clip, reference, shards.EvalSet(test_dir), rp) == expected
    assert 0 < expected["robust_top1_eps0_25"]  # something survives: the comparison is not of zeros


def test_a_stream_reads_the_samples_load_all_reads_in_bounded_batches(test_dir):
    whole = shards.load_all(test_dir, limit=1010)
    seen = list(shards.EvalSet(test_dir, limit=1010).batches(250))
    assert [len(b["labels"]) for b in seen] == [250, 250, 250, 250, 10]
    assert [b["start"] for b in seen] == [0, 250, 500, 750, 1000]
    assert torch.equal(torch.cat([b["images"] for b in seen]), whole["images"])
    assert sum((b["captions"] for b in seen), []) == whole["captions"]
    assert len(shards.EvalSet(test_dir)) == 1150 and len(shards.EvalSet(test_dir, limit=7)) == 7


def test_a_cheap_zero_shot_head_keeps_the_present_classes_and_the_first_templates(tmp_path, clip):
    """eval.classes: present / eval.templates: N (quick runs of the 1000-class ImageNet head): the head holds only the
    classes labelling the scored samples, renumbered in label order, with the first N templates; streamed batches and
    head() agree, and the evaluation equals one on a data set labelled in that smaller class space from the start."""
    from clipshield.data.classes import ClassSpace
    space = world_classes()
    samples = [s for s in world_samples("base", 1, 60, 32, "test") if s[3]["class"] in (2, 5, 7)][:12]
    shards.write_shards(iter(samples), tmp_path / "full", prefix="test", per_shard=5, extra_files=classes_file(space))
    small = ClassSpace(tuple(space.names[i] for i in (2, 5, 7)), space.templates[:2], "small")
    renumbered = [(k, img, cap, meta | {"class": (2, 5, 7).index(meta["class"])}) for k, img, cap, meta in samples]
    shards.write_shards(iter(renumbered), tmp_path / "small", prefix="test", per_shard=5, extra_files=classes_file(small))

    cheap = shards.EvalSet(tmp_path / "full", classes="present", templates=2)
    assert cheap.classes.names == small.names and cheap.classes.templates == space.templates[:2]
    assert "eval.classes: present" in cheap.classes.source
    streamed = torch.cat([b["labels"] for b in cheap.batches(5)])
    assert streamed.tolist() == [m["class"] for *_, m in renumbered]
    assert torch.equal(cheap.head(7)["labels"], streamed[:7]) and cheap.head(7)["classes"] == cheap.classes
    target = small.names[1]
    got = evaluate_model(clip, cheap, triggers={"blended": {"alpha": 0.2}}, target=target, retrieval_n=8)
    want = evaluate_model(clip, shards.EvalSet(tmp_path / "small"), triggers={"blended": {"alpha": 0.2}}, target=target,
                          retrieval_n=8)
    assert got == want
    # the default is the test set's own class space, untouched
    assert shards.EvalSet(tmp_path / "full").classes == space
    with pytest.raises(shards.DataError, match="eval.classes"):
        shards.EvalSet(tmp_path / "full", classes="some")


def test_the_evaluation_during_training_is_the_final_one_on_the_first_images(test_dir, clip):
    head = shards.EvalSet(test_dir).head(300)
    full = evaluate_model(clip, shards.load_all(test_dir, limit=300), {"blended": {"alpha": 0.2}}, "star", 300)
    logged = during_training(head, {"blended": {"alpha": 0.2}}, "star")(clip)
    assert logged == {k: full[k] for k in ("zeroshot_top1", "asr", "asr_all")}
    assert during_training(head, None, None)(clip) == {"zeroshot_top1": pytest.approx(full["zeroshot_top1"])}
