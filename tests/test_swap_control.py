"""The swap control, on the tiny random model.

Source "a photo of a cat" and target "a photo of a sks dog" differ in token length, so the A swap
runs with refinement weights (alpha 0 for the new tokens "sks" and "dog").
"""

from dataclasses import replace

import pytest
import torch

from photoswap.align import refinement, subject_indices
from photoswap.control import PhotoSwap
from photoswap.settings import PRESETS, Layers, Settings, Swap, active, end, no_swap
from sd.attention import Control, attention
from sd.config import TINY
from sd.pipeline import Pipeline

SRC, TGT = "a photo of a cat", "a photo of a sks dog"
SRC2, TGT2 = "a cat and a ball on grass", "a cat and a red cube on grass"
OFF = Settings(phi=Swap(0.0), m=Swap(0.0), a=Swap(0.0), blend_start=None)
# A random model attends almost uniformly: only a high threshold leaves part of the latent out.
BLEND = {"blend_start": 0.2, "blend_level": 0, "blend_threshold": 0.95}


def pipeline(tiny, prediction="epsilon"):
    cfg = replace(TINY, schedule=replace(TINY.schedule, prediction=prediction))
    return Pipeline(tiny, cfg)


def control(pipe, settings, pairs=((SRC, TGT, "cat", "sks dog"),), **kw):
    tok = pipe.tokenizer
    mappers = [refinement(tok, s, t) for s, t, _, _ in pairs]
    subjects = [(subject_indices(tok, s, ws), subject_indices(tok, t, wt))
                for s, t, ws, wt in pairs]
    return PhotoSwap(settings, mappers, subjects, **kw)


def swap(pipe, ctrl, prompts=(SRC, TGT), steps=10, guidance=7.5, seed=0, callback=None):
    """Every pair from one x_T per pair; prompts are [sources..., targets...]."""
    pairs = len(prompts) // 2
    x = torch.cat([pipe.noise(1, 64, 64, seed + i) for i in range(pairs)]).repeat(2, 1, 1, 1)
    cond, uncond = pipe.encode_prompt(list(prompts)), pipe.encode_prompt("")
    callback = callback or (ctrl.callback if ctrl is not None else None)
    return pipe.sample(x, cond, uncond, steps, guidance, ctrl, callback=callback)


def relative(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


ONLY = {
    "phi": Settings(phi=Swap(0.6), m=Swap(0.0), a=Swap(0.0), blend_start=None),
    "M": Settings(phi=Swap(0.0), m=Swap(0.7, Layers(min_level=1)), a=Swap(0.0), blend_start=None),
    "A": Settings(phi=Swap(0.0), m=Swap(0.0), a=Swap(0.8), blend_start=None),
    "all": Settings(blend_start=None),
    "all+blend": Settings(**BLEND),
    "official+blend": replace(PRESETS["official"], **BLEND),
}


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
@pytest.mark.parametrize("name", list(ONLY))
def test_fused_equals_explicit(tiny, name, prediction):
    pipe = pipeline(tiny, prediction)
    ctrl = control(pipe, ONLY[name])
    fused = swap(pipe, ctrl)
    if ONLY[name].blend_start is not None:  # the blend really leaves part of the latent out
        assert 0 < ctrl.mask(fused, 9).mean() < 1
    explicit = swap(pipe, control(pipe, ONLY[name], explicit=True))
    free = swap(pipe, control(pipe, OFF))
    d = relative(fused, explicit)
    print(f"{name} ({prediction}): fused vs explicit relative difference {d:.2e} "
          f"(latent magnitude {explicit.abs().max():.1f})")
    assert d < 2e-5
    assert relative(fused[1], free[1]) > 1e-3, "the swap must change the target"  # >100x noise
    torch.testing.assert_close(fused[0], free[0], rtol=0, atol=1e-5 * free.abs().max().item())


def test_fused_equals_explicit_two_pairs_with_user_mask(tiny):
    pipe = pipeline(tiny)
    pairs = ((SRC, TGT, "cat", "sks dog"), (SRC2, TGT2, ["cat", "ball"], ["cat", "red cube"]))
    prompts = (SRC, SRC2, TGT, TGT2)
    user = torch.zeros(2, 1, 37, 23)
    user[0, :, 5:30, 3:20], user[1, :, :20] = 1, 1  # any size: resized to the latent
    out = []
    for explicit in (False, True):
        ctrl = control(pipe, Settings(**BLEND), pairs, user_mask=user, explicit=explicit)
        out.append(swap(pipe, ctrl, prompts, steps=12))
        assert 0 < ctrl.mask(out[-1], 11).mean() < 1
    d = relative(*out)
    print(f"two pairs, blend and user mask: relative difference {d:.2e}")
    assert d < 2e-5


def test_all_windows_zero_is_plain_target_generation(tiny):
    pipe = pipeline(tiny)
    x = pipe.noise(1, 64, 64, 0)
    plain = pipe.sample(x, pipe.encode_prompt(TGT), pipe.encode_prompt(""), 10, 7.5)
    batch = swap(pipe, None)  # the same two-prompt batch, no control at all
    for settings in (OFF, no_swap(PRESETS["paper"])):
        out = swap(pipe, control(pipe, settings))
        assert torch.equal(out, batch)
        # Alone in its batch the target differs only by the kernels' batch-size rounding.
        print(f"target alone vs in the swap batch: {relative(out[1:], plain):.2e}")
        torch.testing.assert_close(out[1:], plain, rtol=0, atol=1e-5 * plain.abs().max().item())


@pytest.mark.parametrize("explicit", [False, True])
def test_identical_prompts_with_every_swap_give_the_source(tiny, explicit):
    pipe = pipeline(tiny)
    every = Swap(1.0, Layers(), "both")
    settings = Settings(phi=every, m=every, a=every, blend_start=0.0, blend_level=1)
    out = swap(pipe, control(pipe, settings, ((SRC, SRC, "cat", "cat"),), explicit=explicit),
               (SRC, SRC))
    torch.testing.assert_close(out[1], out[0], rtol=0, atol=0)


class Spy(Control):
    """Runs a control and records, per attention kind, the steps at which it changed any output
    (compared with plain attention), and the self-attention outputs."""

    def __init__(self, inner: PhotoSwap):
        super().__init__()
        self.inner, self.edited, self.outputs = inner, {"self": set(), "cross": set()}, []

    def __call__(self, q, k, v, site):
        for name in ("step", "steps", "t", "prompts"):
            setattr(self.inner, name, getattr(self, name))
        out = self.inner(q, k, v, site)
        plain = attention(q, k, v)
        if (out - plain).abs().max() > 1e-4 * plain.abs().max():
            self.edited[site.kind].add(self.step)
        if site.kind == "self":
            self.outputs.append((self.step, out.clone()))
        return out

    def callback(self, step, t, x):
        return self.inner.callback(step, t, x)


def test_inside_the_phi_window_target_self_outputs_are_the_sources(tiny):
    pipe = pipeline(tiny)
    spy = Spy(control(pipe, Settings(phi=Swap(0.5, Layers(), "both"), m=Swap(0.0), a=Swap(0.8),
                                     blend_start=None)))
    swap(pipe, spy, steps=10)
    for step, out in spy.outputs:  # batch [uncond src, uncond tgt, cond src, cond tgt]
        if step < 5:
            assert torch.equal(out[[1, 3]], out[[0, 2]]), step
    assert any(not torch.equal(o[[1, 3]], o[[0, 2]]) for s, o in spy.outputs if s >= 5)


@pytest.mark.parametrize("steps", [20, 50])
@pytest.mark.parametrize("kind,settings,fraction", [
    ("self", Settings(phi=Swap(0.2), m=Swap(0.0), a=Swap(0.0), blend_start=None), 0.2),
    ("self", Settings(phi=Swap(0.0), m=Swap(0.5, Layers(min_level=1)), a=Swap(0.0),
                      blend_start=None), 0.5),
    ("cross", Settings(phi=Swap(0.0), m=Swap(0.0), a=Swap(0.4), blend_start=None), 0.4),
    ("self", Settings(phi=Swap(0.2, rule="f*T+1"), m=Swap(0.0), a=Swap(0.0), blend_start=None),
     "0.2 inclusive"),
])
def test_windows_end_where_they_say(tiny, steps, kind, settings, fraction):
    pipe = pipeline(tiny)
    spy = Spy(control(pipe, settings))
    swap(pipe, spy, steps=steps, guidance=1.0 if steps == 50 else 7.5)
    last = {20: {0.2: 4, 0.5: 10, 0.4: 8, "0.2 inclusive": 5},
            50: {0.2: 10, 0.5: 25, 0.4: 20, "0.2 inclusive": 11}}[steps][fraction]
    assert spy.edited[kind] == set(range(last))
    assert not spy.edited["cross" if kind == "self" else "self"]


def test_window_by_step_indices_and_fractions():
    assert [active(0.2, i, 50) for i in (0, 9, 10)] == [True, True, False]
    assert [active(0.4, i, 20) for i in (7, 8)] == [True, False]
    assert [active((2, 5), i, 50) for i in range(7)] == [False, False, True, False, False, True,
                                                          False]
    assert not active(0.0, 0, 50) and active(1.0, 49, 50)
    assert [end(0.5, n) for n in (5, 7)] == [2, 3]  # int(f * T), as the official code
    assert end(0.29, 100) == 28  # 0.29 * 100 is 28.999999999999996: the official int() too
    # The official phi window, step <= int(f * 50), generalised to T: one step longer.
    assert [active(0.8, i, 50, "f*T+1") for i in (39, 40, 41)] == [True, True, False]
    assert [active(0.2, i, 20, "f*T+1") for i in (4, 5)] == [True, False]
    assert active(0.0, 0, 50, "f*T+1") and not active(0.0, 1, 50, "f*T+1")
    # The official cross window: prompt-to-prompt's alpha table has T + 1 rows.
    assert end(0.75, 10, "f*(T+1)") == 8 and end(0.75, 10) == 7 and end(0.6, 50, "f*(T+1)") == 30


@pytest.mark.parametrize("user", [False, True])
def test_outside_the_masks_the_target_latent_is_the_source_latent(tiny, user):
    pipe = pipeline(tiny)
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 10:40, 20:60] = 1
    ctrl = control(pipe, Settings(**BLEND), user_mask=mask if user else None)
    seen = []

    def check(step, t, x):
        x = ctrl.callback(step, t, x)
        m = ctrl.mask(x, step)
        if m is not None:
            outside = (m == 0).expand_as(x[1:])
            seen.append((step, outside.float().mean().item()))
            assert torch.equal(x[1:][outside], x[:1][outside]), step
        return x

    swap(pipe, ctrl, steps=10, callback=check)
    steps = [s for s, _ in seen]
    assert steps == (list(range(10)) if user else list(range(2, 10)))
    assert all(0 < f < 1 for _, f in seen), seen  # the masks are neither empty nor everything


def test_fp16_fused_matches_fp32(tiny):
    """Every swap in fp16 against fp32. Compared without local blend: its 0.95 threshold on a
    random model's near-uniform maps is discontinuous (one mask pixel flipping moves a latent
    pixel from one branch to the other), which made fp16 vs fp32 6.5e-2 on the default kernel
    path against 4.9e-3 with AVX-512. Without blend, 10 steps: 5.4e-3 to 5.7e-3 on the default,
    avx2 and avx512 paths (plain sampling: 4.8e-3 to 5.6e-3), so 0.05 leaves a 9x margin and
    still fails a swap that mishandles fp16 (a dtype slip in a control is a 1e-1 error)."""
    half = Pipeline.load(TINY, None, "cpu", torch.float16)
    half.models.unet.load_state_dict(tiny.unet.state_dict())
    half.models.text_encoder.load_state_dict(tiny.text_encoder.state_dict())
    blended = swap(half, control(half, Settings(**BLEND)))
    assert blended.dtype == torch.float16 and torch.isfinite(blended).all()
    pipe = pipeline(tiny)
    ref = swap(pipe, control(pipe, Settings(blend_start=None)))
    out = swap(half, control(half, Settings(blend_start=None)))
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    print(f"fp16 vs fp32 relative difference {relative(out.float(), ref):.2e}")
    assert relative(out.float(), ref) < 0.05
