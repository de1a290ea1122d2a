"""Run swaps: source and target branches side by side in one batch, from one x_T per pair.

    pairs = [Pair("a photo of a cat", "a photo of a sks dog", ["cat"], ["sks dog"], x_T)]
    latents, ctrl = run(pipe, pairs, PRESETS["paper"])    # [sources..., targets...]

The source branch is the source prompt from x_T (a seed's noise, or a real photo's inversion with
its per-step null contexts): its output is the source reconstruction. Nothing here parses
arguments or writes files (that is photoswap/__main__.py and photoswap/cli.py).
"""

import re
from dataclasses import dataclass

import torch

from photoswap.align import refinement, subject_indices
from photoswap.control import PhotoSwap
from photoswap.masactrl import MasaCtrl
from photoswap.pnp import PlugAndPlay
from photoswap.settings import MasaCtrlSettings, PnPSettings, Settings
from sd.attention import Control
from sd.pipeline import Pipeline


@dataclass
class Pair:
    source: str  # the source prompt
    target: str  # the target prompt (the source's subject words replaced by the concept)
    source_words: list[str]  # subject words in the source prompt (local blend, heat maps)
    target_words: list[str]  # the concept's words in the target prompt
    x_T: torch.Tensor  # [1, 4, h, w]
    uncond: list[torch.Tensor] | None = None  # one [1, 77, width] context per step (null-text)
    # PnP: the source's latent at each sampling step (photoswap/pnp.py inversion; x_T first)
    trajectory: list[torch.Tensor] | None = None


def replace_words(prompt: str, words: list[str], concepts: list[str]) -> str:
    """The target prompt: every whole-word occurrence of each subject word replaced by its
    concept ("a cat on a mat", ["cat"], ["sks dog"] -> "a sks dog on a mat")."""
    table = {w.lower(): c for w, c in zip(words, concepts)}
    alternatives = "|".join(re.escape(w) for w in sorted(table, key=len, reverse=True))
    pattern = rf"(?<![\w<>-])({alternatives})(?![\w<>-])"  # one pass: no replacing replacements
    return re.sub(pattern, lambda m: table[m.group(1).lower()], prompt, flags=re.IGNORECASE)


def subjects_of(pipe: Pipeline, pairs: list[Pair]) -> list[tuple[list[int], list[int]]]:
    """Per pair, the token positions of the source's subject words and the target's concept."""
    tok = pipe.tokenizer
    return [(subject_indices(tok, p.source, p.source_words),
             subject_indices(tok, p.target, p.target_words)) for p in pairs]


def control(pipe: Pipeline, pairs: list[Pair], settings: Settings | MasaCtrlSettings |
            PnPSettings, explicit: bool = False, user_mask: torch.Tensor | None = None) -> Control:
    """The swap control for these pairs: MasaCtrl or PnP for their settings, else a PhotoSwap
    (token alignment and subject positions from the tokenizer)."""
    if not isinstance(settings, Settings) and user_mask is not None:
        raise ValueError("a user mask is Photoswap's and p2p's (local blend); MasaCtrl and PnP "
                         "take none")
    if isinstance(settings, MasaCtrlSettings):
        return MasaCtrl(settings)
    if isinstance(settings, PnPSettings):
        if any(p.trajectory is None for p in pairs):
            raise ValueError("pnp replays the source's own DDIM inversion: give each pair a "
                             "trajectory (photoswap.pnp.inversion of the photo's latent)")
        return PlugAndPlay(settings, [p.trajectory for p in pairs])
    mappers = [refinement(pipe.tokenizer, p.source, p.target) for p in pairs]
    return PhotoSwap(settings, mappers, subjects_of(pipe, pairs), user_mask=user_mask,
                     explicit=explicit)


@torch.no_grad()
def run(pipe: Pipeline, pairs: list[Pair], settings: Settings | MasaCtrlSettings | PnPSettings,
        steps: int = 50,
        guidance: float = 7.5, explicit: bool = False, user_mask: torch.Tensor | None = None,
        negative: str = "", ctrl: Control | None = None,
        progress: bool = False) -> tuple[torch.Tensor, Control]:
    """Sample every pair's source and target together: latents [sources..., targets...]."""
    ctrl = ctrl or control(pipe, pairs, settings, explicit, user_mask)
    x = torch.cat([p.x_T for p in pairs]).to(pipe.device, pipe.dtype)
    # PnP's source is the photo's inversion replayed under the empty prompt (photoswap/pnp.py)
    sources = ["" if isinstance(settings, PnPSettings) else p.source for p in pairs]
    if isinstance(settings, PnPSettings):
        if any(len(p.trajectory) != steps for p in pairs):
            raise ValueError(f"the PnP trajectories hold {[len(p.trajectory) for p in pairs]} "
                             f"latents for {steps} steps: invert with the sampling step count")
        if any(p.uncond is not None for p in pairs):
            raise ValueError("pnp guides with the plain negative prompt, not null-text contexts")
    cond = pipe.encode_prompt(sources + [p.target for p in pairs])
    plain = pipe.encode_prompt(negative).to(pipe.dtype)
    if all(p.uncond is None for p in pairs):
        uncond = plain
    else:  # a pair's target shares its source's null contexts (as prompt-to-prompt does)
        per_pair = [p.uncond or [plain] * steps for p in pairs]
        if any(len(u) != steps for u in per_pair):
            raise ValueError(f"the inversions hold {[len(u) for u in per_pair]} contexts for "
                             f"{steps} steps: sample with the inversion's step count")
        uncond = [torch.cat([u[i] for u in per_pair] * 2).to(pipe.dtype) for i in range(steps)]
    latents = pipe.sample(x.repeat(2, 1, 1, 1), cond.to(pipe.dtype), uncond, steps, guidance,
                          ctrl, progress=progress, callback=ctrl.callback)
    return latents, ctrl
