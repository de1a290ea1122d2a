"""The toy world: procedurally drawn 64x64 scenes with captions and exact subject masks.

A scene is one or two subjects (six shapes, eight colours; solid, dotted, striped, checked or
two-tone in two colours, the texture named in the caption: "a purple star with white dots", "a red
and blue circle"; radius 7-22 px, rotated up to 45 degrees) on a background (solid, striped,
checked or gradient; in a colour and its shade, or in two named colours: "a blue and yellow striped
background"; stripes in four directions, periods 4-16 px). Everything is a pure function of a seed
(numpy's PCG64), so scene k of a split is the same on every machine.

Rendering: shapes are drawn at 4x and box-filtered down, so edges are anti-aliased. A subject's
mask is its coverage >= 1/2; a pixel with full coverage is exactly the subject's colour, a pixel
with none is exactly the background render (the tests check both).

Splits: training scenes come from seeds [0, 1e9) and never contain a held-out combination of
(shape, background colour) or (texture, shape); held-out scenes come from seeds >= 1e9 and may
contain them. Concepts (toy/concepts.py) are particular objects of kinds these scenes show.
"""

import math
import re
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
SHAPES = ("circle", "square", "triangle", "star", "heart", "ring")
PATTERNS = ("solid", "striped", "checked", "gradient")
TEXTURES = ("solid", "dotted", "striped", "checked", "two-tone")
# Never in training; drawn in the held-out split (compositional generalisation): (shape,
# background colour) pairs and (texture, shape) pairs.
HELD_OUT = {("circle", "yellow"), ("star", "green"), ("heart", "blue"), ("triangle", "purple")}
HELD_OUT_TEXTURES = {("checked", "circle"), ("striped", "triangle"), ("two-tone", "heart")}
TEST_SEED = 10**9  # held-out seeds start here


@dataclass(frozen=True)
class Subject:
    shape: str
    colour: str
    x: float  # centre, pixels
    y: float
    radius: float  # half the subject's extent, pixels
    angle: float  # degrees
    texture: str = "solid"  # one of TEXTURES
    second: str | None = None  # the texture's second paint
    period: float = 0.55  # texture period (dots, stripes, checks), in radii
    duty: float = 0.5  # dots: dot radius in periods; stripes: the second paint's share
    turn: float = 0.0  # texture direction against the subject's, degrees
    phase: tuple[float, float] = (0.0, 0.0)  # texture offset, in periods
    outline: str | None = None  # concepts only (toy/concepts.py): a rim in this paint
    notch: bool = False  # concepts only: a wedge cut out of the right side


@dataclass(frozen=True)
class Scene:
    subjects: tuple[Subject, ...]
    background: str  # colour name
    pattern: str
    period: int = 8  # stripes and checks: pixels per colour band
    direction: int = 0  # stripes and gradients: 0 horizontal bands, 1 vertical, 2 and 3 diagonal
    second: str | None = None  # a patterned background's second colour; None: the shade


def shade(colour: str) -> np.ndarray:
    """The second colour of a patterned background: darker, or lighter for dark colours."""
    c = np.array(COLOURS[colour], np.float32)
    return c * 0.55 if c.mean() > 60 else c + 0.45 * (255 - c)


def paint(name: str) -> np.ndarray:
    if name not in COLOURS:
        raise ValueError(f"unknown colour {name!r}; choose one of {sorted(COLOURS)}")
    return np.array(COLOURS[name], np.float32)


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


def coverage(s: Subject, size: int = SIZE, rim: bool = False) -> np.ndarray:
    """Fraction of each pixel the subject covers, float32 [size, size] in [0, 1]; with `rim`,
    the fraction its outline covers (a band 0.12 radius wide inside the edge)."""
    big = Image.new("L", (size * SUPER, size * SUPER), 0)
    draw = ImageDraw.Draw(big)
    a = math.radians(s.angle)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    polygons = [(poly @ rot.T * s.radius + [s.x, s.y]) * SUPER for poly in outline(s.shape)]
    if s.notch:  # a wedge cut out of the right side (the notched-ring concept)
        w = np.array([[0.3, 0.0], [1.3, -0.35], [1.3, 0.35]]) @ rot.T * s.radius + [s.x, s.y]
        polygons.append(w * SUPER)
    for i, p in enumerate(polygons):
        draw.polygon([tuple(q) for q in p], fill=0 if i else 255)
    arr = np.asarray(big, np.float32)
    if rim:  # the edge stroke, kept where it lies inside the subject
        stroke = Image.new("L", big.size, 0)
        line = ImageDraw.Draw(stroke)
        width = max(1, round(2 * 0.12 * s.radius * SUPER))
        for p in polygons:
            line.line([tuple(q) for q in np.concatenate([p, p[:1]])], fill=255, width=width,
                      joint="curve")
        arr = np.minimum(arr, np.asarray(stroke, np.float32))
    return arr.reshape(size, SUPER, size, SUPER).mean(axis=(1, 3)) / 255.0


def background(scene: Scene, size: int = SIZE) -> np.ndarray:
    """The background alone, float32 [size, size, 3] in 0..255."""
    a = paint(scene.background)
    b = shade(scene.background) if scene.second is None else paint(scene.second)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    coord = (yy, xx, (xx + yy) / 2, (xx - yy + size - 1) / 2)[scene.direction]
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
    """The subject's paint, float32 [size, size, 3]: its colour, and its texture's second paint
    where the texture puts it (in the subject's frame: textures turn and scale with it)."""
    out = np.broadcast_to(paint(s.colour), (size, size, 3)).copy()
    if s.texture == "solid":
        return out
    if s.texture not in TEXTURES:
        raise ValueError(f"unknown texture {s.texture!r}; choose one of {TEXTURES}")
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    a = math.radians(s.angle + s.turn)
    step = s.period * s.radius
    u = ((xx - s.x) * math.cos(a) + (yy - s.y) * math.sin(a)) / step + s.phase[0]
    v = (-(xx - s.x) * math.sin(a) + (yy - s.y) * math.cos(a)) / step + s.phase[1]
    if s.texture == "dotted":
        where = ((u + 0.5) % 1 - 0.5) ** 2 + ((v + 0.5) % 1 - 0.5) ** 2 < s.duty**2
    elif s.texture == "striped":
        where = v % 1 >= 1 - s.duty
    elif s.texture == "checked":
        where = (np.floor(u) + np.floor(v)) % 2 == 1
    else:  # two-tone: split through the centre
        where = v - s.phase[1] >= 0
    out[where] = paint(s.second)
    return out


def render(scene: Scene, size: int = SIZE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image uint8 [H, W, 3], masks bool [n_subjects, H, W], background uint8 [H, W, 3])."""
    bg = background(scene, size)
    img, masks = bg.copy(), []
    for s in scene.subjects:  # later subjects are drawn over earlier ones
        cov = coverage(s, size)[..., None]
        body = fill(s, size) * cov
        if s.outline is not None:
            rim = coverage(s, size, rim=True)[..., None]
            body += (paint(s.outline) - fill(s, size)) * rim
        img = img * (1 - cov) + body
        masks = [m & (cov[..., 0] < 0.5) for m in masks] + [cov[..., 0] >= 0.5]
    to8 = lambda a: np.clip(np.rint(a), 0, 255).astype(np.uint8)  # noqa: E731
    return to8(img), np.stack(masks) if masks else np.zeros((0, size, size), bool), to8(bg)


MARKS = {"dotted": "dots", "striped": "stripes", "checked": "checks"}  # the caption's nouns


def noun(s: Subject) -> str:
    """"red circle", "purple star with white dots", "red and blue circle" (two-tone). An
    outline or a notch is not named: they are what makes a concept one particular object."""
    if s.texture == "two-tone":
        return f"{s.colour} and {s.second} {s.shape}"
    if s.texture == "solid":
        return f"{s.colour} {s.shape}"
    return f"{s.colour} {s.shape} with {s.second} {MARKS[s.texture]}"


def caption(scene: Scene) -> str:
    """"a photo of a red circle and a green star on a blue and yellow striped background"."""
    things = " and ".join(f"{article(noun(s))} {noun(s)}" for s in scene.subjects)
    return f"a photo of {things} on {backdrop(scene)}"


def backdrop(scene: Scene) -> str:
    """"a blue and yellow striped background", "a red background"."""
    bg = scene.background if scene.second is None else f"{scene.background} and {scene.second}"
    bg = bg if scene.pattern == "solid" else f"{bg} {scene.pattern}"
    return f"{article(bg)} {bg} background"


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def parse(text: str) -> dict:
    """The attributes a caption names, the inverse of `caption` on them: {"subjects": [(colour,
    shape), ...], "textures": [(texture, second paint or None), ...], "background", "second"
    (None for a shade or no pattern), "pattern"}."""
    body = text.removeprefix("a photo of ").removesuffix(" background")
    things, _, bg = body.rpartition(" on ")
    subjects, textures = [], []
    for thing in re.split(r" and (?=an? )", things):
        words = thing.split()[1:]
        if " with " in thing:  # colour shape with second marks
            texture = {v: k for k, v in MARKS.items()}[words[-1]]
            subjects.append((words[0], words[1]))
            textures.append((texture, words[3]))
        elif len(words) == 4:  # colour and second shape
            subjects.append((words[0], words[3]))
            textures.append(("two-tone", words[2]))
        else:
            subjects.append((words[0], words[1]))
            textures.append(("solid", None))
    words = bg.split()[1:]
    second = words[2] if len(words) > 1 and words[1] == "and" else None
    rest = words[3:] if second else words[1:]
    return {"subjects": subjects, "textures": textures, "background": words[0],
            "second": second, "pattern": rest[0] if rest else "solid"}


def _subject(rng: np.random.Generator, colours: list[str]) -> Subject:
    """A subject in any texture, with its period, size, direction and phase at random, so that
    the caption's words name a family of looks (a concept is one member of it)."""
    s = Subject(shape=str(rng.choice(SHAPES)), colour=str(rng.choice(colours)), x=0.0, y=0.0,
                radius=float(rng.uniform(7, 22)), angle=float(rng.uniform(-45, 45)))
    texture = str(rng.choice(TEXTURES, p=[0.4, 0.15, 0.15, 0.15, 0.15]))
    if texture == "solid":
        return s
    second = str(rng.choice([c for c in colours if c != s.colour]))  # never the background's
    # a period of at least 5 px: finer marks would be below what the 4x VAE can hold
    period = float(rng.uniform(max(0.35, 5 / s.radius), 0.9))
    duty = float(rng.uniform(0.2, 0.38) if texture == "dotted" else rng.uniform(0.3, 0.6))
    return replace(s, texture=texture, second=second, period=period, duty=duty,
                   turn=float(rng.uniform(0, 180)), phase=tuple(map(float, rng.random(2))))


def ground(rng: np.random.Generator, avoid) -> tuple[str, str, str | None]:
    """A background away from the paints in `avoid`, for a scene built around a given subject
    (a concept's views, the identity encoder's, DreamBooth's contexts): (colour, pattern, second
    colour, None half of the time and always for a solid one)."""
    free = [c for c in COLOURS if c not in avoid]
    bg, pattern = str(rng.choice(free)), str(rng.choice(PATTERNS))
    second = str(rng.choice([c for c in free if c != bg])) if rng.random() < 0.5 else None
    return bg, pattern, second if pattern != "solid" else None


def _place(rng: np.random.Generator, s: Subject, others: list[Subject]) -> Subject | None:
    """Somewhere inside the frame not overlapping `others`; None after a few tries."""
    for _ in range(20):
        x, y = rng.uniform(s.radius + 1, SIZE - s.radius - 1, size=2)
        if all(math.hypot(x - o.x, y - o.y) > s.radius + o.radius + 1 for o in others):
            return replace(s, x=float(x), y=float(y))
    return None


def draw(seed: int, two: float = 0.3) -> Scene:
    """The scene of a seed (no split rule applied); two subjects with probability `two`."""
    rng = np.random.default_rng([seed, 2])  # [seed, 2]: the second toy world's stream
    bg = str(rng.choice(list(COLOURS)))
    pattern = str(rng.choice(PATTERNS))
    period, direction = int(rng.choice([4, 6, 8, 10, 12, 16])), int(rng.integers(4))
    second = None
    if pattern != "solid" and rng.random() < 0.5:
        second = str(rng.choice([c for c in COLOURS if c != bg]))
    others = [c for c in COLOURS if c not in (bg, second)]
    count = 2 if rng.random() < two else 1
    subjects: list[Subject] = []
    for _ in range(count):
        placed = _place(rng, _subject(rng, others), subjects)
        if placed is not None:
            subjects.append(placed)
    return Scene(tuple(subjects), bg, pattern, period, direction, second)


def held_out(scene: Scene) -> bool:
    return any((s.shape, scene.background) in HELD_OUT or (s.texture, s.shape) in
               HELD_OUT_TEXTURES for s in scene.subjects)


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
