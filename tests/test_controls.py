"""What a control sees and what the shipped controls (HeatMap, StoreMaps) read, pinned down.

The references here never call `sd.attention.attention_map`: maps are recomputed from the q and k
a control is handed, with an einsum and an explicit 1/sqrt(d), so a wrong scale, a wrong batch
half, wrong token columns or a transposed reshape in the code under test shows as a difference.
"""

import math

import torch
from conftest import assert_parity, relative_difference

from sd.attention import Control, Site, attention
from sd.config import TINY
from sd.controls import Combined, HeatMap, StoreMaps
from sd.pipeline import Pipeline, grouped, rows

# Recomputed fp64 maps against our fp32 ones: 8e-8 to 2.5e-7 relative observed (default, AVX2
# and AVX-512 kernels, 1 and 2 threads); 1e-5 leaves 40x for other CPUs' summation orders, while
# the bugs these tests exist for (a dropped 1/sqrt(d), the other batch half, a transposed map,
# the wrong token) move the maps by 1e-2 to 1.
REL = 1e-5
PROMPTS = ["a photo of a red circle on a blue striped background", "an astronaut riding a horse"]


def reference_map(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) in float64 (Vaswani et al. 2017, eq. 1): [B, H, Nq, Nk]."""
    scores = torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double()) / math.sqrt(q.shape[-1])
    return scores.softmax(-1)


def side(n: int, level: int) -> int:
    """A latent side after `level` UNet downsamplers (3x3, stride 2, pad 1: n -> ceil(n / 2))."""
    for _ in range(level):
        n = (n + 1) // 2
    return n


class Tap(Control):
    """Hands every call to `inner` after calling `look(q, k, v, site, call)`, where `call` counts
    UNet evaluations itself (a new one starts whenever the first site comes round again)."""

    def __init__(self, inner: Control, look, first_site: str):
        super().__init__()
        self.inner, self.look, self.first, self.call = inner, look, first_site, -1

    def __call__(self, q, k, v, site):
        self.call += site.name == self.first
        self.inner.step, self.inner.t, self.inner.prompts = self.step, self.t, self.prompts
        self.look(q, k, v, site, self.call)
        return self.inner(q, k, v, site)


@torch.no_grad()
def test_control_sees_uncond_then_cond(tiny):
    """Under guidance the batch is [uncond x n, cond x n]; at guidance 1 it is [cond x n]."""
    pipe = Pipeline(tiny, TINY)
    first = tiny.unet.sites[1]  # the first cross-attention site
    assert first.kind == "cross"
    to_k = tiny.unet.get_submodule(first.name).to_k
    heads = TINY.unet.heads[first.level]

    def keys(context):  # what that site's k must be for a given text context: [B, H, 77, D]
        return to_k(context).unflatten(-1, (heads, -1)).transpose(1, 2)

    cond, uncond = pipe.encode_prompt(PROMPTS), pipe.encode_prompt(["blurry"] * 2)
    for guidance, expected in ((7.5, torch.cat([keys(uncond), keys(cond)])), (1.0, keys(cond))):
        seen = []
        tap = Tap(Control(), lambda q, k, v, site, call: seen.append((site, k, call)),
                  tiny.unet.sites[0].name)
        pipe(PROMPTS, "blurry", steps=2, guidance=guidance, ctrl=tap, output="latent")
        ks = [(k, call) for site, k, call in seen if site == first]
        assert [call for _, call in ks] == [0, 1] and tap.prompts == 2
        for k, _ in ks:
            assert relative_difference(k, expected) <= REL
        assert relative_difference(expected[-2:], keys(uncond)) > 0.1  # the halves do differ


def synthetic_qk(h: int, w: int, regions: list[torch.Tensor], tokens: list[int], score: float):
    """q, k for one cross-attention call whose map is known in closed form.

    Row b's query at pixel (y, x) is e_j * sqrt(score * sqrt(d)) where regions[b][j][y, x] is
    True, else 0; token tokens[j]'s key is e_j * sqrt(score * sqrt(d)), every other key 0. So in
    its region token j scores `score` against 0 for the other 76 tokens, elsewhere all score 0.
    """
    d = 8
    a = math.sqrt(score * math.sqrt(d))
    b = len(regions)
    q = torch.zeros(b, 2, h * w, d)
    k = torch.zeros(b, 2, 77, d)
    for row, masks in enumerate(regions):
        for j, mask in enumerate(masks):
            q[row, :, mask.flatten(), j] = a  # row-major pixels: index y * w + x
            k[row, :, tokens[j], j] = a
    return q, k, torch.randn(b, 2, 77, d)


def closed_form(masks: list[torch.Tensor], score: float) -> torch.Tensor:
    """synthetic_qk's map for its tokens: exp(s_j) / (sum_j exp(s_j) + the other tokens' e^0),
    s_j = score inside masks[j], else 0: [tokens, h, w], float64."""
    s = torch.stack(masks).double() * score
    return s.exp() / (s.exp().sum(0) + 77 - len(masks))


def box(h: int, w: int, y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
    m = torch.zeros(h, w, dtype=torch.bool)
    m[y0:y1, x0:x1] = True
    return m


def test_heat_map_reads_cond_half_tokens_and_orientation():
    """Two prompts at a 10x6 latent: per prompt and token a known region lights up, the
    unconditional rows light up other regions, so a wrong half, column, scale or a transposed
    reshape (10x6 and 6x10 hold the same values) changes the map."""
    h, w, tokens, score = 10, 6, [5, 9], 2.0
    heat = HeatMap(tokens, (h, w))
    heat.prompts = 2
    cond = [[box(h, w, 0, 3, 0, 2), box(h, w, 7, 10, 4, 6)],   # prompt 0: top left, bottom right
            [box(h, w, 0, 10, 5, 6), box(h, w, 4, 5, 0, 6)]]   # prompt 1: right column, one row
    uncond = [[box(h, w, 5, 10, 0, 3)] * 2, [box(h, w, 0, 2, 0, 6)] * 2]
    q, k, v = synthetic_qk(h, w, uncond + cond, tokens, score)
    out = heat(q, k, v, Site("s", "cross", "down", 0))
    torch.testing.assert_close(out, attention(q, k, v), rtol=1e-5, atol=1e-6)  # output unchanged
    expected = torch.stack([closed_form(masks, score) for masks in cond])
    assert_parity("heat map, synthetic 10x6", heat.total, expected.float(), REL)
    normalised = heat.normalised()
    assert torch.equal(normalised > 0.5, torch.stack([torch.stack(c) for c in cond]))
    # A second site at level 1 (5x3) adds its map, resized to 10x6.
    q1, k1, v1 = synthetic_qk(5, 3, [[box(5, 3, 0, 5, 0, 3)] * 2] * 2
                              + [[box(5, 3, 0, 1, 0, 3), box(5, 3, 0, 5, 2, 3)]] * 2,
                              tokens, score)
    heat(q1, k1, v1, Site("s1", "cross", "up", 1))
    low = closed_form([box(5, 3, 0, 1, 0, 3), box(5, 3, 0, 5, 2, 3)], score)
    # DAAM's resize: bicubic, clamped at 0 (bicubic overshoots).
    up = torch.nn.functional.interpolate(low[None], size=(h, w), mode="bicubic")[0].clamp_min(0)
    assert_parity("heat map, two sites", heat.total, (expected + up).float(), REL)
    assert heat.total[:, 0, 0].sum() > heat.total[:, 0, -1].sum()  # row 0 lit at level 1


def test_word_indices_multi_token_and_repeated_words(tiny):
    """The token columns HeatMap reads: every piece of a split word, every occurrence."""
    pipe = Pipeline(tiny, TINY)
    tok = pipe.tokenizer
    prompt = "a photoswapping cat beside a cat"
    ids = tok(prompt)[0].tolist()
    split = tok.word_indices(prompt, "photoswapping")
    assert len(split) > 1 and split == list(range(split[0], split[0] + len(split)))
    pieces = tok(["photoswapping"])[0].tolist()[1:1 + len(split)]
    assert [ids[i] for i in split] == pieces
    cats = tok.word_indices(prompt, "cat")
    cat_id = tok(["cat"])[0, 1].item()
    assert len(cats) == 2 and all(ids[i] == cat_id for i in cats)
    assert sorted(i for i, t in enumerate(ids) if t == cat_id) == cats
    assert cats[0] == split[-1] + 1  # "cat" follows the last piece of "photoswapping"


@torch.no_grad()
def test_heat_map_in_the_pipeline_matches_a_reference(tiny):
    """HeatMap over a 3-step run at a 10x7 latent equals the sum, over down/up cross sites and
    steps, of the conditional rows' head-averaged maps of its tokens, recomputed from the same q
    and k and resized as DAAM does (Tang et al. 2023: bicubic, clamped at 0)."""
    pipe = Pipeline(tiny, TINY)
    prompts = ["a cat beside a cat", "a photoswapping dog"]
    tokens = pipe.tokenizer.word_indices(prompts[0], "cat")
    h, w = 10, 7  # odd: level 1 is 5x4 (a downsampler rounds up), not 5x3
    heat = HeatMap(tokens, (h, w))
    expected = torch.zeros(2, len(tokens), h, w, dtype=torch.float64)

    def look(q, k, v, site, call):
        nonlocal expected
        if site.kind != "cross" or site.place == "mid":  # DAAM leaves the mid block out
            return
        maps = reference_map(q, k)[-2:].mean(1)[..., tokens]  # cond rows: [2, h*w, tokens]
        maps = maps.transpose(1, 2).unflatten(-1, (side(h, site.level), side(w, site.level)))
        up = torch.nn.functional.interpolate(maps, size=(h, w), mode="bicubic").clamp_min(0)
        expected += up

    tap = Tap(heat, look, tiny.unet.sites[0].name)
    pipe(prompts, steps=3, ctrl=tap, height=8 * h, width=8 * w, output="latent")
    assert tap.call == 2
    assert_parity("heat map in the pipeline", heat.total, expected, REL)


@torch.no_grad()
def test_store_maps_records_each_site_once_per_step(tiny):
    pipe = Pipeline(tiny, TINY)
    store = StoreMaps(keep=lambda site: True, head_mean=True)
    seen: dict[tuple[int, str], torch.Tensor] = {}

    def look(q, k, v, site, call):
        assert (call, site.name) not in seen, f"{site.name} called twice in step {call}"
        seen[call, site.name] = reference_map(q, k).mean(1)

    tap = Tap(store, look, tiny.unet.sites[0].name)
    pipe(PROMPTS, steps=3, ctrl=tap, height=80, width=48, output="latent")
    names = [s.name for s in tiny.unet.sites]
    assert sorted(store.maps) == [0, 1, 2] == sorted({c for c, _ in seen})
    worst = 0.0
    for step, maps in store.maps.items():
        assert list(maps) == names  # each site once, in execution order
        for site in tiny.unet.sites:
            n = side(10, site.level) * side(6, site.level)
            shape = (4, n, n if site.kind == "self" else 77)
            assert maps[site.name].shape == shape and maps[site.name].device.type == "cpu"
            rel = relative_difference(maps[site.name], seen[step, site.name])
            assert rel <= REL, (step, site.name, rel)
            worst = max(worst, rel)
    print(f"\nPARITY StoreMaps, every site and step: {worst:.2e} relative (bound {REL:.0e})")


def test_grouped_is_a_view_and_rows_a_copy():
    x = torch.arange(8.0).reshape(8, 1)  # [uncond src x2, uncond tgt x2, cond src x2, cond tgt x2]
    view = grouped(x, 4, 2)
    assert view.shape == (2, 2, 2, 1) and view[1, 1].flatten().tolist() == [6, 7]
    view[1, 1] += 100  # cond targets, in place
    assert x.flatten().tolist() == [0, 1, 2, 3, 4, 5, 106, 107]
    x[rows(8, 4, "cond", 1, 2)].add_(1000)  # a copy edited in place: lost
    assert x.flatten().tolist() == [0, 1, 2, 3, 4, 5, 106, 107]
    assert grouped(torch.zeros(4, 3), 4).shape == (1, 1, 4, 3)  # guidance 1: no uncond half


def test_combined_observers_see_every_call_and_change_nothing(tiny):
    pipe, tokens = Pipeline(tiny, TINY), [2, 3]

    class Double(Control):  # an edit: cross-attention outputs doubled
        def __call__(self, q, k, v, site):
            out = attention(q, k, v)
            return 2 * out if site.kind == "cross" else out

    class ByHand(Control):  # the same two, written out: what Combined must equal
        def __init__(self, edit, heat):
            super().__init__()
            self.edit, self.heat = edit, heat

        def __call__(self, q, k, v, site):
            self.heat.prompts = self.edit.prompts = self.prompts
            self.heat.observe(q, k, v, site)
            return self.edit(q, k, v, site)

    by_hand, combined = HeatMap(tokens, (8, 8)), HeatMap(tokens, (8, 8))
    ref = pipe("a red circle", steps=3, ctrl=ByHand(Double(), by_hand), output="latent")
    out = pipe("a red circle", steps=3, ctrl=Combined(Double(), combined), output="latent")
    plain = pipe("a red circle", steps=3, output="latent")
    assert torch.equal(out, ref) and not torch.equal(out, plain)  # the edit's output
    assert torch.equal(combined.total, by_hand.total)  # the observer saw every call
    assert (combined.steps, combined.prompts, combined.step) == (3, 1, 2)  # told by the sampler
