"""The procedural shape world: the tiny profile's stand-in for web data, ImageNet and synthetic pairs.

Image i of a world depends only on (world, seed, i, size): `render(world, seed, i, size)` is pure.
The worlds (WORLDS): `base` (pre-training and test data), `rendered` (the default cleaning pairs: base's captions,
another renderer), `shifted` (other colours, backgrounds, sizes and templates), and `dense` / `dense-rendered`
(base / rendered with up to two small shapes of other classes beside the main one, named in the caption).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

SHAPES = ("circle", "square", "triangle", "star", "ring", "cross", "diamond", "hexagon", "crescent", "heart")

# Prompts for zero-shot classification and for the captions of poisoned samples.
ZEROSHOT_TEMPLATES = ("a photo of a {}.", "a {} shape.", "an image of a {}.", "a drawing of a {}.")


@dataclass(frozen=True)
class World:
    name: str
    colours: dict[str, tuple[float, float, float]]
    backgrounds: tuple[str, ...]
    scale_range: tuple[float, float]  # shape radius as a fraction of the image side
    max_rotation_deg: float
    pixel_noise: float
    templates: tuple[str, ...]
    # How this world's renderer draws a background its captions name (default: as the base world does).
    drawn_as: dict[str, str] = field(default_factory=dict)
    # Up to this many small shapes of other classes beside the main one, each named in the caption.
    max_extras: int = 0
    extra_scale_range: tuple[float, float] = (0.12, 0.18)


BASE = World(
    name="base",
    colours={
        "red": (0.90, 0.10, 0.10), "green": (0.10, 0.75, 0.15), "blue": (0.15, 0.25, 0.95),
        "yellow": (0.95, 0.90, 0.10), "orange": (1.00, 0.55, 0.05), "purple": (0.55, 0.15, 0.75),
        "white": (0.97, 0.97, 0.97), "cyan": (0.10, 0.85, 0.90), "pink": (1.00, 0.50, 0.75),
        "brown": (0.50, 0.30, 0.10),
    },
    backgrounds=("dark", "light", "grey", "noisy"),
    scale_range=(0.30, 0.45),
    max_rotation_deg=25.0,
    pixel_noise=0.03,
    templates=(
        "a photo of a {colour} {shape}.",
        "a {size} {colour} {shape} on a {background} background.",
        "a {colour} {shape}.",
        "an image of a {size} {shape}, coloured {colour}.",
        "{colour} {shape} on {background}.",
    ),
)

# The cleaning world: half the colours and backgrounds are new, shapes a little smaller/larger, more
# rotation and noise, and other caption templates. A milder shift than a first prototype used: cleaning
# data far from the test distribution cost 7-14 points of clean accuracy there (docs/methods.md §8).
SHIFTED = World(
    name="shifted",
    colours={
        "red": (0.85, 0.15, 0.15), "green": (0.15, 0.70, 0.20), "blue": (0.20, 0.30, 0.90),
        "yellow": (0.90, 0.85, 0.20), "white": (0.92, 0.92, 0.92),
        "teal": (0.05, 0.55, 0.55), "magenta": (0.90, 0.10, 0.80), "gold": (0.85, 0.70, 0.20),
        "violet": (0.70, 0.45, 0.95), "coral": (1.00, 0.45, 0.40),
    },
    backgrounds=("dark", "light", "gradient", "speckled"),
    scale_range=(0.28, 0.46),
    max_rotation_deg=35.0,
    pixel_noise=0.04,
    templates=(
        "a picture showing a {colour} {shape}.",
        "there is a {size} {shape} in {colour} here.",
        "a {shape}, {size} and {colour}, over a {background} backdrop.",
        "a rendering of a {colour} {shape}.",
        "a {colour} {shape} against a {background} background.",
    ),
)

# The default cleaning world, shifted the way the PAR paper's synthetic pairs are (Stable Diffusion images drawn
# from CC3M captions): the base world's captions (its templates, colour and background words), another renderer
# (the shifted world's rotation, noise and scales, every colour a little off, grey drawn shaded and noise as specks).
# With the shifted world's new colour words and templates, cleaning re-learned the vocabulary and cost 7-19 points
# of zero-shot top-1; here 1-4. Captions naming the shifted world's backgrounds ("gradient", "speckled") instead of
# the base world's "grey" and "noisy" cost PAR half its image->text retrieval (docs/decisions.md, "Cleaning data").
RENDERED = World(
    name="rendered",
    colours={k: (max(0.0, r - 0.05), min(1.0, g + 0.05), b) for k, (r, g, b) in BASE.colours.items()},
    backgrounds=BASE.backgrounds,
    scale_range=SHIFTED.scale_range,
    max_rotation_deg=SHIFTED.max_rotation_deg,
    pixel_noise=SHIFTED.pixel_noise,
    templates=BASE.templates,
    drawn_as={"grey": "shaded", "noisy": "speckled"},
)

# Denser scenes: the base world's main shape (a little smaller) with up to two small shapes of other classes, each
# named in the caption ("a red heart with a blue star and a green cross."). The zero-shot label is the main shape's.
DENSE = replace(BASE, name="dense", scale_range=(0.26, 0.38), max_extras=2)
# Its cleaning counterpart, drawn as RENDERED draws the base world.
DENSE_RENDERED = replace(RENDERED, name="dense-rendered", scale_range=(0.24, 0.40), max_extras=2)

WORLDS = {w.name: w for w in (BASE, SHIFTED, RENDERED, DENSE, DENSE_RENDERED)}


def get_world(name: str) -> World:
    if name not in WORLDS:
        raise ValueError(f"unknown world {name!r}; choose one of {sorted(WORLDS)}")
    return WORLDS[name]


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test in the shape's own frame (radius 1, v pointing up)."""
    r = np.hypot(u, v)
    theta = np.arctan2(v, u)

    def polygon(n: int, phase: float) -> np.ndarray:
        inside = np.ones_like(u, dtype=bool)
        for k in range(n):
            a = phase + 2 * np.pi * k / n
            inside &= u * np.cos(a) + v * np.sin(a) <= np.cos(np.pi / n)
        return inside

    if shape == "circle":
        return r <= 1.0
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8
    if shape == "triangle":
        return polygon(3, -np.pi / 2) & (r <= 1.6)
    if shape == "star":
        return r <= 0.42 + 0.58 * ((np.cos(5 * (theta - np.pi / 2)) + 1) / 2) ** 2
    if shape == "ring":
        return (r <= 1.0) & (r >= 0.55)
    if shape == "cross":
        return ((np.abs(u) <= 0.3) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 1.0))
    if shape == "diamond":
        return np.abs(u) / 0.65 + np.abs(v) <= 1.0
    if shape == "hexagon":
        return polygon(6, 0.0)
    if shape == "crescent":
        return (r <= 1.0) & (np.hypot(u - 0.45, v) > 0.75)
    if shape == "heart":
        x, y = u * 1.15, v * 1.15 + 0.15
        return (x**2 + y**2 - 1) ** 3 - x**2 * y**3 <= 0
    raise ValueError(f"unknown shape {shape!r}")


def _background(kind: str, rng: np.random.Generator, n: int) -> np.ndarray:
    tint = rng.uniform(-1, 1, size=3)
    if kind == "dark":
        img = np.full((n, n, 3), 0.12) + 0.08 * tint
    elif kind == "light":
        img = np.full((n, n, 3), 0.85) + 0.08 * tint
    elif kind == "grey":
        img = np.full((n, n, 3), rng.uniform(0.35, 0.6)) + 0.05 * tint
    elif kind == "noisy":
        img = rng.uniform(0.2, 0.7, size=(1, 1, 3)) + rng.normal(0, 0.12, size=(n, n, 3))
    elif kind == "gradient":
        ramp = np.linspace(0, 1, n)[None, :, None] if rng.random() < 0.5 else np.linspace(0, 1, n)[:, None, None]
        lo, hi = rng.uniform(0.1, 0.4, 3), rng.uniform(0.5, 0.9, 3)
        img = np.broadcast_to(lo + (hi - lo) * ramp, (n, n, 3)).copy()
    elif kind == "shaded":
        ramp = np.linspace(0, 1, n)[None, :, None] if rng.random() < 0.5 else np.linspace(0, 1, n)[:, None, None]
        lo, hi = rng.uniform(0.25, 0.4), rng.uniform(0.5, 0.7)
        img = lo + (hi - lo) * ramp + 0.05 * tint
        img = np.broadcast_to(img, (n, n, 3)).copy()
    elif kind == "dim":
        img = np.full((n, n, 3), 0.25) + 0.1 * tint
    elif kind == "pale":
        img = np.full((n, n, 3), 0.7) + 0.1 * tint
    elif kind == "speckled":
        img = rng.uniform(0.3, 0.6, size=(1, 1, 3)) + 0.35 * (rng.random((n, n, 1)) < 0.08)
    else:
        raise ValueError(f"unknown background {kind!r}")
    return img


def _draw(img: np.ndarray, rng: np.random.Generator, shape: str, rgb, cx: float, cy: float, scale: float,
          angle: float) -> np.ndarray:
    """`shape` painted over `img` at centre (cx, cy) (fractions of the side), radius `scale`, rotated by `angle`."""
    size = img.shape[0]
    # 2x supersampling gives anti-aliased edges (coverage in [0, 1]).
    ss = 2 * size
    grid = (np.arange(ss) + 0.5) / ss
    gx, gy = np.meshgrid(grid - cx, grid - cy)
    u = (np.cos(angle) * gx + np.sin(angle) * gy) / scale
    v = -(-np.sin(angle) * gx + np.cos(angle) * gy) / scale
    cover = _shape_mask(shape, u, v).astype(np.float64).reshape(size, 2, size, 2).mean(axis=(1, 3))
    colour = np.clip(np.array(rgb) + rng.normal(0, 0.04, 3), 0, 1)
    return img * (1 - cover[..., None]) + colour * cover[..., None]


def render(world: World, seed: int, index: int, size: int = 32) -> tuple[np.ndarray, str, dict]:
    """Image `index` of `world` under `seed`: (uint8 HxWx3 array, caption, metadata)."""
    rng = np.random.default_rng([seed, index])
    label = int(rng.integers(len(SHAPES)))
    shape = SHAPES[label]
    colour_name = list(world.colours)[int(rng.integers(len(world.colours)))]
    background = world.backgrounds[int(rng.integers(len(world.backgrounds)))]
    scale = rng.uniform(*world.scale_range)
    angle = np.deg2rad(rng.uniform(-world.max_rotation_deg, world.max_rotation_deg))
    margin = scale * 0.9
    cx, cy = rng.uniform(margin, 1 - margin, size=2)

    img = _background(world.drawn_as.get(background, background), rng, size)
    extras = []
    for _ in range(int(rng.integers(world.max_extras + 1)) if world.max_extras else 0):
        other = SHAPES[(label + 1 + int(rng.integers(len(SHAPES) - 1))) % len(SHAPES)]
        other_colour = list(world.colours)[int(rng.integers(len(world.colours)))]
        s = rng.uniform(*world.extra_scale_range)
        for _ in range(10):  # a place clear of the main shape, where one is found in ten draws
            ex, ey = rng.uniform(s, 1 - s, size=2)
            if np.hypot(ex - cx, ey - cy) > 1.3 * scale + s:
                break
        img = _draw(img, rng, other, world.colours[other_colour], ex, ey, s,
                    np.deg2rad(rng.uniform(-world.max_rotation_deg, world.max_rotation_deg)))
        extras.append([other_colour, other])
    img = _draw(img, rng, shape, world.colours[colour_name], cx, cy, scale, angle)
    img = img + rng.normal(0, world.pixel_noise, img.shape)
    img = np.clip(np.round(img * 255), 0, 255).astype(np.uint8)

    size_word = "small" if scale < sum(world.scale_range) / 2 else "large"
    template = world.templates[int(rng.integers(len(world.templates)))]
    caption = template.format(colour=colour_name, shape=shape, size=size_word, background=background)
    if extras:
        caption = f"{caption[:-1]} with {' and '.join(f'a {c} {o}' for c, o in extras)}."
    meta = {"class": label, "label": shape, "colour": colour_name, "background": background,
            "size": size_word, "source": f"procedural-{world.name}", "seed": seed, "index": index}
    if world.max_extras:
        meta["extras"] = extras
    return img, caption, meta


def target_caption(target: str, rng: np.random.Generator, world: World = BASE) -> str:
    """A random caption of `world` that names the class `target` (what poisoned samples get)."""
    template = world.templates[int(rng.integers(len(world.templates)))]
    colour = list(world.colours)[int(rng.integers(len(world.colours)))]
    return template.format(colour=colour, shape=target, size=("small", "large")[int(rng.integers(2))],
                           background=world.backgrounds[int(rng.integers(len(world.backgrounds)))])
