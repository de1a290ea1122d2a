"""The swap runner and its pictures on the tiny random model: several pairs in one batch, null
contexts per pair, baselines, target prompts, recorders."""

import pytest
import torch

from photoswap.settings import PRESETS, Layers, settings_for
from photoswap.swap import Pair, control, replace_words, run, subjects_of
from photoswap.visual import Recorder, layout_rgb, sweep
from sd.config import TINY
from sd.controls import Combined
from sd.pipeline import Pipeline

CAT, DOG = "a photo of a cat on grass", "a photo of a sks dog on grass"
BALL, CUBE = "a red ball on a table", "a red <cube> on a table"


def pair(pipe, source, target, sw, tw, seed):
    return Pair(source, target, sw, tw, pipe.noise(1, 64, 64, seed))


def test_several_swaps_in_one_batch_equal_one_at_a_time(tiny):
    pipe = Pipeline(tiny, TINY)
    pairs = [pair(pipe, CAT, DOG, ["cat"], ["sks dog"], 1),
             pair(pipe, BALL, "a red cube on a table", ["ball"], ["cube"], 2)]
    s = settings_for("photoswap", "paper")
    both, _ = run(pipe, pairs, s, steps=8)
    for i, p in enumerate(pairs):
        alone, _ = run(pipe, [p], s, steps=8)
        scale = alone.abs().max().item()
        torch.testing.assert_close(both[[i, 2 + i]], alone, rtol=0, atol=1e-5 * scale)


def test_null_contexts_per_pair_are_shared_by_source_and_target(tiny):
    pipe = Pipeline(tiny, TINY)
    nulls = [[pipe.encode_prompt(f"null {i} {j}") for j in range(4)] for i in range(2)]
    pairs = [pair(pipe, CAT, DOG, ["cat"], ["sks dog"], 1),
             pair(pipe, BALL, "a red cube on a table", ["ball"], ["cube"], 2)]
    pairs[0].uncond, pairs[1].uncond = nulls
    s = settings_for("none")
    out, _ = run(pipe, pairs, s, steps=4)
    for i, p in enumerate(pairs):  # with no swap, each row is plain sampling with its contexts
        x = p.x_T.repeat(2, 1, 1, 1)
        want = pipe.sample(x, pipe.encode_prompt([p.source, p.target]), nulls[i], 4)
        scale = want.abs().max().item()
        torch.testing.assert_close(out[[i, 2 + i]], want, rtol=0, atol=1e-5 * scale)
    pairs[1].uncond = nulls[1][:3]
    with pytest.raises(ValueError, match="inversion's step count"):
        run(pipe, pairs, s, steps=4)


def test_settings_for_methods_and_overrides():
    paper = PRESETS["paper"]
    assert settings_for("photoswap") == paper
    p2p = settings_for("p2p")
    assert p2p.phi.window == 0 and p2p.a.window == 0.8 and p2p.m.layers == Layers(min_level=2)
    assert p2p.blend_start == 0.0  # the p2p notebook's LocalBlend blends from the first step
    none = settings_for("none")
    assert (none.phi.window, none.m.window, none.a.window, none.blend_start) == (0, 0, 0, None)
    s = settings_for("photoswap", "official", phi=0.3, a=0.1, blend_start=0.5)
    assert (s.phi.window, s.m.window, s.a.window, s.blend_start) == (0.3, 0.0, 0.1, 0.5)
    assert s.phi.half == "both" and s.a.half == "cond" and s.phi.rule == "f*T+1"
    assert settings_for("photoswap", blend_start=False).blend_start is None


def test_replace_words():
    assert replace_words("A cat, a wildcat; cat.", ["cat"], ["sks dog"]) == \
        "A sks dog, a wildcat; sks dog."
    assert replace_words("a cat next to a dog", ["cat", "dog"], ["sks dog", "<my-cat>"]) == \
        "a sks dog next to a <my-cat>"  # one pass: the new "dog" is not replaced again
    assert replace_words("a black cat", ["black cat"], ["sks cat"]) == "a sks cat"


def test_recorder_changes_nothing_and_draws(tiny):
    pipe = Pipeline(tiny, TINY)
    p = pair(pipe, CAT, DOG, ["cat"], ["sks dog"], 3)
    s = settings_for("photoswap")
    plain, _ = run(pipe, [p], s, steps=5)
    rec = Recorder(subjects_of(pipe, [p]), latent_hw=(8, 8), layout_level=1)
    out, _ = run(pipe, [p], s, steps=5, ctrl=Combined(control(pipe, [p], s), rec))
    assert torch.equal(out, plain)
    assert rec.heat.shape == (2, 8, 8) and rec.heat.min() > 0
    assert rec.layout.shape == (2, 16, 16)  # level 1 of an 8x8 latent: 4x4 queries
    rgb = layout_rgb(rec.layout, (4, 4))
    assert rgb.shape == (2, 3, 4, 4)
    assert rgb.amin((2, 3)).eq(0).all() and rgb.amax((2, 3)).eq(1).all()


def test_layout_rgb_is_the_singular_structure():
    """A map made of two blocks (left and right halves attend within themselves) colours the
    halves apart in the first component."""
    n = 16
    block = torch.zeros(n, n)
    block[: n // 2, : n // 2], block[n // 2 :, n // 2 :] = 2 / n, 1.8 / n  # singular values 1, 0.9
    rgb = layout_rgb(block[None] + 1e-3, (4, 4))[0]
    top, bottom = rgb[0, :2], rgb[0, 2:]
    assert (top.mean() - bottom.mean()).abs() > 0.9


def test_sweep_grid_order(tiny):
    pipe = Pipeline(tiny, TINY)
    p = pair(pipe, CAT, DOG, ["cat"], ["sks dog"], 4)
    cells = sweep(pipe, p, settings_for("photoswap"), [0.0, 1.0], [0.0, 0.5], steps=4,
                  guidance=7.5)
    assert [[(a, b) for a, b, _ in row] for row in cells] == [[(0.0, 0.0), (0.0, 0.5)],
                                                              [(1.0, 0.0), (1.0, 0.5)]]
    one, _ = run(pipe, [p], settings_for("photoswap", phi=1.0, a=0.5), steps=4)
    torch.testing.assert_close(cells[1][1][2], one[1:])
    assert not torch.equal(cells[0][0][2], cells[1][1][2])
