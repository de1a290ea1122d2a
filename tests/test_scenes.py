"""The toy world's scenes: determinism, exact masks, disjoint splits, parseable captions."""

from dataclasses import replace

import numpy as np
import pytest

from toy import concepts, scenes
from toy.scenes import COLOURS, HELD_OUT, PATTERNS, SHAPES, render


def test_same_seed_same_scene_and_pixels():
    a, b = scenes.train_scene(7), scenes.train_scene(7)
    assert a == b
    for x, y in zip(scenes.render(a), scenes.render(b)):
        assert np.array_equal(x, y)
    assert scenes.train_scene(8) != a


@pytest.mark.parametrize("index", range(12))
def test_masks_are_exact(index):
    scene = scenes.test_scene(index, two=0.5)
    image, masks, bg = scenes.render(scene)
    assert masks.shape == (len(scene.subjects), 64, 64) and masks.any(axis=(1, 2)).all()
    assert not (masks.sum(0) > 1).any(), "subject masks overlap"
    for s, mask in zip(scene.subjects, masks):
        full = scenes.coverage(s) == 1.0  # pixels the subject covers entirely
        inside = full & mask
        assert inside.sum() > 0.5 * mask.sum()
        paints = np.array([COLOURS[c] for c in (s.colour, s.second, s.outline) if c])
        exact = (image[inside][:, None].astype(int) == paints[None]).all(-1).any(-1)
        assert exact.all(), "a fully covered pixel is one of the subject's paints"
    outside = ~masks.any(0)
    touched = sum(scenes.coverage(s) > 0 for s in scene.subjects) > 0
    assert np.array_equal(image[outside & ~touched], bg[outside & ~touched])
    assert np.abs(image.astype(int) - bg).sum(-1)[outside].mean() < 4  # only edge pixels differ


def test_background_is_the_scene_without_subjects():
    scene = scenes.train_scene(3)
    empty = replace(scene, subjects=())
    image, masks, bg = scenes.render(empty)
    assert masks.shape == (0, 64, 64) and np.array_equal(image, bg)
    assert np.array_equal(bg, scenes.render(scene)[2])


def test_held_out_combinations_never_reach_training():
    train = [scenes.train_scene(i) for i in range(600)]
    test = [scenes.test_scene(i) for i in range(600)]
    assert not any(scenes.held_out(s) for s in train)
    assert sum(scenes.held_out(s) for s in test) > 5  # the held-out split does contain them
    pairs = {(s.shape, sc.background) for sc in train for s in sc.subjects}
    assert not pairs & HELD_OUT
    # Seed ranges: training draws seeds below TEST_SEED, the held-out split from it up.
    with pytest.raises(AssertionError):
        scenes.train_scene(scenes.TEST_SEED // 64)


def test_training_covers_every_attribute():
    train = [scenes.train_scene(i) for i in range(600)]
    subjects = [s for sc in train for s in sc.subjects]
    assert {s.shape for s in subjects} == set(SHAPES)
    assert {s.colour for s in subjects} == set(COLOURS)
    assert {sc.background for sc in train} == set(COLOURS)
    assert {sc.pattern for sc in train} == set(PATTERNS)
    assert all(s.colour != sc.background for sc in train for s in sc.subjects)
    assert 0.1 < np.mean([len(sc.subjects) == 2 for sc in train]) < 0.4


@pytest.mark.parametrize("index", range(40))
def test_captions_parse_back(index):
    scene = scenes.test_scene(index, two=0.5)
    text = scenes.caption(scene)
    assert text.startswith("a photo of ") and text.endswith(" background")
    got = scenes.parse(text)
    assert got["subjects"] == [(s.colour, s.shape) for s in scene.subjects]
    assert (got["background"], got["pattern"]) == (scene.background, scene.pattern)


def test_caption_reads_naturally():
    s = scenes.Subject("circle", "orange", 30, 30, 10, 0)
    scene = scenes.Scene((s, scenes.Subject("star", "red", 10, 10, 5, 0)), "blue", "striped")
    text = "a photo of an orange circle and a red star on a blue striped background"
    assert scenes.caption(scene) == text
    assert scenes.caption(scenes.Scene((s,), "white", "solid")).endswith("on a white background")


def test_concepts_are_new_to_pretraining():
    assert len(concepts.CONCEPTS) >= 3
    for name, (word, subject) in concepts.CONCEPTS.items():
        refs = concepts.references(name)
        assert 4 <= len(refs) <= 6 and word in SHAPES and subject.shape == word
        poses = {concepts.concept_scene(name, i).subjects[0].angle for i in range(len(refs))}
        assert len(poses) == len(refs)
        for i, (image, mask) in enumerate(refs):
            scene = concepts.concept_scene(name, i)
            if subject.notch:  # a shape no scene has: the plain ring is fuller
                plain = replace(scene, subjects=(replace(scene.subjects[0], notch=False),))
                assert render(plain)[1][0].sum() > 1.05 * mask.sum(), f"{name} has no notch"
                continue
            paint = image[mask].reshape(-1, 3)
            # Either a colour no scene uses, or two colours inside one subject: a texture.
            flat = [np.abs(paint - c).sum(1) < 30 for c in COLOURS.values()]
            assert max(f.mean() for f in flat) < 0.9, f"{name} looks like a plain subject"
    assert concepts.prompt("dotted-star") == "a photo of sks star"


def test_concept_references_written_as_an_image_folder(tmp_path):
    files = concepts.write("notched-ring", tmp_path)
    assert [f.name for f in sorted(tmp_path.iterdir())] == [f.name for f in files]
    from PIL import Image

    first = np.asarray(Image.open(files[0]).convert("RGB"))
    assert np.array_equal(first, concepts.references("notched-ring")[0][0])


# ------------------------------------------------------------------- world 2 and the outside

def test_world2_captions_name_textures_and_parse_back():
    seen = set()
    for i in range(300):
        scene = scenes.test_scene(i, two=0.5)
        got = scenes.parse(scenes.caption(scene))
        assert got["subjects"] == [(s.colour, s.shape) for s in scene.subjects]
        assert got["textures"] == [(s.texture, None if s.texture == "solid" else s.second)
                                   for s in scene.subjects]
        assert (got["background"], got["second"], got["pattern"]) == (
            scene.background, scene.second, scene.pattern)
        seen |= {s.texture for s in scene.subjects}
    assert seen == set(scenes.TEXTURES)
    s = scenes.Subject("star", "purple", 30, 30, 10, 0, texture="dotted", second="white")
    two = scenes.Subject("circle", "red", 10, 10, 5, 0, texture="two-tone", second="blue")
    text = scenes.caption(scenes.Scene((s, two), "blue", "checked", second="yellow"))
    assert text == ("a photo of a purple star with white dots and a red and blue circle on a "
                    "blue and yellow checked background")


def test_world2_textures_paint_both_colours_inside_the_mask():
    for texture in scenes.TEXTURES[1:]:
        s = scenes.Subject("square", "red", 32, 32, 20, 10, texture=texture, second="blue",
                           period=0.4, duty=0.3)
        image, masks, _ = render(scenes.Scene((s,), "white", "solid"))
        inside = image[masks[0] & (scenes.coverage(s) == 1.0)]
        for colour in ("red", "blue"):
            share = (np.abs(inside.astype(int) - COLOURS[colour]).sum(1) == 0).mean()
            assert share > 0.1, f"{texture}: {colour} covers {share:.0%} of the subject"


def test_world2_keeps_held_out_pairs_out_of_training_and_covers_the_words():
    train = [scenes.train_scene(i) for i in range(600)]
    subjects = [(s, sc) for sc in train for s in sc.subjects]
    assert not any(scenes.held_out(sc) for sc in train)
    assert not {(s.texture, s.shape) for s, _ in subjects} & scenes.HELD_OUT_TEXTURES
    assert {sc.second for sc in train} >= set(COLOURS)  # two-colour backgrounds, every colour
    assert {sc.direction for sc in train} == {0, 1, 2, 3}
    assert all(s.colour not in (sc.background, sc.second) for s, sc in subjects)
    assert all(s.second not in (sc.background, sc.second) for s, sc in subjects if s.second)
    test = [scenes.test_scene(i) for i in range(600)]
    assert any((s.texture, s.shape) in scenes.HELD_OUT_TEXTURES for sc in test
               for s in sc.subjects)


def test_outside_scenes_use_the_worlds_words_in_another_style():
    from toy import outside

    a, text = outside.scene(3)
    assert np.array_equal(a, outside.scene(3)[0]) and a.shape == (64, 64, 3)
    for i in range(40):
        image, text = outside.scene(i)
        got = scenes.parse(text)
        assert got["subjects"][0][1] in SHAPES and got["background"] in COLOURS
        assert got["pattern"] == "solid" or got["second"] in COLOURS
    palette = np.array(list(COLOURS.values()))
    pixels = np.concatenate([outside.scene(i)[0].reshape(-1, 3) for i in range(8)])
    exact = (np.abs(pixels[:, None].astype(int) - palette[None]).sum(-1) == 0).any(1)
    assert exact.mean() < 0.05, "the second renderer paints with the world's own values"
