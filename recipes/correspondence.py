"""Unsupervised semantic correspondence with Stable Diffusion (Hedlin et al., NeurIPS 2023,
arXiv 2305.15581): a free context [1, 77, width] is optimised so that the cross-attention map of
its first token (after BOS), read at the decoder's two coarsest attention levels, is a Gaussian at
a query point on random crops of the noised source image; on the target image the argmax of the
same map, averaged over crops and random initialisations, is the answer.

Presets: `paper`, the authors' released settings (ubc-vision/LDM_correspondences; at 512 px their
layers 5-8: three at 16x16, one at 32x32); `toy`, for the 64 px toy model, whose 64-wide context
moves the logits far less per Adam step than SD's 1024-wide one: a 40x larger rate, fewer steps,
initialisations and crops. Departures: Gaussian noise (theirs torch.rand); the target is noised
at the source's timestep (theirs timesteps[-3]); no flips (their default); several embeddings
are optimised side by side, each with its own random draws.

The command line: `python -m recipes correspondence --help` (recipes/__main__.py); the settings
and presets: recipes/settings.py.
"""

import sys

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from recipes.settings import CORRESPONDENCE_PRESETS as PRESETS
from recipes.settings import CorrespondenceSettings as Settings
from sd import ddim
from sd.attention import Control, apply_map, attention, attention_map
from sd.images import grid, overlay, to_pil
from sd.pipeline import Pipeline
from toy import heldout

Gens = list[torch.Generator]  # one per embedding: its crops and noise do not depend on the batch


class FirstTokenMaps(Control):
    """Keeps, differentiably, the head-averaged map of context position 1 at the named sites."""

    def __init__(self, sites: list[str]):
        super().__init__()
        self.sites, self.maps = sites, {}

    def __call__(self, q, k, v, site):
        if site.name not in self.sites:
            return attention(q, k, v)
        attn = attention_map(q, k)  # fp32, keeps the graph back to the context
        self.maps[site.name] = (attn[..., 1].mean(1), site)  # [B, h*w]
        return apply_map(attn, v)


def decoder_sites(pipe: Pipeline, count: int) -> list[str]:
    """The first `count` decoder cross layers at the two coarsest levels that have attention
    (SD 2.1 at 512 px: 16x16 and 32x32, as the paper reads; the toy model: 8x8 and 16x16)."""
    cross = [s for s in pipe.models.unet.sites if s.kind == "cross" and s.place == "up"]
    levels = sorted({s.level for s in cross}, reverse=True)[:2]
    return [s.name for s in cross if s.level in levels][:count]


def crop_box(point: torch.Tensor, side: int, frac: float, g: torch.Generator) -> tuple[int, ...]:
    """(x0, y0, c): a random c x c crop holding `point` at least 15% of c inside its border where
    the image allows (Hedlin et al.'s crop_image)."""
    c = max(1, round(side * frac))
    margin, start = int(c * 0.15), []
    for p in point.tolist():
        lo = min(max(0, int(p) - c + margin), side - c)
        hi = min(max(0, int(p) - margin), side - c)
        start.append(int(torch.randint(lo, max(lo, hi) + 1, (1,), generator=g)))
    return start[0], start[1], c


def crop_maps(pipe: Pipeline, image: torch.Tensor, boxes: list[tuple[int, ...]],
              context: torch.Tensor, sites: list[str], t: int, gens: Gens) -> torch.Tensor:
    """Maps [B, layers, S, S] of the crops (x0, y0, c) of image [1, 3, S, S] in [0, 1], each
    resized back to S x S, encoded, noised to timestep t with noise from its own generator, and
    read with its own context; bilinear at image size."""
    crops = [F.interpolate(image[..., y0:y0 + c, x0:x0 + c], size=image.shape[-2:],
                           mode="bilinear", antialias=True) for x0, y0, c in boxes]
    with torch.no_grad():
        z = pipe.models.vae.encode(torch.cat(crops).to(pipe.device, pipe.dtype) * 2 - 1).mean
    noise = torch.stack([torch.randn(z.shape[1:], generator=g) for g in gens]).to(z)
    ctrl = FirstTokenMaps(sites)
    x = ddim.add_noise(z * pipe.cfg.vae.scaling, noise, t, pipe.ac)
    pipe.models.unet(x, t, context.to(pipe.dtype), ctrl)
    hw = z.shape[-2:]
    maps = [m.unflatten(-1, s.shape(hw))[:, None] for m, s in ctrl.maps.values()]
    return torch.cat([F.interpolate(m, size=image.shape[-2:], mode="bilinear") for m in maps], 1)


def gaussian(point: torch.Tensor, side: int, sigma: float) -> torch.Tensor:
    """exp(-d^2 / 2 sigma^2) around `point` (x, y) on a side x side grid of pixel centres."""
    c = torch.arange(side, dtype=torch.float32) + 0.5
    d2 = (c[None, :] - point[0]) ** 2 + (c[:, None] - point[1]) ** 2
    return torch.exp(-d2 / (2 * sigma**2))


def timestep(pipe: Pipeline, s: Settings) -> int:
    return int(ddim.timesteps(s.schedule, pipe.cfg.schedule)[s.noise_index])


def optimise(pipe: Pipeline, image: torch.Tensor, points: torch.Tensor, s: Settings, gens: Gens,
             sites: list[str]) -> tuple[torch.Tensor, list[float]]:
    """Fits one context per point [B, 2] (x, y): the contexts [B, 77, width] and the loss (mean
    over the rows) at every step."""
    side, t = image.shape[-1], timestep(pipe, s)
    shape = (pipe.cfg.text.max_len, pipe.cfg.text.width)
    context = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(pipe.device)
    context.requires_grad_(True)
    opt, losses = torch.optim.Adam([context], lr=s.lr), []
    for _ in range(s.steps):
        boxes = [crop_box(p, side, s.crop, g) for p, g in zip(points, gens)]
        at = [(p - torch.tensor(b[:2])) * side / b[2] for p, b in zip(points, boxes)]
        wanted = torch.stack([gaussian(a, side, s.sigma * side) for a in at])  # in resized crops
        maps = crop_maps(pipe, image, boxes, context, sites, t, gens)
        # Each layer's map against the Gaussian, averaged over layers as their code does; summed
        # over rows, so that each row's gradient is what it would be alone.
        loss = (maps - wanted[:, None].to(maps.device)).pow(2).mean((1, 2, 3))
        opt.zero_grad()
        loss.sum().backward()
        opt.step()
        losses.append(loss.mean().item())
    return context.detach(), losses


@torch.no_grad()
def locate(pipe: Pipeline, image: torch.Tensor, context: torch.Tensor, s: Settings, gens: Gens,
           sites: list[str]) -> torch.Tensor:
    """Each context's layer-averaged map [B, S, S] over `s.crops` crops: the first four at the
    corners, then around the running argmax (Hedlin et al.'s run_image_with_tokens_cropped)."""
    side, t, rows = image.shape[-1], timestep(pipe, s), len(context)
    total, count = torch.zeros(rows, side, side), torch.zeros(rows, side, side)
    corners = [(0, 0), (side, 0), (0, side), (side, side)]
    for i in range(s.crops):
        at = [corners[i] if i < 4 else argmax_point(m) for m in total / count.clamp_min(1)]
        boxes = [crop_box(torch.tensor(a), side, s.crop, g) for a, g in zip(at, gens)]
        maps = crop_maps(pipe, image, boxes, context, sites, t, gens)
        maps = maps.mean(1, keepdim=True).float().cpu()
        for r, (x0, y0, c) in enumerate(boxes):
            total[r, y0:y0 + c, x0:x0 + c] += F.interpolate(maps[r:r + 1], size=(c, c),
                                                            mode="bilinear")[0, 0]
            count[r, y0:y0 + c, x0:x0 + c] += 1
    return total / count.clamp_min(1)


def argmax_point(m: torch.Tensor) -> tuple[float, float]:
    """(x, y) of the centre of the map's largest pixel."""
    i = int(m.argmax())
    return i % m.shape[1] + 0.5, i // m.shape[1] + 0.5


def correspond(pipe: Pipeline, source: torch.Tensor, target: torch.Tensor, points: torch.Tensor,
               s: Settings = Settings(), seed: int = 0, batch: int = 5,
               progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The points [P, 2] in `target` [1, 3, S, S] matching `points` [P, 2] (x, y) in `source`,
    and the maps [P, S, S] (means over initialisations) whose argmaxes they are. Row r (point
    r // inits) draws from generator seed + r; `batch` rows run at once."""
    sites, rows = decoder_sites(pipe, s.layers), points.float().repeat_interleave(s.inits, 0)
    gens = [torch.Generator().manual_seed(seed + r) for r in range(len(rows))]
    heat = []
    for i in range(0, len(rows), batch):
        context, losses = optimise(pipe, source, rows[i:i + batch], s, gens[i:i + batch], sites)
        heat.append(locate(pipe, target, context, s, gens[i:i + batch], sites))
        if progress:
            print(f"embeddings {i + 1}-{i + len(context)} of {len(rows)}: loss {losses[0]:.4g} "
                  f"-> {losses[-1]:.4g}", file=sys.stderr)
    heat = torch.cat(heat).unflatten(0, (len(points), s.inits)).mean(1)
    return torch.tensor([argmax_point(m) for m in heat]), heat


def pck(pred: torch.Tensor, true: torch.Tensor, reference: float | torch.Tensor,
        alpha: float = 0.1) -> float:
    """Percentage of correct keypoints: the fraction of predictions [N, 2] within
    alpha * reference of the truth (reference: the image side, or per-point box sizes)."""
    return ((pred - true).norm(dim=-1) <= alpha * torch.as_tensor(reference)).float().mean().item()


def chance(true: torch.Tensor, side: int, alpha: float = 0.1) -> float:
    """The PCK of a uniformly random pixel: the share of pixel centres within alpha * side."""
    c = torch.arange(side, dtype=torch.float32) + 0.5
    grid = torch.stack(torch.meshgrid(c, c, indexing="xy"), -1).reshape(-1, 1, 2)
    return ((grid - true).norm(dim=-1) <= alpha * side).float().mean().item()


def evaluate_toy(pipe: Pipeline, pairs: int = 30, alpha: float = 0.1, s: Settings = PRESETS["toy"],
                 seed: int = 0, batch: int = 5, progress: bool = False) -> tuple[dict, list]:
    """PCK@alpha (reference: the image side) over the keypoints of `pairs` held-out toy pairs,
    beside chance and copying the source point; and per pair (source, target, queries, answers,
    truth, the first point's map) for a picture."""
    render, preds, trues, copies, shown = heldout.world.render, [], [], [], []
    for n, (src, tgt) in enumerate(heldout.pairs(pairs)):
        source, target = heldout.image(render(src)[0]), heldout.image(render(tgt)[0])
        query, true = heldout.keypoints(src.subjects[0]), heldout.keypoints(tgt.subjects[0])
        found, heat = correspond(pipe, source, target, query, s, seed + 1000 * n, batch)
        preds, trues, copies = preds + [found], trues + [true], copies + [query]
        shown.append((source, target, query, found, true, heat[0]))
        if progress:
            print(f"pair {n + 1}/{pairs}: PCK so far "
                  f"{pck(torch.cat(preds), torch.cat(trues), source.shape[-1], alpha):.3f}",
                  file=sys.stderr)
    side, true = source.shape[-1], torch.cat(trues)
    return {"pck": pck(torch.cat(preds), true, side, alpha), "keypoints": len(true),
            "chance": chance(true, side, alpha),
            "copy": pck(torch.cat(copies), true, side, alpha)}, shown


def picture(rows: list[tuple]) -> Image.Image:
    """Per row (source, target, queries, answers, truth or None, map): the source with the
    queries, the target with the answers (rings) and the truth (dots), the map over the target."""
    tiles, colours = [], ["cyan", "magenta", "yellow", "lime", "orange", "white"]
    for source, target, query, found, true, heat in rows:
        src, tgt = to_pil(torch.cat([source, target]))
        k = max(1, 256 // src.width)  # small (toy) images are shown 4x, so the marks can be seen
        m = (heat - heat.min()) / (heat.max() - heat.min()).clamp_min(1e-8)
        row = [im.resize((im.width * k, im.height * k), 0) for im in (src, tgt, overlay(tgt, m))]
        r, draw = max(3, row[0].width // 64), [ImageDraw.Draw(im) for im in row]
        ring = lambda d, p, c: d.ellipse([*(p * k - r), *(p * k + r)], outline=c, width=2)  # noqa
        for j in range(len(query)):
            c = colours[j % len(colours)]
            ring(draw[0], query[j], c), ring(draw[1], found[j], c), ring(draw[2], found[j], c)
            if true is not None:
                draw[1].ellipse([*(true[j] * k - r / 2), *(true[j] * k + r / 2)], fill=c)
        tiles.append(row)
    return grid(tiles)
