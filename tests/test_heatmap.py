"""HeatMap against DAAM's definition, recomputed independently from the q and k it is handed."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import run_python

from sd.attention import Control, Site, attention
from sd.config import TINY
from sd.controls import HeatMap
from sd.pipeline import Pipeline


class Recorder(Control):
    """Keeps (step, site, q, k) of every call, then lets `inner` answer."""

    def __init__(self, inner: Control):
        super().__init__()
        self.inner, self.calls = inner, []

    def __call__(self, q, k, v, site):
        self.calls.append((self.step, site, q.double(), k.double()))
        for name in ("step", "steps", "t", "prompts"):
            setattr(self.inner, name, getattr(self, name))
        return self.inner(q, k, v, site)


def daam(calls, prompts: int, words: list[list[int]], hw: tuple[int, int]) -> torch.Tensor:
    """DAAM (Tang et al. 2023): per step, the mean over down/up cross layers of the conditional
    rows' head-mean map, bicubically upsampled and clamped at 0; summed over steps; a word is the
    mean of its tokens. Returns [prompts, words, h, w] in float64."""
    per_step: dict[int, list[torch.Tensor]] = {}
    for step, site, q, k in calls:
        if site.kind != "cross" or site.place == "mid":
            continue
        a = (torch.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(q.shape[-1])).softmax(-1)
        a = a[-prompts:].mean(1)  # the conditional half: [prompts, h*w, 77]
        side = [-(-n // 2**site.level) for n in hw]
        w = torch.stack([a[..., t].mean(-1) for t in words], 1).unflatten(-1, side)
        per_step.setdefault(step, []).append(F.interpolate(w, size=hw, mode="bicubic").clamp(0))
    return sum(torch.stack(m).mean(0) for m in per_step.values())


@torch.no_grad()
def test_heat_map_is_daams(tiny):
    """Two prompts, a word of one token and one of several, an odd latent (level 1 is 5x4)."""
    pipe = Pipeline(tiny, TINY)
    prompts = ["a photoswapping cat beside a cat", "a photoswapping dog on grass"]
    words = [pipe.tokenizer.word_indices(prompts[0], w) for w in ("photoswapping", "cat")]
    assert len(words[0]) > 1 and len(words[1]) == 2  # several pieces; two occurrences
    hw = (10, 7)
    heat = HeatMap([i for w in words for i in w], hw)
    rec = Recorder(heat)
    pipe(prompts, steps=3, ctrl=rec, height=8 * hw[0], width=8 * hw[1], output="latent")
    assert any(site.place == "mid" and site.kind == "cross" for _, site, _, _ in rec.calls)
    expected = daam(rec.calls, 2, words, hw)
    got = heat.maps([len(w) for w in words])
    assert got.shape == (2, 2, *hw)
    rel = ((got.double() - expected).abs().max() / expected.abs().max()).item()
    assert rel < 1e-5, rel
    # Summing steps (not averaging them): three steps weigh three times one step's maps.
    assert expected.sum() > 2 * daam([c for c in rec.calls if c[0] == 0], 2, words, hw).sum()


def test_normalised_and_masks():
    heat = HeatMap([3, 4], (4, 4))
    heat.sites = {"a", "b"}
    heat.total = torch.zeros(1, 2, 4, 4)
    heat.total[0, 0, 0, 0] = 8.0  # token 3: one hot pixel
    heat.total[0, 1] = torch.arange(16.0).reshape(4, 4)  # token 4: a ramp
    torch.testing.assert_close(heat.maps(), heat.total / 2)
    norm = heat.normalised()
    assert norm.amin((-2, -1)).eq(0).all() and norm.amax((-2, -1)).eq(1).all()
    masks = heat.masks(threshold=0.5)
    assert masks[0, 0].sum() == 1 and masks[0, 0, 0, 0]
    assert masks[0, 1].sum() == 8 and masks[0, 1, 2:].all()  # 8/15 >= 0.5: the lower half
    word = heat.maps([2])  # one word of both tokens: their mean
    torch.testing.assert_close(word[:, 0], heat.total.mean(1) / 2)


def test_heat_map_leaves_outputs_and_other_sites_alone():
    heat, g = HeatMap([1], (2, 2)), torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 4, 8, generator=g) for _ in range(3))
    for site in (Site("x", "cross", "up", 0), Site("m", "cross", "mid", 0),
                 Site("s", "self", "up", 0)):
        torch.testing.assert_close(heat(q, k, v, site), attention(q, k, v))
    assert heat.sites == {"x"}  # the mid block and self-attention are not read


@torch.no_grad()
def test_image_heat_is_the_heat_map_of_noised_copies(tiny):
    """recipes.heatmap reads HeatMap for a given latent: one guided evaluation per timestep of
    the noised latent, recorded with the step set, as a reference loop recomputes it."""
    from recipes.heatmap import image_heat
    from sd import ddim

    pipe, z = Pipeline(tiny, TINY), torch.randn(1, 4, 8, 8, generator=torch.Generator())
    prompt = "a photo of a red circle on a blue background"
    heat = image_heat(pipe, z, prompt, ["circle"], steps=3, seed=5)
    ref = HeatMap(pipe.tokenizer.word_indices(prompt, "circle"), (8, 8))
    rec = Recorder(ref)
    rec.prompts = 1
    noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(5))
    cond, uncond = pipe.encode_prompt(prompt), pipe.encode_prompt("")
    for i, t in enumerate(ddim.timesteps(3, TINY.schedule).tolist()):
        rec.step = i
        pipe.guided(ddim.add_noise(z, noise, t, pipe.ac), t, cond, uncond, 7.5, rec)
    torch.testing.assert_close(heat.maps(), ref.maps())
    expected = daam(rec.calls, 1, [ref.tokens], (8, 8))
    rel = ((heat.maps([1]).double() - expected).abs().max() / expected.abs().max()).item()
    assert rel < 1e-5, rel


def test_iou_and_centred_blob():
    from recipes.heatmap import centred_blob, iou

    blob = centred_blob(64, 48, 0.4)
    assert blob[32, 24] and not blob[0, 0] and torch.equal(blob, blob.flip(0).flip(1))
    assert iou(blob, blob) == 1 and iou(blob, ~blob) == 0
    half = torch.zeros(64, 48, dtype=torch.bool)
    half[:32] = True
    assert iou(blob, half) == pytest.approx(0.5 * blob.sum().item() / (32 * 48 + 0.5
                                                                          * blob.sum().item()))


def test_toy_heat_map_evaluation_and_picture(tiny, tmp_path):
    from recipes.heatmap import evaluate_toy, picture

    result, shown = evaluate_toy(Pipeline(tiny, TINY), scenes=2, steps=2)
    assert set(result) == {"mean iou", "centred blob iou"}
    assert all(0 <= v <= 1 for v in result.values()) and len(shown) == 2
    photo, heat, truth = shown[0]
    assert photo.shape == (3, 64, 64) and heat.shape == truth.shape == (64, 64)
    assert heat.min() == 0 and heat.max() == 1 and truth.dtype == torch.bool
    assert picture(shown, 0.4).size == (3 * 256, 2 * 256)


def test_heatmap_cli_help_is_fast_and_errors_early(tmp_path):
    r = run_python("-X", "importtime", "-m", "recipes", "heatmap", "--help")
    assert r.returncode == 0 and "--threshold" in r.stdout and " torch\n" not in r.stderr
    r = run_python("-m", "recipes", "heatmap", "--toy", "1", "--threshold", "2")
    assert r.returncode == 2 and "--threshold" in r.stderr.splitlines()[-1]
    r = run_python("-m", "recipes", "heatmap", "--toy", "1", "-o", str(tmp_path))
    assert r.returncode == 2 and "folder" in r.stderr
