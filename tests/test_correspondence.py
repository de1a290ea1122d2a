"""recipes.correspondence (Hedlin et al. 2023) on the tiny random model; the toy-world parts when
toy/scenes.py is present."""


import math
from dataclasses import replace

import pytest
import torch
from conftest import run_python
from PIL import Image

from recipes.correspondence import (
    Settings,
    argmax_point,
    correspond,
    crop_box,
    crop_maps,
    decoder_sites,
    gaussian,
    locate,
    optimise,
    pck,
)


def test_sites_are_the_coarse_decoder_cross_layers(pipe):
    sites = {s.name: s for s in pipe.models.unet.sites}
    chosen = [sites[n] for n in decoder_sites(pipe, 4)]
    assert len(chosen) == 4 and all(s.kind == "cross" and s.place == "up" for s in chosen)
    assert [s.level for s in chosen] == [1, 1, 1, 0]  # tiny: 3 layers at 4x4, then 8x8


def test_maps_are_differentiable_back_to_the_context(pipe):
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    context = torch.randn(1, 77, 32, requires_grad=True)
    sites = decoder_sites(pipe, 4)
    maps = crop_maps(pipe, image, [(0, 0, 64)], context, sites, 141, [torch.Generator()])
    assert maps.shape == (1, 4, 64, 64)
    maps[..., :8, :8].sum().backward()
    assert torch.isfinite(context.grad).all()
    assert context.grad[0, 1].abs().sum() > 0  # the first token: its map is what is read


def test_optimisation_moves_the_peak_toward_the_query(pipe):
    """From one initial embedding, fitting two different queries pulls each map's peak toward
    its own query (random tiny model, whole-image crops, a wider Gaussian, a larger step)."""
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    s = Settings(steps=30, lr=0.1, crop=1.0, crops=1, sigma=0.1)
    sites = decoder_sites(pipe, s.layers)
    seeded = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    start = torch.randn(1, 77, 32, generator=seeded())  # optimise's first draw from seed 0
    peak = lambda context: torch.tensor(argmax_point(  # noqa: E731
        locate(pipe, image, context, s, [seeded()], sites)[0]))
    before = peak(start)
    candidates = torch.tensor([[12.0, 14.0], [50.0, 40.0], [40.0, 10.0], [10.0, 54.0]])
    for q in candidates[(candidates - before).norm(dim=1).argsort()[-2:]]:  # the two farthest
        context, losses = optimise(pipe, image, q[None], s, [seeded()], sites)
        after = peak(context)
        assert losses[-1] < losses[0]
        assert (after - q).norm() < 0.5 * (before - q).norm(), (q, before, after)


def test_crops_hold_the_point_and_the_gaussian_peaks_there():
    g = torch.Generator().manual_seed(0)
    for x, y in ((0.0, 0.0), (63.0, 10.0), (30.0, 31.0)):
        for _ in range(20):
            x0, y0, c = crop_box(torch.tensor([x, y]), 64, 0.5, g)
            assert c == 32 and 0 <= x0 <= 32 and 0 <= y0 <= 32
            assert x0 <= x < x0 + c and y0 <= y < y0 + c
    m = gaussian(torch.tensor([10.5, 20.5]), 32, 2.0)
    assert argmax_point(m) == (10.5, 20.5) and m.max() == 1


def test_answers_do_not_depend_on_the_batch(pipe):
    """Each embedding draws from its own generator: any batch gives the same points and maps."""
    g = torch.Generator().manual_seed(2)
    source, target = torch.rand(2, 1, 3, 64, 64, generator=g)
    points = torch.tensor([[10.0, 20.0], [40.0, 50.0]])
    s = Settings(steps=3, inits=2, crops=5, lr=0.05)
    found, heat = correspond(pipe, source, target, points, s, seed=3, batch=4)
    assert heat.shape == (2, 64, 64) and found.shape == (2, 2)
    for batch in (1, 3):
        again, heat_again = correspond(pipe, source, target, points, s, seed=3, batch=batch)
        assert torch.equal(again, found)
        assert (heat_again - heat).abs().max() <= 1e-5 * heat.abs().max()


def test_presets_and_overrides():
    from recipes.__main__ import parse
    from recipes.settings import CORRESPONDENCE_PRESETS as PRESETS

    assert parse(["correspondence", "--toy", "1"]).settings == PRESETS["paper"]
    args = parse(["correspondence", "--toy", "1", "--preset", "toy", "--steps", "7"])
    assert args.settings == replace(PRESETS["toy"], steps=7) != PRESETS["toy"]


def test_chance_is_the_share_of_pixels_near_the_truth():
    from recipes.correspondence import chance

    centre = chance(torch.tensor([[32.0, 32.0]]), 64, 0.1)
    assert centre == pytest.approx(math.pi * 6.4**2 / 64**2, rel=0.05)
    assert chance(torch.tensor([[0.0, 0.0]]), 64, 0.1) == pytest.approx(centre / 4, rel=0.1)
    assert chance(torch.tensor([[32.0, 32.0], [0.0, 0.0]]), 64) == pytest.approx(
        (centre + chance(torch.tensor([[0.0, 0.0]]), 64)) / 2)


def test_pck():
    true = torch.tensor([[10.0, 10.0], [20.0, 20.0], [30.0, 30.0]])
    pred = true + torch.tensor([[0.0, 6.0], [6.0, 0.0], [5.0, 5.0]])  # 6, 6, 7.07 px off
    assert pck(pred, true, 64, 0.1) == pytest.approx(2 / 3)  # 6.4 px threshold
    assert pck(pred, true, torch.tensor([100.0, 50.0, 50.0]), 0.1) == pytest.approx(1 / 3)


def test_cli_help_is_fast_and_errors_are_one_line(tmp_path):
    r = run_python("-X", "importtime", "-m", "recipes", "correspondence", "--help")
    assert r.returncode == 0 and "--inits" in r.stdout and "129" in r.stdout
    assert " torch\n" not in r.stderr  # parsed before torch was imported
    r = run_python("-m", "recipes", "correspondence", "a.png")
    assert r.returncode == 2 and "--point" in r.stderr
    Image.new("RGB", (80, 64)).save(tmp_path / "a.png")
    r = run_python("-m", "recipes", "correspondence", str(tmp_path / "a.png"),
                   str(tmp_path / "nope.png"), "--point", "1", "1", "--model", "tiny")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "nope.png" in r.stderr and "Traceback" not in r.stderr
    r = run_python("-m", "recipes", "correspondence", str(tmp_path / "a.png"),
                   str(tmp_path / "a.png"), "--point", "5", "1", "--model",
                   "tiny")  # x 5 is cropped away (80 -> centre 64)
    assert r.returncode == 2 and "outside" in r.stderr and "Traceback" not in r.stderr


def test_cli_end_to_end_on_tiny(tmp_path):
    a, b, out = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "match.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(a)
    Image.new("RGB", (64, 64), (30, 30, 200)).save(b)
    r = run_python("-m", "recipes", "correspondence", str(a), str(b), "--point", "20", "30",
                   "--model", "tiny", "--steps", "2", "--inits", "2", "--crops", "5", "-o",
                   str(out), "-q")
    assert r.returncode == 0, r.stderr
    assert "query (20.0, 30.0) ->" in r.stdout
    assert Image.open(out).size == (3 * 256, 256)  # shown 4x
    r = run_python("-m", "recipes", "correspondence", "--toy", "1", "--model", "tiny", "--steps",
                   "1", "--inits", "1", "--crops", "1", "-o", str(out), "-q")
    if r.returncode == 0:  # the toy world is present
        assert "PCK@0.1: " in r.stdout and "chance 0.0" in r.stdout
        assert Image.open(out).size == (3 * 256, 256)


def test_toy_keypoints_and_pairs():
    from toy import scenes
    from toy.heldout import keypoints, pairs

    found = pairs(12)
    assert len(found) == 12 and len({a.subjects[0].shape for a, _ in found}) == 6
    for a, b in found:
        sa, sb = a.subjects[0], b.subjects[0]
        assert sa.shape == sb.shape and sa.colour != sb.colour
        for scene in (a, b):
            mask = torch.from_numpy(scenes.render(scene)[1][0])
            points = keypoints(scene.subjects[0])
            x, y = points[0].long().tolist()  # the centre lies on the shape (not for rings)
            assert scene.subjects[0].shape == "ring" or mask[y, x]
            tips = {"triangle": 3, "square": 4, "star": 5, "heart": 1}.get(sa.shape, 0)
            assert len(points) == 1 + tips
