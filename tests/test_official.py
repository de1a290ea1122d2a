"""Our swap equals the official algorithm, run in diffusers, on the committed toy model.

The reference below is a second, independent implementation of what the official code computes
(eric-ai-lab/photoswap swapping_class.py and utils.py; google/prompt-to-prompt's refine edit and
LocalBlend, which Photoswap reuses), written from the algorithm as a diffusers attention
processor: every attention layer forms its explicit softmax map, hands it to the controller with
(is_cross, place) and multiplies the map it gets back by v. What it reproduces, step for step:
- phi: while step <= int(phi * T) (the code's 50, read as T), every self-attention layer's target
  rows take the source rows' q, k and v, in both CFG halves;
- in the conditional half only: cross maps of the target become, per target token j,
  alpha_j * source[..., mapper_j] + (1 - alpha_j) * target[..., j] while step < int(A * (T + 1))
  (the alpha table has T + 1 rows), with the mapper of prompt-to-prompt's get_mapper (global
  alignment of the token ids, gap 0, match 1, mismatch -1; padding position j onto j); self maps
  of layers with at most a quarter of the latent's tokens (<= 32^2 at 512 px; p2p: a sixteenth)
  become the source's while step < int((M + phi) * T) (the code adds phi's fraction to M's);
- local blend after step i once i + 1 > int(start * T): the subject words' conditional cross maps
  of the down and up blocks at one level, stored after the swap edited them (the code stores a
  view of the map, then writes the edit into it), summed over the steps so far, averaged over
  layers and heads, 3x3 max-pooled, resized (nearest), divided by the maximum, thresholded;
  the union with the source's mask keeps the target latent equal to the source latent outside.

Each case runs the reference and our swap (fused and `explicit`) from the same x_T with the same
DDIM schedule and compares the final latents of both branches, relative to their magnitude.
Skipped where weights/toy has no UNet.
"""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import relative_difference

from photoswap.settings import PRESETS, Layers, Settings, Swap, p2p
from photoswap.swap import Pair, run
from sd.config import TOY, InversionSettings
from sd.inversion import invert
from sd.pipeline import Pipeline
from toy import scenes

WEIGHTS = Path(__file__).resolve().parent.parent / "weights" / "toy"
pytestmark = pytest.mark.skipif(not (WEIGHTS / "unet").is_dir(),
                                reason="weights/toy has no unet/ (make toy trains it)")
BOUND = 1e-5
GUIDANCE = 7.5


# The reference ----------------------------------------------------------------------------------

def reference_mapper(x: list[int], y: list[int], size: int = 77):
    """prompt-to-prompt's get_mapper from the algorithm: Needleman-Wunsch on the ids (BOS and
    EOS included) with gap 0, match 1, mismatch -1; on equal scores the left move (a gap in the
    source) wins over the up move, which wins over the diagonal; traced back from the corner.
    An unaligned target token gets source -1 and alpha 0; padding position j gets j, alpha 1."""
    score = np.zeros((len(x) + 1, len(y) + 1))
    trace = np.zeros((len(x) + 1, len(y) + 1), dtype=int)
    trace[0, 1:], trace[1:, 0] = 1, 2
    for i in range(1, len(x) + 1):
        for j in range(1, len(y) + 1):
            options = [score[i, j - 1], score[i - 1, j],
                       score[i - 1, j - 1] + (1 if x[i - 1] == y[j - 1] else -1)]
            score[i, j] = max(options)
            trace[i, j] = 1 + options.index(score[i, j])  # first of left, up, diagonal
    pairs, i, j = [], len(x), len(y)
    while i > 0 or j > 0:
        if trace[i, j] == 3:
            i, j = i - 1, j - 1
            pairs.append((j, i))
        elif trace[i, j] == 1:
            j -= 1
            pairs.append((j, -1))
        else:
            i -= 1
    source = [s for _, s in sorted(pairs)]
    mapper = torch.tensor(source + list(range(len(y), size)))
    alphas = torch.tensor([float(s != -1) for s in source] + [1.0] * (size - len(y)))
    return mapper, alphas


def word_positions(tok, prompt: str, words: list[str]) -> list[int]:
    """Token positions (BOS is 0) of the given space-separated words of the prompt, found by
    encoding the prompt word by word as the official get_word_inds walks it."""
    found, position = [], 1
    for word in prompt.split(" "):
        n = len(tok.encode(word))
        if word in words:
            found += range(position, position + n)
        position += n
    return found


class OfficialSwap:
    """The official controller for one pair (batch [uncond src, uncond tgt, cond src, cond tgt])
    as diffusers attention processors, plus local blend as a per-step callback. self_output None
    is prompt-to-prompt's AttentionRefine, which has no phi swap (Photoswap's phi window
    `step <= int(f * 50)` holds step 0 even at f = 0)."""

    def __init__(self, tok, source: str, target: str, words: tuple[list[str], list[str]],
                 steps: int, cross: float, self_map: float, self_output: float | None,
                 self_tokens: int, blend: float | None, threshold: float, blend_side: int):
        self.steps, self.step = steps, 0
        self.self_output, self.self_tokens = self_output, self_tokens
        self.cross_end = int(cross * (steps + 1))
        self.self_end = int((self_map + (self_output or 0.0)) * steps)
        ids = [[tok.bos_id, *tok.encode(p), tok.eos_id] for p in (source, target)]
        self.mapper, self.alphas = reference_mapper(*ids)
        self.blend, self.threshold, self.side = blend, threshold, blend_side
        self.words = torch.zeros(2, 77)
        for row, (prompt, ws) in enumerate(zip((source, target), words)):
            self.words[row, word_positions(tok, prompt, ws)] = 1
        assert self.words.sum(1).gt(0).all(), "a blend word is not in its prompt"
        self.stored: list[torch.Tensor] = []  # summed over steps, one per stored layer
        self.this_step: list[torch.Tensor] = []
        self.mask_coverage = None

    def processor(self, place: str):
        ref = self

        class Processor:
            def __call__(self, attn, hidden_states, encoder_hidden_states=None,
                         attention_mask=None, temb=None, **kwargs):
                cross = encoder_hidden_states is not None
                context = encoder_hidden_states if cross else hidden_states
                q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
                if (not cross and ref.self_output is not None
                        and ref.step <= int(ref.self_output * ref.steps)):
                    q, k, v = (t.clone() for t in (q, k, v))
                    for t in (q, k, v):
                        t[1], t[3] = t[0], t[2]
                b, n, h = q.shape[0], q.shape[1], attn.heads
                q, k, v = (t.reshape(b, t.shape[1], h, -1).transpose(1, 2).reshape(b * h,
                           t.shape[1], -1) for t in (q, k, v))
                wide = torch.promote_types(q.dtype, torch.float32)  # fp32 or fp64 maps
                maps = (q.to(wide) @ k.to(wide).transpose(1, 2) * attn.scale).softmax(-1)
                ref.edit(maps, cross, place, h)
                out = (maps @ v.to(wide)).to(v.dtype)
                out = out.reshape(b, h, n, -1).transpose(1, 2).reshape(b, n, -1)
                return attn.to_out[1](attn.to_out[0](out))

        return Processor()

    def edit(self, maps: torch.Tensor, cross: bool, place: str, heads: int) -> None:
        """Edit the conditional half in place, as AttentionControlEdit does."""
        cond = maps[maps.shape[0] // 2:].view(2, heads, *maps.shape[1:])
        n = maps.shape[1]
        if cross:
            if self.step < self.cross_end:
                taken = cond[0][:, :, self.mapper]
                cond[1] = taken * self.alphas + cond[1] * (1 - self.alphas)
            if place in ("down", "up") and n == self.side ** 2:  # stored after the edit
                self.this_step.append(cond.clone())
        elif self.step < self.self_end and n <= self.self_tokens:
            cond[1] = cond[0]

    def end_of_step(self, x: torch.Tensor) -> torch.Tensor:
        """Add this step's maps to the store; blend once step + 1 > int(start * T)."""
        if self.stored:
            self.stored = [a + b for a, b in zip(self.stored, self.this_step)]
        else:
            self.stored = self.this_step
        self.this_step = []
        if self.blend is None or self.step + 1 <= int(self.blend * self.steps):
            return x
        maps = torch.cat([m.reshape(2, -1, self.side, self.side, 77) for m in self.stored], 1)
        maps = (maps * self.words[:, None, None, None]).sum(-1).mean(1, keepdim=True)
        maps = F.max_pool2d(maps, 3, 1, padding=1)
        maps = F.interpolate(maps, size=x.shape[2:])
        maps = maps / maps.amax((2, 3), keepdim=True)
        mask = maps.gt(self.threshold)
        mask = (mask[:1] | mask).to(x.dtype)
        self.mask_coverage = mask[1].mean().item()
        return x[:1] + mask * (x - x[:1])


def models(toy_diffusers, dtype: torch.dtype):
    """The reference's UNet and text encoder and our pipeline, all in `dtype` (the committed
    weights are fp16, so fp32 and fp64 hold the same values)."""
    unet, text, scheduler = toy_diffusers
    pipe = Pipeline.load(TOY, WEIGHTS, torch.device("cpu"), dtype)
    return unet.to(dtype), text.to(dtype), scheduler, pipe


@torch.no_grad()
def reference(models, ref: OfficialSwap, source: str, target: str, x_T, uncond=None):
    """Guided DDIM in diffusers with the official controller: latents [source, target]."""
    unet, text, scheduler, pipe = models
    names = {name: name.split("_")[0] for name in unet.attn_processors}
    unet.set_attn_processor({name: ref.processor(place) for name, place in names.items()})
    ids = pipe.tokenizer([source, target, ""])
    cond, empty = text(ids[:2]).last_hidden_state, text(ids[2:]).last_hidden_state
    scheduler.set_timesteps(ref.steps)
    x = x_T.to(pipe.dtype).repeat(2, 1, 1, 1)
    for i, t in enumerate(scheduler.timesteps):
        ref.step = i
        null = empty if uncond is None else uncond[i]
        context = torch.cat([null, null, cond])
        e_uncond, e_cond = unet(x.repeat(2, 1, 1, 1), t, context).sample.chunk(2)
        x = scheduler.step(e_uncond + GUIDANCE * (e_cond - e_uncond), t, x).prev_sample
        x = ref.end_of_step(x)
    return x


# The cases ------------------------------------------------------------------------------------

BG = "on a black striped background"
OFFICIAL, PAPER = PRESETS["official"], PRESETS["paper"]
# The toy's 16x16 latent: level 1 (8x8) is the blend level whose mask covers part of the latent
# (level 2 is the mid block's 4x4, which the official store does not hold).
TOY_BLEND = {"blend_level": 1}
CASES = {
    # name: (source, target, source words, target words, settings, steps, photo?)
    "equal length": (f"a photo of a red circle {BG}", f"a photo of a red heart {BG}",
                     ["circle"], ["heart"], replace(OFFICIAL, **TOY_BLEND), 50, False),
    "unequal length": (f"a photo of a circle {BG}", f"a photo of a sks star {BG}",
                       ["circle"], ["sks", "star"], replace(OFFICIAL, **TOY_BLEND), 50, False),
    "two subjects": ("a photo of a red circle and a blue square on a white background",
                     "a photo of a sks star and a blue heart on a white background",
                     ["circle", "square"], ["sks", "star", "heart"],
                     replace(PAPER, **TOY_BLEND, blend_threshold=0.6), 50, False),
    "blend covering part": (f"a photo of a red circle {BG}", f"a photo of a sks star {BG}",
                            ["circle"], ["sks", "star"],
                            replace(OFFICIAL, blend_level=1, blend_threshold=0.5), 50, False),
    "p2p refine + blend": (f"a photo of a circle {BG}", f"a photo of a red circle {BG}",
                           ["circle"], ["circle"],
                           replace(p2p(replace(OFFICIAL, **TOY_BLEND)), blend_threshold=0.5), 30,
                           False),
    "real image": (None, "a photo of a sks star on a {background}", ["circle"], ["sks", "star"],
                   replace(OFFICIAL, **TOY_BLEND), 50, True),
}


def official_arguments(s: Settings) -> dict:
    """The official controller's arguments for one of our settings: its M window is M + phi."""
    phi = s.phi.window if s.phi.rule == "f*T+1" else None  # None: prompt-to-prompt, no phi
    return {"cross": s.a.window, "self_output": phi,
            "self_map": s.m.window - min(phi or 0.0, s.m.window),
            "self_tokens": 16 * 16 >> 2 * s.m.layers.min_level, "blend": s.blend_start,
            "threshold": s.blend_threshold, "blend_side": 16 >> s.blend_level}


def case_inputs(models, name):
    source, target, ws, wt, settings, steps, photo = CASES[name]
    pipe, uncond = models[3], None
    if photo:  # a held-out scene, null-text inverted with the source prompt
        scene = scenes.test_scene(1, two=0.0)
        image = scenes.render(scene)[0]
        source = scenes.caption(scene)
        target = target.format(background=source.split(" on a ", 1)[1])
        subject = scene.subjects[0]
        ws = [subject.shape]
        from PIL import Image  # noqa: PLC0415
        inv = invert(pipe, pipe.encode(Image.fromarray(image)), source,
                     InversionSettings(steps, GUIDANCE, inner_steps=3))
        x_T, uncond = inv.x_T, inv.uncond
    else:
        x_T = pipe.noise(1, 64, 64, seed=SEEDS.get(name, 3))
    return source, target, ws, wt, settings, steps, x_T, uncond


# fp32 is what users run; fp64 takes rounding out. In fp32 each operation rounds at about 1e-7,
# and 50 guided steps amplify that by a factor that depends on the path: measured over seeds 1-24
# on the committed toy model (one thread), our fused swaps were 1.3e-6..4.7e-4 from the reference
# in fp32, and the fp64 runs 1e-15..2e-13, case for case; the same seed measures up to 2.5x apart
# between thread counts. The fp32 runs use seeds whose measured floor is at most 4e-6 and whose
# local blend covers part of the latent (seed, floor, coverage: equal length 17, 1.3e-6, 0.69;
# unequal length 18, 1.6e-6, 0.31; two subjects 7, 3.1e-6, 0.80 (fp64 only, below); blend
# covering part 7, 2.0e-6, 0.63; p2p 8, 2.2e-6, 0.78; the photo 3.2e-6). A floor of 5e-6 is
# not a margin: on the model
# before stage 2b, seed 2 of "blend covering part" measured 5.0e-6 here and 1.05e-5 with
# ATEN_CPU_CAPABILITY=default. Blend thresholds: this model's maps of the subject words cover
# 89-100% of the latent at 0.3 for p2p's "circle" (seeds 1-24), 83-100% for the two subjects'
# words at 0.5 (0.72-0.94 at 0.6), and 0.5-0.9 at 0.4 for "blend covering part", which wants
# 0.3-0.7; a blend that covers everything cannot tell when it reads the maps (tests/mutants.py).
# The fp64 runs prove the algorithm with a margin of seven orders, and there the step count that
# tells int(A * (T + 1)) from int(A * T) apart (24) is safe to use.
SEEDS = {"equal length": 17, "unequal length": 18, "two subjects": 7, "blend covering part": 7,
         "p2p refine + blend": 8, "unequal length, 24 steps": 18}
# "two subjects" runs in fp64 only: its fp32 floor on the committed model is 3e-6..2.9e-4 over
# seeds 1-24, and its best seed (7) measured 3.1e-6 on one thread, 5.4e-6 on two and 1.07e-5 with
# ATEN_CPU_CAPABILITY=default: no seed clears the bound on every CPU.
RUNS = [(name, torch.float32) for name in CASES if name != "two subjects"] + [
    (name, torch.float64) for name in CASES] + [("unequal length, 24 steps", torch.float64)]
CASES["unequal length, 24 steps"] = CASES["unequal length"][:5] + (24, False)


@pytest.mark.parametrize("name,dtype", RUNS, ids=[f"{n}-{str(d)[6:]}" for n, d in RUNS])
def test_swap_equals_the_official_algorithm(toy_diffusers, name, dtype):
    m = models(toy_diffusers, dtype)
    source, target, ws, wt, settings, steps, x_T, uncond = case_inputs(m, name)
    pipe = m[3]
    ref = OfficialSwap(pipe.tokenizer, source, target, (ws, wt), steps,
                       **official_arguments(settings))
    expected = reference(m, ref, source, target, x_T, uncond)
    if settings.blend_start is not None:  # the blend really chooses: part of the latent
        assert 0.05 < ref.mask_coverage < 0.95, ref.mask_coverage
    if name == "blend covering part":
        assert 0.3 <= ref.mask_coverage <= 0.7, ref.mask_coverage
    pair = Pair(source, target, ws, wt, x_T, uncond)
    for explicit in (False, True):
        ours, _ = run(pipe, [pair], settings, steps, GUIDANCE, explicit=explicit)
        d = relative_difference(ours, expected)
        print(f"\nOFFICIAL {name} {dtype} ({'explicit' if explicit else 'fused'}): {d:.2e} "
              f"relative; blend covers {ref.mask_coverage}")
        assert d <= BOUND, f"{name}: {d:.2e} from the official algorithm"


def test_the_reference_mapper_is_prompt_to_prompts():
    """By hand: source BOS a photo of a cat EOS, target BOS a photo of a sks dog EOS."""
    mapper, alphas = reference_mapper([0, 1, 2, 3, 1, 4, 9], [0, 1, 2, 3, 1, 5, 6, 9])
    assert mapper[:8].tolist() == [0, 1, 2, 3, 4, -1, -1, 6]
    assert alphas[:8].tolist() == [1, 1, 1, 1, 1, 0, 0, 1] and mapper[8:].tolist() == list(
        range(8, 77))


def test_settings_mapping_sees_layers_and_windows():
    args = official_arguments(replace(PAPER, **TOY_BLEND))
    assert args["self_map"] + args["self_output"] == PAPER.m.window and args["self_tokens"] == 64
    assert official_arguments(p2p(OFFICIAL))["self_tokens"] == 16  # a sixteenth of 16x16
    assert Layers(min_level=2) == p2p(OFFICIAL).m.layers and Swap().rule == "f*T"
