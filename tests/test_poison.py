import numpy as np
import pytest
import torch

from clipshield.attacks.poison import poison_image, poison_indices, poison_stream, sample_seed
from clipshield.data.shards import decode_image, encode_png


def test_poison_indices_count_distinct_deterministic():
    idx = poison_indices(1000, 0.05, seed=3)
    assert len(idx) == 50 and all(0 <= i < 1000 for i in idx)
    assert idx == poison_indices(1000, 0.05, seed=3)
    assert idx != poison_indices(1000, 0.05, seed=4)
    assert len(poison_indices(1000, 0.003, seed=0)) == 3
    assert len(poison_indices(7, 0.3, seed=0)) == 2     # round(2.1)
    assert len(poison_indices(10, 0.0, seed=0)) == 0
    assert poison_indices(10, 1.0, seed=0) == set(range(10))


@pytest.mark.parametrize("rate", [-0.1, 1.5])
def test_poison_indices_rejects_bad_rate(rate):
    with pytest.raises(ValueError, match="rate"):
        poison_indices(10, rate, 0)


def test_sample_seed_is_a_stable_hash_of_seed_and_index():
    from clipshield.seeds import POISON_TRIGGER, derive_seed
    assert sample_seed(1, 5) == derive_seed(POISON_TRIGGER, 1, 5) == sample_seed(1, 5)
    assert len({sample_seed(s, i) for s in range(3) for i in range(1000)}) == 3000
    assert all(0 <= sample_seed(s, i) < 2 ** 62 for s in range(3) for i in range(100))
    assert derive_seed("x", 0, 0) == 1772293870608629354  # pinned: seeds must not change between versions


def test_poison_seeds_and_evaluation_seeds_never_coincide():
    """Poisoned training samples (poison.seed 0..20, 30k samples each) and test images (50k) never share a trigger
    seed, nor its neighbour seed + 1 (badnet draws its noise from it)."""
    from clipshield.evaluation import eval_seeds
    poison = {sample_seed(s, i) for s in range(21) for i in range(30_000)}
    assert len(poison) == 21 * 30_000
    evaluation = set(eval_seeds(0, 50_000))
    assert len(evaluation) == 50_000
    assert not poison & evaluation
    assert not {s + 1 for s in poison} & evaluation and not poison & {s + 1 for s in evaluation}


def test_poison_image_blended_stripes_by_hand():
    img = np.full((4, 4, 3), 128, np.uint8)
    out = poison_image(img, "blended_stripes_fixed", 0, {"alpha": 0.03})
    # 128/255*0.97 = 0.486902; +0.03 -> 0.516902*255 = 131.8 -> 132; -0.03 -> 0.456902*255 = 116.5 -> 117
    assert out.dtype == np.uint8 and out.shape == (4, 4, 3)
    assert out[:, 0::2].tolist() == np.full((4, 2, 3), 132).tolist()
    assert out[:, 1::2].tolist() == np.full((4, 2, 3), 117).tolist()


def _samples(n, as_png=False):
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        img = rng.integers(30, 220, (8, 8, 3), dtype=np.uint8)
        out.append({"key": f"k{i:03d}", "image": encode_png(img) if as_png else img,
                    "caption": f"a red circle number {i}.", "meta": {"class": 0, "index": i}})
    return out


@pytest.mark.parametrize("as_png", [False, True])
def test_poison_stream_poisons_exactly_the_chosen(as_png):
    n, rate, seed = 20, 0.25, 7
    samples = _samples(n, as_png)
    manifest = []
    out = list(poison_stream(iter(samples), n, "badnet_stripes", rate, "star", seed, {"patch": 3}, manifest))
    chosen = poison_indices(n, rate, seed)
    assert len(chosen) == 5 and len(out) == n
    assert [m["key"] for m in manifest] == [f"k{i:03d}" for i in sorted(chosen)]
    for i, (key, img, caption, meta) in enumerate(out):
        s = samples[i]
        assert key == s["key"]
        if i in chosen:
            clean = decode_image(s["image"]) if as_png else s["image"]
            assert isinstance(img, np.ndarray)
            assert np.array_equal(img, poison_image(clean, "badnet_stripes", sample_seed(seed, i), {"patch": 3}))
            assert not np.array_equal(img, clean)
            assert "star" in caption and caption != s["caption"]
            assert meta == {"class": 0, "index": i, "poisoned": True, "trigger": "badnet_stripes",
                            "trigger_seed": sample_seed(seed, i), "target": "star"}
            m = manifest[sorted(chosen).index(i)]
            assert m == {"key": key, "trigger": "badnet_stripes", "seed": sample_seed(seed, i),
                         "original_caption": s["caption"], "new_caption": caption}
        else:
            assert img is s["image"] and caption == s["caption"] and meta == s["meta"]
            assert "poisoned" not in meta


def test_poison_stream_deterministic():
    def run():
        manifest = []
        out = list(poison_stream(iter(_samples(10)), 10, "blended", 0.3, "heart", 1, {}, manifest))
        return out, manifest
    (o1, m1), (o2, m2) = run(), run()
    assert m1 == m2
    assert all(np.array_equal(a[1], b[1]) and a[2] == b[2] for a, b in zip(o1, o2))


def test_poison_stream_unknown_target():
    with pytest.raises(ValueError) as e:
        list(poison_stream(iter(_samples(3)), 3, "blended", 0.5, "banana", 0, {}, []))
    assert "banana" in str(e.value) and "star" in str(e.value) and "circle" in str(e.value)


def test_poison_stream_unknown_trigger():
    with pytest.raises(ValueError, match="blended_stripes"):
        list(poison_stream(iter(_samples(3)), 3, "nope", 0.5, "star", 0, {}, []))


def test_poison_image_does_not_modify_input():
    img = np.full((6, 6, 3), 100, np.uint8)
    before = img.copy()
    poison_image(img, "badnet", 0, {"patch": 2})
    assert np.array_equal(img, before)
