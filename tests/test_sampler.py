"""The sampler's hooks for editing recipes: per-step callback, ctrl.steps, per-step unconditional
contexts for a whole batch, site shapes and the batch-row helper."""

import torch
from einops import rearrange

from sd import ddim
from sd.attention import Control, attention
from sd.config import TINY
from sd.pipeline import Pipeline, rows

PROMPTS = ["a red circle", "a blue square", "a green star", "a yellow heart"]


class Record(Control):
    """Fused attention; remembers (step, steps, t) and the query shape of every call."""

    def __init__(self):
        super().__init__()
        self.calls, self.queries = [], {}

    def __call__(self, q, k, v, site):
        self.calls.append((self.step, self.steps, self.t))
        self.queries[site] = q.shape[2]
        return attention(q, k, v)


def test_callback_sees_every_step_and_edits_the_latents(tiny):
    pipe = Pipeline(tiny, TINY)
    seen = []

    def keep(step, t, x):
        seen.append((step, t, x.clone()))
        return x

    plain = pipe(PROMPTS[:2], steps=4, output="latent")
    kept = pipe(PROMPTS[:2], steps=4, output="latent", callback=keep)
    assert torch.equal(plain, kept)
    assert [s for s, _, _ in seen] == [0, 1, 2, 3]
    assert [t for _, t, _ in seen] == ddim.timesteps(4, TINY.schedule).tolist()
    assert torch.equal(seen[-1][2], plain)
    # Whatever the callback returns is what the next step starts from.
    zeroed = pipe(PROMPTS[:2], steps=4, output="latent", callback=lambda i, t, x: x * (i != 3))
    assert zeroed.abs().max() == 0
    halfway = pipe(PROMPTS[:2], steps=4, output="latent",
                   callback=lambda i, t, x: torch.zeros_like(x) if i == 1 else x)
    assert not torch.equal(halfway, plain) and halfway.abs().max() > 0


def test_ctrl_steps_is_the_schedule_length(tiny):
    pipe = Pipeline(tiny, TINY)
    for steps in (3, 7):
        rec = Record()
        pipe(PROMPTS[:1], steps=steps, ctrl=rec, output="latent")
        assert {c[1] for c in rec.calls} == {steps}
        assert sorted({c[0] for c in rec.calls}) == list(range(steps))


def test_one_row_of_per_step_contexts_serves_every_prompt(tiny):
    pipe = Pipeline(tiny, TINY)
    x = pipe.noise(3, 64, 64, seed=1)
    cond = pipe.encode_prompt(PROMPTS[:3])
    uncond = [pipe.encode_prompt(f"step {i}") for i in range(3)]  # [1, 77, width] each
    wide = [u.expand(3, -1, -1).clone() for u in uncond]
    a = pipe.sample(x, cond, uncond, steps=3)
    b = pipe.sample(x, cond, wide, steps=3)
    assert torch.equal(a, b)
    assert not torch.equal(a, pipe.sample(x, cond, uncond[:1] * 3, steps=3))


def test_site_shape_matches_the_queries(tiny):
    pipe, rec = Pipeline(tiny, TINY), Record()
    pipe(PROMPTS[:1], steps=1, height=80, width=48, ctrl=rec, output="latent")  # latent 10 x 6
    assert rec.queries  # odd sides at level 1 and 2: ceil halving
    for site, n in rec.queries.items():
        h, w = site.shape((10, 6))
        assert h * w == n, (site.name, h, w, n)


def test_rows_by_hand():
    assert rows(8, 4, "cond", group=1, groups=2) == [6, 7]
    assert rows(8, 4, "uncond", group=0, groups=2) == [0, 1]
    assert rows(8, 4, "both", group=1, groups=2) == [2, 3, 6, 7]
    assert rows(8, 4) == list(range(8))
    assert rows(4, 4, "cond", group=0, groups=2) == [0, 1]  # guidance 1: no unconditional half
    assert rows(4, 4, "uncond") == []


def test_rows_pick_the_contexts_they_name(tiny):
    """At a cross site, the keys of the rows `rows()` names come from those prompts' contexts."""
    pipe = Pipeline(tiny, TINY)
    keys = {}

    class Keys(Control):
        def __call__(self, q, k, v, site):
            if site.kind == "cross":
                keys[site.name] = (k.clone(), self.prompts)
            return attention(q, k, v)

    pipe(PROMPTS, negative="blurry", steps=1, ctrl=Keys(), output="latent")
    cond, uncond = pipe.encode_prompt(PROMPTS), pipe.encode_prompt("blurry")
    name, (k, prompts) = next(iter(keys.items()))
    layer = tiny.unet.get_submodule(name)
    split = "b n (h d) -> b h n d"
    assert prompts == 4
    for group in (0, 1):
        want = rearrange(layer.to_k(cond[2 * group : 2 * group + 2]), split, h=layer.heads)
        torch.testing.assert_close(k[rows(8, 4, "cond", group, 2)], want)
    want = rearrange(layer.to_k(uncond), split, h=layer.heads).expand(2, -1, -1, -1)
    torch.testing.assert_close(k[rows(8, 4, "uncond", 1, 2)], want)
