import dataclasses

import numpy as np
import pytest

from clipshield.data import world
from clipshield.data.world import BASE, RENDERED, SHAPES, SHIFTED, get_world, render, target_caption


def test_ten_shape_classes():
    assert len(SHAPES) == 10
    assert len(set(SHAPES)) == 10


def test_render_is_pure():
    a_img, a_cap, a_meta = render(BASE, 7, 3, size=32)
    b_img, b_cap, b_meta = render(BASE, 7, 3, size=32)
    assert a_img.dtype == np.uint8 and a_img.shape == (32, 32, 3)
    assert np.array_equal(a_img, b_img)
    assert a_cap == b_cap
    assert a_meta == b_meta


def test_other_index_or_seed_differs():
    img0, cap0, _ = render(BASE, 7, 3)
    img1, _, _ = render(BASE, 7, 4)
    img2, _, _ = render(BASE, 8, 3)
    assert not np.array_equal(img0, img1)
    assert not np.array_equal(img0, img2)


def test_image_size_is_respected():
    img, _, _ = render(BASE, 0, 0, size=20)
    assert img.shape == (20, 20, 3)


@pytest.mark.parametrize("w", [BASE, SHIFTED])
def test_caption_names_shape_and_colour(w):
    for i in range(40):
        _, caption, meta = render(w, 0, i, size=16)
        assert meta["label"] == SHAPES[meta["class"]]
        assert meta["label"] in caption
        assert meta["colour"] in caption
        assert meta["colour"] in w.colours
        assert meta["background"] in w.backgrounds
        assert meta["index"] == i and meta["seed"] == 0
        assert meta["source"] == f"procedural-{w.name}"


def test_all_classes_appear():
    labels = {render(BASE, 0, i, size=8)[2]["class"] for i in range(200)}
    assert labels == set(range(10))


def test_base_and_shifted_differ():
    assert set(BASE.colours) != set(SHIFTED.colours)
    assert set(BASE.templates).isdisjoint(SHIFTED.templates)
    a, cap_a, _ = render(BASE, 0, 0)
    b, cap_b, _ = render(SHIFTED, 0, 0)
    assert not np.array_equal(a, b)
    # shifted-only colours and backgrounds show up in the shifted world
    metas = [render(SHIFTED, 0, i, size=8)[2] for i in range(100)]
    assert any(m["colour"] not in BASE.colours for m in metas)
    assert any(m["background"] not in BASE.backgrounds for m in metas)


def test_rendered_world_keeps_the_captions_and_changes_the_renderer():
    # the PAR paper's synthetic pairs: the training captions, drawn by another renderer
    assert RENDERED.templates == BASE.templates and set(RENDERED.colours) == set(BASE.colours)
    for name, (r, g, b) in BASE.colours.items():  # every colour 0.05 less red, 0.05 more green (clipped)
        assert RENDERED.colours[name] == pytest.approx((max(0.0, r - 0.05), min(1.0, g + 0.05), b))
    assert RENDERED.backgrounds == BASE.backgrounds and RENDERED.max_rotation_deg > BASE.max_rotation_deg

    def words(world):
        return {w.strip(".,") for i in range(300) for w in render(world, 0, i, size=8)[1].split()}

    assert words(RENDERED) == words(BASE)  # not one caption word the pre-training never saw, none missing


def test_rendered_world_draws_grey_shaded_and_noise_as_specks():
    assert RENDERED.drawn_as == {"grey": "shaded", "noisy": "speckled"}
    rng = np.random.default_rng(0)
    for _ in range(20):
        flat, shaded = world._background("grey", rng, 32), world._background("shaded", rng, 32)
        assert np.ptp(flat, axis=(0, 1)).max() < 1e-9  # one level per channel, flat
        ramp = shaded.mean(axis=2)
        assert max(np.ptp(ramp[0]), np.ptp(ramp[:, 0])) >= 0.1  # a ramp along one axis...
        assert min(np.ptp(ramp[0]), np.ptp(ramp[:, 0])) < 1e-9  # ...constant along the other
        assert np.ptp(shaded, axis=2).max() <= 0.2 + 1e-9  # still grey: channels within 2 x 0.05 tint
    # the renderer follows drawn_as: "grey" drawn as "light" makes most pixels light, the caption still says grey
    light_grey = dataclasses.replace(BASE, drawn_as={"grey": "light"})
    i = next(i for i in range(200) if render(BASE, 0, i)[2]["background"] == "grey")
    (grey_img, _, grey_meta), (light_img, _, light_meta) = render(BASE, 0, i), render(light_grey, 0, i)
    assert grey_meta["background"] == light_meta["background"] == "grey"
    assert np.median(grey_img) < 0.65 * 255 < 0.75 * 255 < np.median(light_img)


def test_get_world():
    assert get_world("base") is BASE
    assert get_world("shifted") is SHIFTED
    assert get_world("rendered") is RENDERED


def test_unknown_world_lists_valid_ones():
    with pytest.raises(ValueError) as e:
        get_world("nope")
    msg = str(e.value)
    assert "nope" in msg and "base" in msg and "shifted" in msg


def test_shape_is_drawn_in_its_colour():
    # the foreground colour must be present: some pixel close to the nominal colour
    img, _, meta = render(BASE, 3, 11, size=32)
    colour = np.array(BASE.colours[meta["colour"]]) * 255
    dist = np.abs(img.astype(float) - colour).max(axis=-1)
    assert (dist < 40).sum() >= 10


def test_target_caption_names_target():
    rng = np.random.default_rng(0)
    for _ in range(20):
        cap = target_caption("banana", rng)
        assert "banana" in cap
    assert target_caption("star", np.random.default_rng(5)) == target_caption("star", np.random.default_rng(5))


def test_the_base_worlds_render_as_they_always_have():
    """Pins the captions, metadata and pixel sums of the worlds every committed run was made with: a change to the
    renderer (such as the dense worlds' extra shapes) must leave them as they were. Pixel sums get a tolerance of
    a few levels: sin and cos may round differently on another CPU; a changed draw moves them by thousands."""
    import hashlib
    h, sums = hashlib.sha256(), []
    for w in (BASE, RENDERED, SHIFTED):
        for i in range(8):
            img, cap, meta = render(w, 3, i)
            h.update(cap.encode() + repr(sorted(meta.items())).encode())
            sums.append(int(img.astype(np.int64).sum()))
    assert h.hexdigest()[:16] == "6519f1987a8d15fd"
    pinned = [150944, 387773, 291155, 530621, 456715, 198785, 309250, 477475, 154703, 347236, 352838, 526495, 428095,
              203000, 343872, 477131, 158401, 334687, 367437, 529771, 412479, 210957, 418812, 398727]
    assert np.abs(np.array(sums) - pinned).max() <= 20


def test_dense_world_adds_up_to_two_other_shapes_each_named_in_the_caption():
    dense = get_world("dense")
    counts = set()
    for i in range(200):
        img, caption, meta = render(dense, 0, i)
        counts.add(len(meta["extras"]))
        head = caption.split(" with ")[0]
        assert meta["label"] in head and meta["colour"] in head  # the main shape first, as the base world says it
        for colour, shape in meta["extras"]:
            assert shape != meta["label"] and colour in dense.colours and f"a {colour} {shape}" in caption
        if meta["extras"]:
            assert caption.endswith(" with " + " and ".join(f"a {c} {s}" for c, s in meta["extras"]) + ".")
    assert counts == {0, 1, 2}
    assert "extras" not in render(BASE, 0, 0)[2]
    # the cleaning counterpart: the same caption words, drawn as `rendered` draws the base world
    cleaning = get_world("dense-rendered")
    assert cleaning.max_extras == 2 and cleaning.drawn_as == RENDERED.drawn_as and cleaning.colours == RENDERED.colours
