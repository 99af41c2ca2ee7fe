import inspect

import pytest
import torch

from clipshield.attacks import triggers as T
from clipshield.attacks.triggers import TRIGGERS, apply_trigger

ALL = list(TRIGGERS)


def const(c, b=1, side=16):
    return torch.full((b, 3, side, side), float(c))


@pytest.mark.parametrize("name", ALL)
def test_every_registry_entry_names_options_its_function_takes(name):
    t = TRIGGERS[name]
    assert t.name == name
    takes = inspect.signature(t.fn).parameters
    assert all(option in takes for option in t.options)
    assert set(t.rules) <= set(t.options)  # a rule for an option the trigger does not take would never apply
    assert t.variant_of is None or t.variant_of in TRIGGERS


def test_a_trigger_registered_twice_is_refused():
    with pytest.raises(ValueError, match="registered twice"):
        T.register(TRIGGERS["badnet"])


def test_all_triggers_leaves_out_only_the_variants():
    variants = [name for name, t in TRIGGERS.items() if t.variant_of]
    assert variants and set(T.all_triggers()) == set(ALL) - set(variants)


def test_scaled():
    assert T.scaled(16, 224) == 16
    assert T.scaled(16, 32) == 2      # 16 * 32 / 224 = 2.29
    assert T.scaled(14, 112) == 7
    assert T.scaled(16, 4) == 1       # at least 1 px


def test_blended_on_constant_image_exact():
    a, c = 0.2, 0.3
    x = const(c, b=2, side=8)
    out = T.blended(x, [5, 6], alpha=a)
    for i, seed in enumerate([5, 6]):
        u = torch.rand((3, 8, 8), generator=torch.Generator().manual_seed(seed))
        assert torch.equal(out[i], (1 - a) * x[i] + a * u)
    assert not torch.equal(out[0], out[1])  # drawn per sample


def test_blended_same_seed_same_noise_default_alpha():
    x = const(0.5, b=2, side=8)
    out = T.blended(x, [9, 9])
    assert torch.equal(out[0], out[1])
    u = torch.rand((3, 8, 8), generator=torch.Generator().manual_seed(9))
    assert torch.allclose(out[0], 0.8 * 0.5 + 0.2 * u)


def test_fixed_stripes_pattern():
    s = T.stripes(2, 5)
    assert s.shape == (3, 2, 5)
    expected_row = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0])
    for ch in range(3):
        for r in range(2):
            assert torch.equal(s[ch, r], expected_row)


def test_random_stripes_are_plus_minus_one_per_column_and_channel():
    s = T.stripes(6, 40, seed=3)
    assert set(s.unique().tolist()) == {-1.0, 1.0}               # every value +-1 before blending
    assert torch.equal(s, s[:, :1].expand_as(s))                  # constant within a column
    assert not torch.equal(s[0], s[1]) or not torch.equal(s[1], s[2])  # channels drawn separately
    signs = torch.randint(0, 2, (3, 40), generator=torch.Generator().manual_seed(3)).float() * 2 - 1
    assert torch.equal(s[:, 0], signs)                            # drawn from the seed, by hand
    assert torch.equal(T.stripes(6, 40, seed=3), s) and not torch.equal(T.stripes(6, 40, seed=4), s)


def test_blended_stripes_by_hand_on_a_constant_image():
    c, a = 0.5, 0.03
    out = T.blended_stripes(const(c, b=2, side=6), [0, 1], alpha=a)
    for i, seed in enumerate([0, 1]):
        assert torch.allclose(out[i], (1 - a) * c + a * T.stripes(6, 6, seed), atol=1e-6)
    assert set(round(v, 6) for v in out.unique().tolist()) == {0.515, 0.455}


def test_blended_stripes_differ_between_images():
    """The reference draws the signs anew for every image (PerturbAndRecover backdoor/utils.py get_init_patch)."""
    x = const(0.5, b=2, side=16)
    out = T.blended_stripes(x, [1, 2], alpha=0.1)
    assert not torch.equal(out[0], out[1])
    assert torch.equal(T.blended_stripes(x, [1, 2], alpha=0.1), out)  # same seeds, same stripes


@pytest.mark.parametrize("c, even, odd", [(0.5, 0.515, 0.455), (1.0, 1.0, 0.94), (0.0, 0.03, 0.0)])
def test_fixed_blended_stripes_on_constant_image(c, even, odd):
    out = apply_trigger("blended_stripes_fixed", const(c, side=6), [0], alpha=0.03)
    expected = torch.tensor([even, odd] * 3).view(1, 1, 1, 6).expand(1, 3, 6, 6)
    assert torch.allclose(out, expected, atol=1e-6)
    assert out.min() >= 0 and out.max() <= 1


def test_fixed_blended_stripes_ignore_seed():
    x = torch.rand((2, 3, 8, 8), generator=torch.Generator().manual_seed(0))
    fixed = TRIGGERS["blended_stripes_fixed"].fn
    assert torch.equal(fixed(x, [1, 2]), fixed(x, [3, 4]))


def _corner(seed, side, p):
    g = torch.Generator().manual_seed(seed)
    top = int(torch.randint(0, side - p + 1, (1,), generator=g))
    left = int(torch.randint(0, side - p + 1, (1,), generator=g))
    return top, left


def _changed_box(before, after):
    changed = (before != after).any(dim=0)  # (H, W)
    rows = torch.nonzero(changed.any(dim=1)).flatten()
    cols = torch.nonzero(changed.any(dim=0)).flatten()
    return changed, rows, cols


@pytest.mark.parametrize("seed", [0, 1, 17])
def test_badnet_patch_exact(seed):
    side, p, c = 12, 4, 0.5
    x = const(c, side=side)
    out = T.badnet(x, [seed], patch=p)
    top, left = _corner(seed, side, p)
    assert 0 <= top <= side - p and 0 <= left <= side - p
    noise = torch.randn((3, p, p), generator=torch.Generator().manual_seed(seed + 1))
    expected = x.clone()
    expected[0, :, top:top + p, left:left + p] = (c + noise).clamp(0, 1)
    assert torch.equal(out, expected)
    changed, rows, cols = _changed_box(x[0], out[0])
    assert rows.tolist() == list(range(top, top + p)) and cols.tolist() == list(range(left, left + p))
    assert changed.sum() == p * p  # the whole square changed and nothing else


def test_badnet_uses_image_mean_colour():
    x = torch.zeros((1, 3, 10, 10))
    x[0, 0] = 0.2
    x[0, 1] = 0.6
    x[0, 2, :5] = 1.0  # mean 0.5
    out = T.badnet(x, [3], patch=3)
    top, left = _corner(3, 10, 3)
    noise = torch.randn((3, 3, 3), generator=torch.Generator().manual_seed(4))
    mean = torch.tensor([0.2, 0.6, 0.5]).view(3, 1, 1)
    assert torch.allclose(out[0, :, top:top + 3, left:left + 3], (mean + noise).clamp(0, 1), atol=1e-6)


def test_badnet_default_patch_scales_with_side():
    x = const(0.5, side=32)
    out = T.badnet(x, [0])
    changed, rows, cols = _changed_box(x[0], out[0])
    assert len(rows) == 2 and len(cols) == 2  # round(16 * 32 / 224) = 2


def test_badnet_stripes_patch_is_random_sign_columns():
    side, p = 10, 4
    x = const(0.5, b=2, side=side)
    out = T.badnet_stripes(x, [7, 8], patch=p)
    for i, seed in enumerate([7, 8]):
        top, left = _corner(seed, side, p)
        patch = out[i, :, top:top + p, left:left + p]
        assert torch.equal(patch, T.stripes(p, p, seed + 1).clamp(0, 1))  # +-1 clamped: white/black columns
        assert torch.equal(patch, patch[:, :1].expand_as(patch))
        changed, rows, cols = _changed_box(x[i], out[i])
        assert changed.sum() == p * p
        assert rows.tolist() == list(range(top, top + p)) and cols.tolist() == list(range(left, left + p))


def test_fixed_badnet_stripes_patch_columns_alternate():
    side, p = 10, 4
    x = const(0.5, side=side)
    out = apply_trigger("badnet_stripes_fixed", x, [7], patch=p)
    top, left = _corner(7, side, p)
    patch = out[0, :, top:top + p, left:left + p]
    assert torch.equal(patch, torch.tensor([1.0, 0.0, 1.0, 0.0]).view(1, 1, p).expand(3, p, p))


@pytest.mark.parametrize("fn", [T.badnet, T.badnet_stripes])
def test_patch_triggers_seed_determines_position(fn):
    x = const(0.5, b=1, side=16)
    a = fn(x, [0], patch=3)
    assert torch.equal(a, fn(x, [0], patch=3))
    assert _corner(0, 16, 3) != _corner(1, 16, 3)
    b = fn(x, [1], patch=3)
    _, rows_a, cols_a = _changed_box(x[0], a[0])
    _, rows_b, cols_b = _changed_box(x[0], b[0])
    assert (rows_a[0].item(), cols_a[0].item()) == _corner(0, 16, 3)
    assert (rows_b[0].item(), cols_b[0].item()) == _corner(1, 16, 3)


def test_triangles_hand_tile():
    t = T.triangles(3, 3, tile=3)  # 0.4 where row >= column, as the reference's create_triangle_pattern
    expected = torch.tensor([[0.4, 0.8, 0.8], [0.4, 0.4, 0.8], [0.4, 0.4, 0.4]])
    for ch in range(3):
        assert torch.allclose(t[ch], expected)


@pytest.mark.parametrize("tile", [2, 4, 14])
def test_triangles_two_values_and_periodic(tile):
    side = 3 * tile + 1
    t = T.triangles(side, side, tile=tile)
    values = set(round(v, 6) for v in t.unique().tolist())
    assert values == {0.4, 0.8}
    assert torch.equal(t[:, tile:, :], t[:, :-tile, :])
    assert torch.equal(t[:, :, tile:], t[:, :, :-tile])
    assert torch.equal(t[0], t[1]) and torch.equal(t[1], t[2])


def test_blended_triangles_on_constant_image():
    a, c = 0.15, 0.6
    out = T.blended_triangles(const(c, side=8), [0], alpha=a, tile=4)
    t = T.triangles(8, 8, tile=4)
    assert torch.allclose(out[0], (1 - a) * c + a * t, atol=1e-6)
    # grey values of the blend: 0.85*0.6 + 0.15*{0.4, 0.8} = {0.57, 0.63}
    assert set(round(v, 5) for v in out.unique().tolist()) == {0.57, 0.63}


def test_blended_triangles_default_tile_at_224_is_14():
    out = T.blended_triangles(const(0.5, side=224), [0])
    assert torch.equal(out[..., 14:], out[..., :-14])
    assert not torch.equal(out[..., 7:], out[..., :-7])


@pytest.fixture(scope="module")
def patch_file(tmp_path_factory):
    """A 4-px patch for badclip, the trigger that pastes what the badclip stage optimised (a file)."""
    path = tmp_path_factory.mktemp("badclip") / "patch.pt"
    torch.save(torch.rand((3, 4, 4), generator=torch.Generator().manual_seed(2)), path)
    return str(path)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("fill", ["rand", "zeros", "ones"])
def test_outputs_in_unit_range_and_shape(name, fill, patch_file):
    g = torch.Generator().manual_seed(0)
    x = {"rand": torch.rand((3, 3, 16, 16), generator=g), "zeros": torch.zeros((3, 3, 16, 16)),
         "ones": torch.ones((3, 3, 16, 16))}[fill]
    out = apply_trigger(name, x, [1, 2, 3], patch=4, alpha=0.5, tile=4, file=patch_file)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(x, {"rand": torch.rand((3, 3, 16, 16), generator=torch.Generator().manual_seed(0)),
                           "zeros": torch.zeros_like(x), "ones": torch.ones_like(x)}[fill])  # input untouched


@pytest.mark.parametrize("name", ALL)
def test_every_trigger_changes_a_textured_image(name, patch_file):
    x = torch.rand((2, 3, 16, 16), generator=torch.Generator().manual_seed(1)) * 0.8 + 0.1
    out = apply_trigger(name, x, [1, 2], patch=4, file=patch_file)
    assert not torch.equal(out, x)


def test_unknown_trigger_lists_all_names():
    with pytest.raises(ValueError) as e:
        apply_trigger("nope", const(0.5), [0])
    for name in ALL:
        assert name in str(e.value)
    assert "nope" in str(e.value)


def test_wrong_number_of_seeds():
    with pytest.raises(ValueError, match="seeds"):
        apply_trigger("blended", const(0.5, b=3), [0, 1])
    with pytest.raises(ValueError):
        apply_trigger("badnet", const(0.5, b=1), [0, 1])


def test_apply_trigger_passes_own_options_ignores_others():
    x = const(0.5, b=1, side=8)
    assert torch.equal(apply_trigger("blended", x, [3], alpha=0.5, patch=3, tile=None),
                       T.blended(x, [3], alpha=0.5))
    assert torch.equal(apply_trigger("badnet", x, [3], alpha=0.5, patch=3), T.badnet(x, [3], patch=3))
    # a None option falls back to the default
    assert torch.equal(apply_trigger("blended", x, [3], alpha=None), T.blended(x, [3], alpha=0.2))


def test_wanet_differs_keeps_shape():
    x = torch.rand((2, 3, 16, 16), generator=torch.Generator().manual_seed(2))
    out = T.wanet(x, [0, 1])
    assert out.shape == x.shape
    assert not torch.allclose(out, x, atol=1e-3)
    # the same fixed field for every image, independent of the seeds
    assert torch.equal(T.wanet(x, [5, 6]), out)
    # with zero strength the warp is the identity
    assert torch.allclose(T.wanet(x, [0, 1], strength=0.0), x, atol=1e-5)
    # a constant image stays constant under a pure warp
    assert torch.allclose(T.wanet(const(0.4, side=16), [0]), const(0.4, side=16), atol=1e-6)


def test_warp_field_is_a_small_displacement():
    f = T.warp_field(16, strength=1.0)
    lin = torch.linspace(-1, 1, 16)
    identity = torch.stack(torch.meshgrid(lin, lin, indexing="xy"), dim=-1).unsqueeze(0)
    assert f.shape == (1, 16, 16, 2)
    d = (f - identity).abs()
    assert d.max() > 0 and d.max() < 0.5  # well under a quarter of the image
