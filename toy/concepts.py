"""DreamBooth concepts for the toy world: textured subjects that pretraining never shows.

Each concept is a subject of a shape pretraining knows (its class word) drawn in a way no
pretraining scene is: white polka dots, two-tone stripes in a colour outside the eight named ones
(pink), a notch cut out of a ring. The notched ring is orange, a named colour: the toy VAE, trained
on the named colours only, decodes teal (its first colour) as purple (its references at 17-18 dB,
mean teal (1, 148, 152) -> (109, 54, 155)), so DreamBooth could learn its notch, not its paint. Its
reference images vary pose, size, position and background; they are drawn from fixed seeds of their
own, so they are the same on every machine.
"""

from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from toy.scenes import COLOURS, PATTERNS, SIZE, Scene, Subject, render

# name -> (class word, the concept's subject at unit pose)
CONCEPTS: dict[str, tuple[str, Subject]] = {
    "dotted-star": ("star", Subject("star", "purple", 0, 0, 1, 0, texture="dots")),
    "striped-heart": ("heart", Subject("heart", "pink", 0, 0, 1, 0, texture="stripes:blue")),
    "notched-ring": ("ring", Subject("ring", "orange", 0, 0, 1, 0, texture="notched")),
}
REFERENCES = 5
CONCEPT_SEED = 2 * 10**9  # above both scene splits


def concept_scene(name: str, index: int) -> Scene:
    """Reference scene `index` of a concept: one subject, varied pose, on a varied background."""
    if name not in CONCEPTS:
        raise ValueError(f"unknown concept {name!r}; choose one of {sorted(CONCEPTS)}")
    rng = np.random.default_rng([CONCEPT_SEED, sorted(CONCEPTS).index(name), index])
    base = CONCEPTS[name][1]
    radius = float(rng.uniform(14, 20))
    x, y = rng.uniform(radius + 1, SIZE - radius - 1, size=2)
    subject = replace(base, x=float(x), y=float(y), radius=radius,
                      angle=float(rng.uniform(-25, 25)))
    # Backgrounds far from the concept's own colours, so the subject stays easy to see.
    bgs = [c for c in COLOURS if c not in ("white", base.colour)]
    return Scene((subject,), str(rng.choice(bgs)), str(rng.choice(PATTERNS)),
                 int(rng.choice([6, 8, 10, 12])), int(rng.integers(3)))


def references(name: str, count: int = REFERENCES) -> list[tuple[np.ndarray, np.ndarray]]:
    """(image uint8 [64, 64, 3], mask bool [64, 64]) for each reference image of a concept."""
    out = []
    for i in range(count):
        image, masks, _ = render(concept_scene(name, i))
        out.append((image, masks[0]))
    return out


def prompt(name: str, token: str = "sks") -> str:
    """DreamBooth's instance prompt, e.g. "a photo of sks star"."""
    return f"a photo of {token} {CONCEPTS[name][0]}"


def write(name: str, folder: str | Path, count: int = REFERENCES) -> list[Path]:
    """Save a concept's reference images as PNGs (an image folder for train.dreambooth)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i, (image, _) in enumerate(references(name, count)):
        files.append(folder / f"{name}-{i}.png")
        tmp = files[-1].with_name(files[-1].name + ".tmp")
        Image.fromarray(image).save(tmp, format="PNG")
        tmp.replace(files[-1])
    return files
