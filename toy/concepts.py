"""DreamBooth concepts for the toy world: particular objects the base model can almost describe.

Each concept is one specific object whose kind the base model knows in words (its shape, paints
and texture: "a purple star with white dots") but not its identity: pretraining draws every
texture with its period, size, direction and phase at random, and never draws an outline or a
notch, so "a purple star with white dots" names a family of looks and the concept is one member
of it (its dot spacing, dot size and phase; a stripe direction and a black rim; a notch; the split
direction of a two-tone and a white rim). Its 5 reference images vary pose, size, position and
background, from fixed seeds of their own, so they are the same on every machine; renders from
further seeds are the concept's held-out views, and `lookalike` draws the same kind with another
layout (what the identity measure, toy/identity.py, must tell apart).
"""

from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from sd.files import atomic_write
from toy.scenes import SIZE, Scene, Subject, backdrop, ground, render, train_scene
from toy.scenes import caption as scene_caption

# name -> (class word, the concept's subject at unit pose)
CONCEPTS: dict[str, tuple[str, Subject]] = {
    "dotted-star": ("star", Subject("star", "purple", 0, 0, 1, 0, texture="dotted",
                                    second="white", period=0.5, duty=0.3)),
    "striped-heart": ("heart", Subject("heart", "red", 0, 0, 1, 0, texture="striped",
                                       second="white", period=0.45, duty=0.35, turn=45,
                                       outline="black")),
    "notched-ring": ("ring", Subject("ring", "orange", 0, 0, 1, 0, notch=True)),
    "two-tone-square": ("square", Subject("square", "blue", 0, 0, 1, 0, texture="two-tone",
                                          second="yellow", turn=45, outline="white")),
}
REFERENCES = 5
CONCEPT_SEED = 2 * 10**9  # above both scene splits


def concept_scene(name: str, index: int, subject: Subject | None = None) -> Scene:
    """View `index` of a concept (0-4: its references; from 5: held-out views): one subject,
    varied pose, on a varied background in colours the subject does not use. With `subject`,
    that subject (a lookalike) in the same pose and scene."""
    if name not in CONCEPTS:
        raise ValueError(f"unknown concept {name!r}; choose one of {sorted(CONCEPTS)}")
    rng = np.random.default_rng([CONCEPT_SEED, sorted(CONCEPTS).index(name), index])
    base = CONCEPTS[name][1] if subject is None else subject
    radius = float(rng.uniform(14, 20))
    x, y = rng.uniform(radius + 1, SIZE - radius - 1, size=2)
    subject = replace(base, x=float(x), y=float(y), radius=radius,
                      angle=float(rng.uniform(-25, 25)))
    bg, pattern, second = ground(rng, (base.colour, base.second, base.outline))
    return Scene((subject,), bg, pattern, int(rng.choice([4, 6, 8, 10, 12, 16])),
                 int(rng.integers(4)), second)


def lookalike(name: str, index: int) -> Subject:
    """A subject of the concept's kind (shape, paints, texture) in another layout: the period,
    size, direction and phase of its texture drawn as pretraining draws them, and no rim or
    notch (a solid concept's lookalike is the plain shape)."""
    base = CONCEPTS[name][1]
    rng = np.random.default_rng([CONCEPT_SEED, sorted(CONCEPTS).index(name), index, 1])
    return replace(base, outline=None, notch=False, period=float(rng.uniform(0.35, 0.9)),
                   duty=float(rng.uniform(0.2, 0.38) if base.texture == "dotted"
                              else rng.uniform(0.3, 0.6)),
                   turn=float(rng.uniform(0, 180)), phase=tuple(map(float, rng.random(2))))


def references(name: str, count: int = REFERENCES,
               first: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """(image uint8 [64, 64, 3], mask bool [64, 64]) of views first.. of a concept (the
    references by default)."""
    out = []
    for i in range(first, first + count):
        image, masks, _ = render(concept_scene(name, i))
        out.append((image, masks[0]))
    return out


def prompt(name: str, token: str = "sks") -> str:
    """DreamBooth's instance prompt, e.g. "a photo of sks star"."""
    return f"a photo of {token} {CONCEPTS[name][0]}"


def caption(name: str, index: int, token: str = "sks") -> str:
    """View `index` in the world's words with the concept's token for its subject: "a photo of
    sks star on a black and green striped background" (what the world's captions say of a
    scene, less the colours and texture that the token stands for)."""
    return f"{prompt(name, token)} on {backdrop(concept_scene(name, index))}"


def class_captions(word: str, count: int) -> list[str]:
    """Captions of the first `count` one-subject training scenes whose subject is a `word`
    ("a photo of a red star with white stripes on a blue background"): the class in the words
    the base model learnt, for prior preservation's images."""
    out, i = [], 0
    while len(out) < count:
        scene = train_scene(i)
        if len(scene.subjects) == 1 and scene.subjects[0].shape == word:
            out.append(scene_caption(scene))
        i += 1
    return out


def write(name: str, folder: str | Path, count: int = REFERENCES,
          captions: bool = False) -> list[Path]:
    """Save a concept's reference images as PNGs (an image folder for train.dreambooth), with
    `captions`, each with its caption (`caption`) as NAME.txt beside it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i, (image, _) in enumerate(references(name, count)):
        files.append(folder / f"{name}-{i}.png")
        text = folder / f"{name}-{i}.txt"
        if captions:
            with atomic_write(text) as tmp:
                tmp.write_text(caption(name, i) + "\n")
        else:
            text.unlink(missing_ok=True)
        with atomic_write(files[-1]) as tmp:
            Image.fromarray(image).save(tmp, format="PNG")
    return files
