import math

import pytest
import torch

from clipshield.evaluation import (asr_per_target, attack_success_rate, class_embeddings_from_templates, recall_at_k,
                                   retrieval_asr, top1, zeroshot_logits)


def test_zeroshot_logits_hand():
    img = torch.tensor([[3.0, 4.0], [0.0, -2.0]])      # normalised: (0.6, 0.8), (0, -1)
    classes = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    logits = zeroshot_logits(img, classes)
    assert torch.allclose(logits, torch.tensor([[60.0, 80.0], [0.0, -100.0]]))
    assert top1(logits, torch.tensor([1, 0])) == 1.0
    assert top1(logits, torch.tensor([0, 0])) == 0.5
    assert top1(logits, torch.tensor([0, 1])) == 0.0


def test_class_embeddings_normalised_mean_of_normalised_rows():
    feats = torch.tensor([[[2.0, 0.0], [0.0, 3.0]],       # -> (1,0),(0,1) -> mean (.5,.5) -> (1/sqrt2, 1/sqrt2)
                          [[0.0, -5.0], [0.0, -0.5]]])    # -> (0,-1),(0,-1) -> (0,-1)
    emb = class_embeddings_from_templates(feats)
    r = 1 / math.sqrt(2)
    assert torch.allclose(emb, torch.tensor([[r, r], [0.0, -1.0]]))
    # the plain mean of the raw rows would give (1, 1.5)/|.| instead
    assert not torch.allclose(emb[0], torch.nn.functional.normalize(torch.tensor([1.0, 1.5]), dim=0))


def test_attack_success_rate_hand():
    pred = torch.tensor([2, 2, 0, 2, 1])
    labels = torch.tensor([0, 2, 1, 3, 2])
    asr = attack_success_rate(pred, labels, target=2)
    # non-target images: 0, 2, 3 -> hits at 0 and 3 -> 2/3; all images: hits at 0, 1, 3 -> 3/5
    assert asr["asr"] == pytest.approx(2 / 3)
    assert asr["asr_all"] == pytest.approx(0.6)


def test_attack_success_rate_only_target_images():
    asr = attack_success_rate(torch.tensor([1, 1]), torch.tensor([1, 1]), target=1)
    assert math.isnan(asr["asr"]) and asr["asr_all"] == 1.0


def test_asr_per_target_is_attack_success_rate_for_every_class():
    pred = torch.tensor([2, 2, 0, 2, 1])
    labels = torch.tensor([0, 2, 1, 3, 2])
    per = asr_per_target(pred, labels, n_classes=5)
    # class 0: images 1-4 are not 0, image 2 is called 0 -> 1/4; class 1: images 0, 1, 3, 4, image 4 -> 1/4;
    # class 2: 2/3 (above); class 3: nothing is called 3 -> 0; class 4: no image of class 4, none called 4 -> 0/5
    assert per.tolist() == pytest.approx([1 / 4, 1 / 4, 2 / 3, 0.0, 0.0])
    for c in range(4):
        assert per[c].item() == pytest.approx(attack_success_rate(pred, labels, target=c)["asr"])
    assert math.isnan(asr_per_target(torch.tensor([1, 1]), torch.tensor([1, 1]), 2)[1].item())


# Rows = images, columns = texts. Distinct values per row and column; the diagonal is the right pair.
# Rank of the diagonal in its row (i2t):    1, 2, 6, 1, 5, 3   -> R@1 2/6, R@5 5/6
# Rank of the diagonal in its column (t2i): 1, 1, 1, 6, 2, 4   -> R@1 3/6, R@5 5/6
M = torch.tensor([[40, 21, 22, 23, 24, 6],
                  [7, 41, 8, 9, 14, 42],
                  [31, 32, 30, 33, 34, 35],
                  [0, 1, 2, 5, 3, 4],
                  [36, 37, 10, 38, 33.5, 39],
                  [25, 26, 11, 12, 13, 20]], dtype=torch.float64)


def features_with_similarity(m):
    """Image and text features whose cosine similarity matrix is m / R (same order in rows and columns):
    texts are unit vectors e_j; every image row is padded with an extra coordinate to a common norm R."""
    n_img, n_txt = m.shape
    r = m.norm(dim=1).max() + 1
    img = torch.cat([m, (r**2 - m.pow(2).sum(1, keepdim=True)).sqrt()], dim=1)
    txt = torch.eye(n_txt, n_txt + 1, dtype=m.dtype)
    return img.float(), txt.float()


def test_feature_helper():
    img, txt = features_with_similarity(M)
    sim = torch.nn.functional.normalize(img, dim=-1) @ txt.T
    assert torch.equal(sim.argsort(dim=1), M.argsort(dim=1))
    assert torch.equal(sim.argsort(dim=0), M.argsort(dim=0))


def test_recall_at_k_unique_captions():
    img, txt = features_with_similarity(M)
    r = recall_at_k(img, txt, torch.arange(6), ks=(1, 5, 10))
    assert r["i2t_r1"] == pytest.approx(2 / 6)
    assert r["i2t_r5"] == pytest.approx(5 / 6)
    assert r["i2t_r10"] == 1.0     # k larger than the set: everything is retrieved
    assert r["t2i_r1"] == pytest.approx(3 / 6)
    assert r["t2i_r5"] == pytest.approx(5 / 6)
    assert r["t2i_r10"] == 1.0


def test_recall_at_k_duplicate_captions_raise_r1():
    # captions of pairs 1 and 5 are the same text: image 1's top text is 5, image 5's top text is 1,
    # text 5's top image is 1 -> i2t R@1 4/6, t2i R@1 4/6; image 2 and text 3 still miss at 5.
    img, txt = features_with_similarity(M)
    r = recall_at_k(img, txt, torch.tensor([0, 1, 2, 3, 4, 1]), ks=(1, 5))
    assert r["i2t_r1"] == pytest.approx(4 / 6)
    assert r["t2i_r1"] == pytest.approx(4 / 6)
    assert r["i2t_r5"] == pytest.approx(5 / 6)
    assert r["t2i_r5"] == pytest.approx(5 / 6)


def test_recall_at_k_duplicate_captions_raise_r5():
    # pairs 2 and 3 share a caption: image 2's top-5 holds text 3, text 3's top-5 holds image 2
    img, txt = features_with_similarity(M)
    r = recall_at_k(img, txt, torch.tensor([0, 1, 2, 2, 4, 5]), ks=(1, 5))
    assert r["i2t_r1"] == pytest.approx(2 / 6)
    assert r["t2i_r1"] == pytest.approx(3 / 6)
    assert r["i2t_r5"] == 1.0
    assert r["t2i_r5"] == 1.0


def test_retrieval_asr_hand():
    # text 5 names the target; its rank per image: 1, 6, 5
    m = torch.tensor([[1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1], [6, 5, 4, 3, 1, 2]], dtype=torch.float64)
    img, txt = features_with_similarity(m)
    names = torch.tensor([False] * 5 + [True])
    assert retrieval_asr(img, txt, names, k=5) == pytest.approx(2 / 3)
    assert retrieval_asr(img, txt, names, k=1) == pytest.approx(1 / 3)
    assert retrieval_asr(img, txt, names, k=4) == pytest.approx(1 / 3)
    assert retrieval_asr(img, txt, names, k=6) == 1.0
    assert retrieval_asr(img, txt, names, k=50) == 1.0
    assert retrieval_asr(img, txt, torch.zeros(6, dtype=torch.bool), k=5) == 0.0
