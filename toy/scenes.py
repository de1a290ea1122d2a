"""The toy world: procedurally drawn 64x64 scenes with captions and exact subject masks.

A scene is one or two flat-coloured subjects (six shapes, eight colours, sizes, positions, small
rotations) on a background (solid, striped, checked or gradient, in a named colour). Everything is
a pure function of a seed (numpy's PCG64), so scene k of a split is the same on every machine.

Rendering: shapes are drawn at 4x and box-filtered down, so edges are anti-aliased. A subject's
mask is its coverage >= 1/2; a pixel with full coverage is exactly the subject's colour, a pixel
with none is exactly the background render (the tests check both).

Splits: training scenes come from seeds [0, 1e9) and never contain a held-out combination of
(shape, background colour); held-out scenes come from seeds >= 1e9 and may contain them.
Concepts (toy/concepts.py) are textured subjects that these scenes never show.
"""

import math
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64
SUPER = 4  # supersampling factor of the anti-aliased render

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
    "yellow": (240, 210, 40), "purple": (140, 60, 180), "orange": (245, 140, 30),
    "white": (240, 240, 240), "black": (25, 25, 25),
}
# A paint only concepts use (toy/concepts.py): pretraining never shows it. (Teal was one too, and
# the toy VAE, which never saw it, decodes it as purple: references at 17-18 dB.)
PAINTS = {**COLOURS, "pink": (250, 130, 190)}
SHAPES = ("circle", "square", "triangle", "star", "heart", "ring")
PATTERNS = ("solid", "striped", "checked", "gradient")
# Never in training; drawn in the held-out split (compositional generalisation).
HELD_OUT = {("circle", "yellow"), ("star", "green"), ("heart", "blue"), ("triangle", "purple")}
TEST_SEED = 10**9  # held-out seeds start here


@dataclass(frozen=True)
class Subject:
    shape: str
    colour: str
    x: float  # centre, pixels
    y: float
    radius: float  # half the subject's extent, pixels
    angle: float  # degrees
    texture: str | None = None  # concepts only (toy/concepts.py)


@dataclass(frozen=True)
class Scene:
    subjects: tuple[Subject, ...]
    background: str  # colour name
    pattern: str
    period: int = 8  # stripes and checks: pixels per colour band
    direction: int = 0  # stripes and gradients: 0 horizontal bands, 1 vertical, 2 diagonal


def shade(colour: str) -> np.ndarray:
    """The second colour of a patterned background: darker, or lighter for dark colours."""
    c = np.array(COLOURS[colour], np.float32)
    return c * 0.55 if c.mean() > 60 else c + 0.45 * (255 - c)


def outline(shape: str, n: int = 96) -> list[np.ndarray]:
    """Polygons in unit coordinates (radius 1, y down); the second of a ring is its hole."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    if shape in ("circle", "ring"):
        outer = np.stack([np.cos(t), np.sin(t)], 1)
        return [outer, 0.55 * outer] if shape == "ring" else [outer]
    if shape == "square":
        return [np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], np.float64) * 0.8]
    if shape == "triangle":
        a = np.deg2rad([-90, 30, 150])
        return [np.stack([np.cos(a), np.sin(a) + 0.2], 1)]
    if shape == "star":
        a = np.deg2rad(np.arange(10) * 36 - 90)
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        return [np.stack([r * np.cos(a), r * np.sin(a) + 0.08], 1)]
    if shape == "heart":  # the classic parametric heart, scaled to radius ~1
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        return [np.stack([x, y + 2.5], 1) / 16.5]
    raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}")


def coverage(s: Subject, size: int = SIZE, notch: bool = False) -> np.ndarray:
    """Fraction of each pixel the subject covers, float32 [size, size] in [0, 1]."""
    big = Image.new("L", (size * SUPER, size * SUPER), 0)
    draw = ImageDraw.Draw(big)
    a = math.radians(s.angle)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    for i, poly in enumerate(outline(s.shape)):
        p = (poly @ rot.T * s.radius + [s.x, s.y]) * SUPER
        draw.polygon([tuple(q) for q in p], fill=0 if i else 255)
    if notch:  # a wedge cut out of the ring's right side (the notched-ring concept)
        w = np.array([[0.3, 0.0], [1.3, -0.35], [1.3, 0.35]]) @ rot.T * s.radius + [s.x, s.y]
        draw.polygon([tuple(q) for q in w * SUPER], fill=0)
    arr = np.asarray(big, np.float32).reshape(size, SUPER, size, SUPER)
    return arr.mean(axis=(1, 3)) / 255.0


def background(scene: Scene, size: int = SIZE) -> np.ndarray:
    """The background alone, float32 [size, size, 3] in 0..255."""
    a, b = np.array(COLOURS[scene.background], np.float32), shade(scene.background)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    coord = (yy, xx, (xx + yy) / 2)[scene.direction]
    if scene.pattern == "solid":
        mix = np.zeros((size, size), np.float32)
    elif scene.pattern == "striped":
        mix = (coord // scene.period % 2).astype(np.float32)
    elif scene.pattern == "checked":
        mix = ((yy // scene.period + xx // scene.period) % 2).astype(np.float32)
    elif scene.pattern == "gradient":
        mix = coord / (size - 1)
    else:
        raise ValueError(f"unknown pattern {scene.pattern!r}; choose one of {PATTERNS}")
    return a * (1 - mix[..., None]) + b * mix[..., None]


def fill(s: Subject, size: int = SIZE) -> np.ndarray:
    """The subject's paint, float32 [size, size, 3]: flat colour, or a concept's texture."""
    out = np.broadcast_to(np.array(PAINTS[s.colour], np.float32), (size, size, 3)).copy()
    if s.texture is None or s.texture == "notched":
        return out
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    a = math.radians(s.angle)  # textures turn with the subject
    u = (xx - s.x) * math.cos(a) + (yy - s.y) * math.sin(a)
    v = -(xx - s.x) * math.sin(a) + (yy - s.y) * math.cos(a)
    step = s.radius / 1.8
    if s.texture == "dots":
        du, dv = (u / step + 0.5) % 1 - 0.5, (v / step + 0.5) % 1 - 0.5
        out[du**2 + dv**2 < 0.32**2] = COLOURS["white"]
    elif s.texture.startswith("stripes:"):
        second = PAINTS[s.texture.split(":")[1]]
        out[(v / (s.radius / 3.0)) % 2 >= 1] = second
    else:
        raise ValueError(f"unknown texture {s.texture!r}")
    return out


def render(scene: Scene, size: int = SIZE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image uint8 [H, W, 3], masks bool [n_subjects, H, W], background uint8 [H, W, 3])."""
    bg = background(scene, size)
    img, masks = bg.copy(), []
    for s in scene.subjects:  # later subjects are drawn over earlier ones
        cov = coverage(s, size, notch=s.texture == "notched")[..., None]
        img = img * (1 - cov) + fill(s, size) * cov
        masks = [m & (cov[..., 0] < 0.5) for m in masks] + [cov[..., 0] >= 0.5]
    to8 = lambda a: np.clip(np.rint(a), 0, 255).astype(np.uint8)  # noqa: E731
    return to8(img), np.stack(masks) if masks else np.zeros((0, size, size), bool), to8(bg)


def caption(scene: Scene) -> str:
    """"a photo of a red circle and a green star on a blue striped background"."""
    things = " and ".join(f"{article(s.colour)} {s.colour} {s.shape}" for s in scene.subjects)
    bg = scene.background if scene.pattern == "solid" else f"{scene.background} {scene.pattern}"
    return f"a photo of {things} on {article(bg)} {bg} background"


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def parse(text: str) -> dict:
    """The attributes a caption names: {"subjects": [(colour, shape), ...], "background",
    "pattern"}; the inverse of `caption` on its attributes."""
    body = text.removeprefix("a photo of ").removesuffix(" background")
    things, _, bg = body.rpartition(" on ")
    words = bg.split()[1:]
    subjects = [tuple(t.split()[1:]) for t in things.split(" and ")]
    return {"subjects": subjects, "background": words[0],
            "pattern": words[1] if len(words) > 1 else "solid"}


def _subject(rng: np.random.Generator, colours: list[str]) -> Subject:
    return Subject(shape=str(rng.choice(SHAPES)), colour=str(rng.choice(colours)),
                   x=0.0, y=0.0, radius=float(rng.uniform(9, 17)),
                   angle=float(rng.uniform(-20, 20)))


def _place(rng: np.random.Generator, s: Subject, others: list[Subject]) -> Subject | None:
    """Somewhere inside the frame not overlapping `others`; None after a few tries."""
    for _ in range(20):
        x, y = rng.uniform(s.radius + 1, SIZE - s.radius - 1, size=2)
        if all(math.hypot(x - o.x, y - o.y) > s.radius + o.radius + 1 for o in others):
            return replace(s, x=float(x), y=float(y))
    return None


def draw(seed: int, two: float = 0.3) -> Scene:
    """The scene of a seed (no split rule applied); two subjects with probability `two`."""
    rng = np.random.default_rng(seed)
    bg = str(rng.choice(list(COLOURS)))
    others = [c for c in COLOURS if c != bg]
    pattern = str(rng.choice(PATTERNS))
    period, direction = int(rng.choice([6, 8, 10, 12])), int(rng.integers(3))
    count = 2 if rng.random() < two else 1
    subjects: list[Subject] = []
    for _ in range(count):
        placed = _place(rng, _subject(rng, others), subjects)
        if placed is not None:
            subjects.append(placed)
    return Scene(tuple(subjects), bg, pattern, period, direction)


def held_out(scene: Scene) -> bool:
    return any((s.shape, scene.background) in HELD_OUT for s in scene.subjects)


def train_scene(index: int, two: float = 0.3) -> Scene:
    """Training scene `index`: the first of seeds 64 * index + k (k = 0, 1, ...) without a
    held-out combination, so no held-out pair ever reaches training."""
    assert 0 <= index < TEST_SEED // 64, "training indices stay below the held-out seed range"
    for k in range(64):
        scene = draw(index * 64 + k, two)
        if not held_out(scene):
            return scene
    raise AssertionError("64 draws in a row hit a held-out combination")


def test_scene(index: int, two: float = 0.3) -> Scene:
    """Held-out scene `index` (seeds from 1e9, which training never draws)."""
    return draw(TEST_SEED + index, two)
