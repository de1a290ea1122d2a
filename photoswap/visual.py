"""Pictures of a swap: where the subject words attend, the self-attention layout, window sweeps.

- heat maps: the subject words' cross-attention maps of both branches (conditional half, every
  cross layer resized to the latent, summed over steps and heads), over each branch's image;
- layout: the first three SVD components of each branch's self-attention map averaged over steps,
  layers of one level and heads, as RGB (the paper's Figure 3: the self-attention maps carry the
  layout, which is why swapping them keeps the source's pose);
- sweep: the swap for every (phi, A) window pair, one grid (the official code leaves choosing
  these windows to the user, and that is where its users struggle).
"""

from dataclasses import replace

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from photoswap.settings import Settings
from photoswap.swap import Pair, run
from sd.attention import attention_map
from sd.controls import Observer
from sd.pipeline import Pipeline, rows


class Recorder(Observer):
    """Each branch's own (unedited) maps for the pictures, run beside the swap with
    sd.controls.Combined: the subject words' cross maps, and the self maps of one level.

    `subjects`: per pair, (source token positions, target token positions) (the swap control's);
    `latent_hw` is the latent's size; `layout_level` the level whose self maps are averaged
    (level 1: 32x32 tokens at 512 px, 1024^2 per map, 2304^2 at 768 px).
    """

    def __init__(self, subjects: list[tuple[list[int], list[int]]], latent_hw: tuple[int, int],
                 layout_level: int | None = 1):
        super().__init__()
        self.subjects, self.latent_hw, self.layout_level = subjects, latent_hw, layout_level
        self.heat: torch.Tensor | None = None  # [prompts, h, w]
        self.layout: torch.Tensor | None = None  # [prompts, N, N]

    def observe(self, q, k, v, site):
        cond = rows(q.shape[0], self.prompts, "cond")
        if site.kind == "cross":
            attn = attention_map(q[cond], k[cond]).mean(1)  # [prompts, N, 77]
            picks = [s for s, _ in self.subjects] + [t for _, t in self.subjects]
            maps = torch.stack([attn[r][:, idx].sum(-1) for r, idx in enumerate(picks)])
            maps = maps.reshape(len(picks), 1, *site.shape(self.latent_hw))
            maps = F.interpolate(maps, size=self.latent_hw, mode="bilinear")[:, 0]
            self.heat = maps if self.heat is None else self.heat + maps
        elif site.level == self.layout_level:
            attn = attention_map(q[cond], k[cond]).mean(1)
            self.layout = attn if self.layout is None else self.layout + attn


def normalise(x: torch.Tensor) -> torch.Tensor:
    """Scale each map (leading dims kept, last two spatial) to [0, 1]."""
    lo = x.flatten(-2).min(-1).values[..., None, None]
    hi = x.flatten(-2).max(-1).values[..., None, None]
    return (x - lo) / (hi - lo).clamp_min(1e-12)


def layout_rgb(maps: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """[prompts, N, N] averaged self maps -> [prompts, 3, h, w]: the queries' coordinates on the
    first three singular directions, each scaled to [0, 1]. A singular vector's sign is
    arbitrary; it is fixed so that the entry of largest magnitude is positive."""
    u, s, _ = torch.linalg.svd(maps.float())
    comps = u[..., :3] * s[..., None, :3]  # [prompts, N, 3]
    pick = comps.abs().argmax(1, keepdim=True)
    comps = comps * torch.gather(comps, 1, pick).sign()
    return normalise(comps.transpose(1, 2).reshape(len(maps), 3, *hw))


def label(image: Image.Image, text: str) -> Image.Image:
    """A copy of the image with a caption strip above it."""
    out = Image.new("RGB", (image.width, image.height + 12), "white")
    out.paste(image, (0, 12))
    ImageDraw.Draw(out).text((2, 0), text, fill="black")
    return out


def sweep(pipe: Pipeline, pair: Pair, settings: Settings, phis: list[float], crosses: list[float],
          steps: int, guidance: float, explicit: bool = False,
          user_mask: torch.Tensor | None = None,
          progress: bool = False) -> list[list[tuple[float, float, torch.Tensor]]]:
    """The target latent for every (phi window, A window): rows phi, columns A."""
    grid = []
    for phi in phis:
        row = []
        for cross in crosses:
            s = replace(settings, phi=replace(settings.phi, window=phi),
                        a=replace(settings.a, window=cross))
            latents, _ = run(pipe, [pair], s, steps, guidance, explicit, user_mask,
                             progress=progress)
            row.append((phi, cross, latents[1:]))
        grid.append(row)
    return grid
