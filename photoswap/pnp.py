"""Plug-and-Play (Tumanyan et al. 2023, arXiv:2211.12572) on sd's control interface.

The source branch replays the photo's own DDIM inversion (the empty prompt, 999 steps: its latent
at each sampling timestep), and its features are plugged into the target branch: the residual
branch output of one decoder block (before its skip is added) while step < int(0.8 T), and the
queries and keys of the decoder's self-attention while step < int(0.5 T); the target keeps its
own values, its prompt and classifier-free guidance. As MichalGeyer/pnp-diffusers does it
(pnp.py, pnp_utils.py register_conv_control_efficient / register_attention_control_efficient,
preprocess.py), with its batch [source, uncond target, cond target] laid out here as the swap's
[uncond sources, uncond targets, cond sources, cond targets]: the conditional source row is the
official source row (its prompt is the empty one), and both target rows take from it.
"""

import torch

from photoswap.settings import PnPSettings, end
from sd import ddim
from sd.attention import Control, Site, attention
from sd.inversion import ddim_inversion
from sd.pipeline import Pipeline, rows


def inversion(pipe: Pipeline, latent: torch.Tensor, steps: int,
              s: PnPSettings = PnPSettings()) -> list[torch.Tensor]:
    """The source's latent at each of the `steps` sampling timesteps, from a DDIM inversion of
    the photo's latent with the empty prompt over s.inversion_steps steps (preprocess.py). The
    first is the target's x_T too."""
    schedule = pipe.cfg.schedule
    fine = ddim.timesteps(s.inversion_steps, schedule).flip(0).tolist()  # ascending
    wanted = ddim.timesteps(steps, schedule).tolist()
    if missing := [t for t in wanted if t not in fine]:
        raise ValueError(f"{steps} sampling steps visit t={missing[0]}, which a "
                         f"{s.inversion_steps}-step inversion does not: give another step count")
    empty = pipe.encode_prompt("").to(pipe.dtype)
    xs = ddim_inversion(pipe, latent.to(pipe.device, pipe.dtype), empty, s.inversion_steps)
    return [xs[1 + fine.index(t)] for t in wanted]  # xs[0] is the clean latent


class PlugAndPlay(Control):
    """Edits the target rows of [sources, targets] batches; its callback puts each source back
    on its inversion's latent for the next step."""

    def __init__(self, settings: PnPSettings, trajectories: list[list[torch.Tensor]]):
        super().__init__()
        self.settings, self.trajectories = settings, trajectories

    def _rows(self, batch: int) -> tuple[list[int], list[int]]:
        """(the conditional source row of each target row, the target rows of both halves)."""
        src = rows(batch, self.prompts, "cond", 0, 2)
        return src * 2, rows(batch, self.prompts, "both", 1, 2)

    def _feature_site(self, site: Site) -> bool:
        s = self.settings
        index = int(site.name.split(".")[-1])  # up_blocks.B.resnets.I
        return site.place == "up" and site.level == s.feature_level and index == s.feature_index

    def _attention_site(self, site: Site) -> bool:
        s = self.settings
        if site.kind != "self" or site.place != "up" or site.level > s.attention_level:
            return False
        first = site.name.split(".")[3] == "0"  # up_blocks.B.attentions.I.transformer_blocks...
        return not (site.level == s.attention_level and first)

    def features(self, h: torch.Tensor, site: Site) -> torch.Tensor:
        if self.step >= end(self.settings.features, self.steps) or not self._feature_site(site):
            return h
        src, tgt = self._rows(h.shape[0])
        h = h.clone()
        h[tgt] = h[src]
        return h

    def __call__(self, q, k, v, site):
        if self.step >= end(self.settings.attention, self.steps) or not self._attention_site(site):
            return attention(q, k, v)
        src, tgt = self._rows(q.shape[0])
        q, k = q.clone(), k.clone()
        q[tgt], k[tgt] = q[src], k[src]
        return attention(q, k, v)

    def callback(self, i: int, t: int, x: torch.Tensor) -> torch.Tensor:
        """After step i: the sources (the first half of x) onto their latents for step i + 1."""
        if i + 1 < self.steps:
            x = x.clone()
            x[: len(self.trajectories)] = torch.cat([tr[i + 1] for tr in self.trajectories])
        return x
