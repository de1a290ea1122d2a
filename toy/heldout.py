"""The toy world as the recipes' benchmark: held-out one-subject scenes, their images as
tensors, keypoints defined on a subject, and scene pairs for correspondence."""

import math

import torch

from toy import scenes as world


def scenes(count: int) -> list:
    """The first `count` held-out toy scenes with one subject (every --toy evaluation's set)."""
    found, i = [], 0
    while len(found) < count:
        scene, i = world.test_scene(i, two=0.0), i + 1
        if len(scene.subjects) == 1:
            found.append(scene)
    return found


def image(array) -> torch.Tensor:
    """A render [H, W, 3] uint8 -> [1, 3, H, W] in [0, 1]."""
    return torch.from_numpy(array).permute(2, 0, 1)[None].float() / 255


def keypoints(subject) -> torch.Tensor:
    """[K, 2] pixel points defined on a subject: the centre (mean of its outline), the tips of
    triangles, squares and stars and a heart's bottom, placed as toy/scenes.py draws them."""
    poly = torch.tensor(world.outline(subject.shape)[0], dtype=torch.float32)
    n = len(poly)  # a heart's outline is parametric in t; its bottom tip is at t = pi
    tips = {"triangle": poly, "square": poly, "star": poly[::2],
            "heart": poly[n // 2:n // 2 + 1]}.get(subject.shape, poly[:0])
    a = math.radians(subject.angle)
    rot = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    unit = torch.cat([poly.mean(0, keepdim=True), tips])
    return unit @ rot.T * subject.radius + torch.tensor([subject.x, subject.y])


def pairs(count: int) -> list[tuple]:
    """Held-out one-subject scenes paired with the next of the same shape and another colour
    (so places, sizes and colours differ), the six shapes in turn: [(source, target), ...]."""
    waiting, found, i = {}, [], 0
    while len(found) < count:
        scene, i = world.test_scene(i, two=0.0), i + 1
        shape = scene.subjects[0].shape
        if len(scene.subjects) != 1 or any(shape == a.subjects[0].shape for a, _ in found[-5:]):
            continue  # the last five pairs hold the other shapes: wait for the sixth
        other = waiting.pop(shape, None)
        if other is not None and other.subjects[0].colour != scene.subjects[0].colour:
            found.append((other, scene))
        else:
            waiting[shape] = scene
    return found
