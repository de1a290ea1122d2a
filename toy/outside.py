"""Scenes from outside the toy world: a second renderer, written apart from toy/scenes.py.

It draws what the captions' words say (the six shapes, the eight colour names, striped, checked
and gradient backgrounds, dotted and striped subjects) in another style: its own paint for each
colour name, shapes built from PIL primitives at 3x and downsampled with a Lanczos filter (so
edges ring), stars with a fatter waist, hearts from two discs and a square, backgrounds always in
two named colours, stripes and checks at any angle and at periods toy/scenes.py never uses,
radial gradients, dots on a hexagonal lattice, radii 6-26 px at any rotation. A model trained
on toy/scenes.py has seen none of it: the VAE and the inversion are measured on these scenes to
show how far the world carries.
"""

import math

import numpy as np
from PIL import Image, ImageDraw

from toy.scenes import SHAPES, article

SIZE, UP = 64, 3
PAINT = {  # the same names, other values
    "red": (200, 30, 45), "green": (60, 150, 50), "blue": (30, 60, 190),
    "yellow": (250, 225, 70), "purple": (120, 50, 160), "orange": (235, 120, 20),
    "white": (250, 250, 250), "black": (10, 10, 10),
}


def _mask(shape: str, x: float, y: float, r: float, angle: float) -> np.ndarray:
    """Coverage of a shape, float32 [SIZE, SIZE] in [0, 1] (3x render, Lanczos down)."""
    big = Image.new("L", (SIZE * UP, SIZE * UP), 0)
    d = ImageDraw.Draw(big)
    c, R = (x * UP, y * UP), r * UP
    cos, sin = math.cos(math.radians(angle)), math.sin(math.radians(angle))

    def rot(points):
        return [(c[0] + px * cos - py * sin, c[1] + px * sin + py * cos) for px, py in points]

    if shape in ("circle", "ring"):
        d.ellipse([c[0] - R, c[1] - R, c[0] + R, c[1] + R], fill=255)
        if shape == "ring":
            h = 0.6 * R
            d.ellipse([c[0] - h, c[1] - h, c[0] + h, c[1] + h], fill=0)
    elif shape in ("square", "triangle"):
        n = 4 if shape == "square" else 3
        d.regular_polygon((c[0], c[1], R), n, rotation=angle + (45 if n == 4 else 0), fill=255)
    elif shape == "star":
        pts = [((R if k % 2 == 0 else 0.5 * R) * math.cos(math.radians(k * 36 - 90)),
                (R if k % 2 == 0 else 0.5 * R) * math.sin(math.radians(k * 36 - 90)))
               for k in range(10)]
        d.polygon(rot(pts), fill=255)
    elif shape == "heart":  # two discs on a square standing on its corner
        s = 0.62 * R
        d.polygon(rot([(0, 1.0 * R), (-s, 0.1 * R), (0, -0.55 * R), (s, 0.1 * R)]), fill=255)
        for cx, cy in rot([(-s / 2, -0.25 * R), (s / 2, -0.25 * R)]):
            d.ellipse([cx - s / 1.3, cy - s / 1.3, cx + s / 1.3, cy + s / 1.3], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}")
    small = big.resize((SIZE, SIZE), Image.LANCZOS)
    return np.asarray(small, np.float32) / 255.0


def _plane(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates turned by a random angle: (u, v) float32 [SIZE, SIZE]."""
    a = rng.uniform(0, math.pi)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    return xx * math.cos(a) + yy * math.sin(a), -xx * math.sin(a) + yy * math.cos(a)


def _background(rng: np.random.Generator) -> tuple[np.ndarray, str]:
    names = rng.choice(list(PAINT), size=2, replace=False)
    a, b = (np.array(PAINT[n], np.float32) for n in names)
    pattern = str(rng.choice(["solid", "striped", "checked", "gradient"]))
    u, v = _plane(rng)
    period = float(rng.choice([5, 7, 9, 14, 20]))
    if pattern == "solid":
        mix = np.zeros((SIZE, SIZE), np.float32)
    elif pattern == "striped":
        mix = (v // period % 2).astype(np.float32)
    elif pattern == "checked":
        mix = ((u // period + v // period) % 2).astype(np.float32)
    else:  # radial, from a random centre
        cx, cy = rng.uniform(0, SIZE, 2)
        yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
        mix = np.clip(np.hypot(xx - cx, yy - cy) / (SIZE * 0.9), 0, 1)
    words = names[0] if pattern == "solid" else f"{names[0]} and {names[1]} {pattern}"
    return a * (1 - mix[..., None]) + b * mix[..., None], f"{article(words)} {words}"


def scene(seed: int) -> tuple[np.ndarray, str]:
    """(image uint8 [64, 64, 3], caption in the toy world's words) of a seed."""
    rng = np.random.default_rng([seed, 7919])
    img, bg_words = _background(rng)
    shape = str(rng.choice(SHAPES))
    colour, second = (str(n) for n in rng.choice(list(PAINT), size=2, replace=False))
    r = float(rng.uniform(6, 26))
    x, y = rng.uniform(r, SIZE - r, 2)
    cov = _mask(shape, x, y, r, float(rng.uniform(0, 360)))[..., None]
    body = np.broadcast_to(np.array(PAINT[colour], np.float32), img.shape).copy()
    texture = str(rng.choice(["plain", "dots", "stripes"]))
    u, v = _plane(rng)
    step = max(5.0, r * rng.uniform(0.4, 0.8))
    if texture == "dots":  # a hexagonal lattice
        rows = v / (step * 0.866)
        du = (u / step + 0.5 * (np.floor(rows + 0.5) % 2) + 0.5) % 1 - 0.5
        dv = ((rows + 0.5) % 1 - 0.5) * 0.866
        body[du**2 + dv**2 < 0.3**2] = PAINT[second]
    elif texture == "stripes":
        body[v / step % 1 < 0.45] = PAINT[second]
    img = img * (1 - cov) + body * cov
    noun = f"{colour} {shape}" + ("" if texture == "plain" else f" with {second} {texture}")
    caption = f"a photo of {article(noun)} {noun} on {bg_words} background"
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), caption
