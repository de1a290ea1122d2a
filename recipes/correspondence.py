"""Unsupervised semantic correspondence with Stable Diffusion (Hedlin et al., NeurIPS 2023,
"Unsupervised Semantic Correspondence Using Stable Diffusion", arXiv 2305.15581).

A query point in a source image becomes a text embedding: a free context [1, 77, width] is
optimised so that the cross-attention map of its first token (position 1, after BOS), read at the
decoder's coarse attention levels, matches a Gaussian at the point, on random crops of the noised
source. On the target image the same embedding's map, averaged over crops and over several random
initialisations, peaks at the corresponding point: its argmax is the answer.

Defaults are the authors' released settings (ubc-vision/LDM_correspondences and their benchmark
wrapper; --help lists them). At 512 px the layers read are their layers 5-8 counted from 0 over
the maps they store: three at 16x16 and the first at 32x32. Departures: Gaussian noise (their
code draws torch.rand, uniform); the target is noised at the source's timestep (theirs
hard-codes timesteps[-3] there); no flips (their default).

    python -m recipes.correspondence source.png target.png --point 120 200 -o match.png
    python -m recipes.correspondence --toy 50 --weights weights/toy   # PCK@0.1 on toy scenes
"""

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from recipes import load, model_options, settings_from, settings_options, toy_world
from sd.files import unwritable


@dataclass(frozen=True)
class Settings:
    lr: float = 0.0023755632081200314
    steps: int = 129
    inits: int = 5
    schedule: int = 50
    noise_index: int = -8
    sigma: float = 27.97853316316864 / 512
    crop: float = 0.9316549294381423
    crops: int = 20
    layers: int = 4


HELP = {  # --help's words for each setting
    "lr": "Adam learning rate of the embedding",
    "steps": "optimisation steps per initialisation",
    "inits": "random initial embeddings; their target maps are averaged",
    "schedule": "DDIM steps of the schedule the timestep is taken from",
    "noise_index": "which of its timesteps noises the image (-8 of 50: t = 141)",
    "sigma": "the Gaussian's std, as a fraction of the image side",
    "crop": "random crop side, as a fraction of the image side",
    "crops": "crops averaged on the target (the first four at the corners)",
    "layers": "decoder cross layers read: the first ones at the two coarsest levels",
}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m recipes.correspondence", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", nargs="?", type=Path, help="image holding the query point")
    p.add_argument("target", nargs="?", type=Path, help="image to find the point in")
    p.add_argument("--point", nargs=2, type=float, metavar=("X", "Y"),
                   help="the query, in the source image's pixels (x right, y down)")
    p.add_argument("--toy", type=int, metavar="PAIRS", help="instead: evaluate PCK on PAIRS "
                   "held-out toy scene pairs (needs train/scenes.py and the toy model)")
    p.add_argument("--alpha", type=float, default=0.1, help="PCK threshold, a fraction of the "
                   "image side (default 0.1)")
    settings_options(p, Settings, HELP)
    model_options(p)
    p.add_argument("-o", "--output", type=Path, default=Path("match.png"),
                   help="picture: source with the query, target with the answer and its map")
    args = p.parse_args(argv)
    if message := unwritable(args.output):
        p.error(message)
    if args.toy is None and (args.target is None or args.point is None):
        p.error("give SOURCE TARGET --point X Y, or --toy PAIRS")
    counts = (args.steps, args.inits, args.crops, args.layers, 1 if args.toy is None else args.toy)
    if min(counts) < 1:
        p.error("--steps, --inits, --crops, --layers and --toy: give 1 or more")
    if not -args.schedule <= args.noise_index < args.schedule:
        p.error(f"--noise-index: give -{args.schedule} to {args.schedule - 1} (--schedule steps)")
    if not (0 < args.crop <= 1 and args.sigma > 0 and args.alpha > 0):
        p.error("--crop: give more than 0, up to 1; --sigma and --alpha: give positive numbers")
    return args


if __name__ == "__main__":
    parse()  # --help and usage errors answer before torch loads

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from sd import ddim  # noqa: E402
from sd.attention import Control, apply_map, attention, attention_map  # noqa: E402
from sd.pipeline import Pipeline  # noqa: E402


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


def token_maps(pipe: Pipeline, z: torch.Tensor, context: torch.Tensor, sites: list[str], t: int,
               g: torch.Generator) -> torch.Tensor:
    """Maps [B, layers, H, W] at image size (bilinear) of z noised to timestep t with Gaussian
    noise drawn from g."""
    ctrl, noise = FirstTokenMaps(sites), torch.randn(z.shape, generator=g).to(z.device, z.dtype)
    pipe.models.unet(ddim.add_noise(z, noise, t, pipe.ac), t, context.to(pipe.dtype), ctrl)
    hw, size = z.shape[-2:], [n * pipe.cfg.vae.factor for n in z.shape[-2:]]
    maps = [m.unflatten(-1, s.shape(hw))[:, None] for m, s in ctrl.maps.values()]
    return torch.cat([F.interpolate(m, size=size, mode="bilinear") for m in maps], 1)


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


def encode_crop(pipe: Pipeline, image: torch.Tensor, box: tuple[int, ...]) -> torch.Tensor:
    """The crop of image [1, 3, S, S] in [0, 1], resized back to S x S, as scaled latents."""
    x0, y0, c = box
    crop = image[..., y0:y0 + c, x0:x0 + c]
    crop = F.interpolate(crop, size=image.shape[-2:], mode="bilinear", antialias=True)
    with torch.no_grad():
        z = pipe.models.vae.encode(crop.to(pipe.device, pipe.dtype) * 2 - 1).mean
    return z * pipe.cfg.vae.scaling


def gaussian(point: torch.Tensor, side: int, sigma: float) -> torch.Tensor:
    """exp(-d^2 / 2 sigma^2) around `point` (x, y) on a side x side grid of pixel centres."""
    c = torch.arange(side, dtype=torch.float32) + 0.5
    d2 = (c[None, :] - point[0]) ** 2 + (c[:, None] - point[1]) ** 2
    return torch.exp(-d2 / (2 * sigma**2))


def timestep(pipe: Pipeline, s: Settings) -> int:
    return int(ddim.timesteps(s.schedule, pipe.cfg.schedule)[s.noise_index])


def optimise(pipe: Pipeline, image: torch.Tensor, point: torch.Tensor, s: Settings,
             g: torch.Generator, sites: list[str]) -> tuple[torch.Tensor, list[float]]:
    """One initialisation: the fitted context [1, 77, width] and the loss at every step."""
    side, t = image.shape[-1], timestep(pipe, s)
    width = pipe.cfg.text.width
    context = torch.randn(1, pipe.cfg.text.max_len, width, generator=g).to(pipe.device)
    context.requires_grad_(True)
    opt, losses = torch.optim.Adam([context], lr=s.lr), []
    for _ in range(s.steps):
        box = crop_box(point, side, s.crop, g)
        z = encode_crop(pipe, image, box)
        where = (point - torch.tensor(box[:2])) * side / box[2]  # the point in the resized crop
        target = gaussian(where, side, s.sigma * side).to(pipe.device)
        maps = token_maps(pipe, z, context, sites, t, g)
        # Each layer's map against the Gaussian, then averaged over layers, as their code does.
        loss = F.mse_loss(maps, target.expand_as(maps))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return context.detach(), losses


@torch.no_grad()
def locate(pipe: Pipeline, image: torch.Tensor, context: torch.Tensor, s: Settings,
           g: torch.Generator, sites: list[str]) -> torch.Tensor:
    """The layer-averaged map [S, S] over `s.crops` crops: the first four at the corners, then
    around the running argmax (Hedlin et al.'s run_image_with_tokens_cropped)."""
    side, t = image.shape[-1], timestep(pipe, s)
    total, count = torch.zeros(side, side), torch.zeros(side, side)
    corners = [(0, 0), (side, 0), (0, side), (side, side)]
    for i in range(s.crops):
        at = torch.tensor(corners[i] if i < 4 else argmax_point(total / count.clamp_min(1)))
        x0, y0, c = box = crop_box(at, side, s.crop, g)
        z = encode_crop(pipe, image, box)
        m = token_maps(pipe, z, context, sites, t, g).mean(1, keepdim=True).float().cpu()
        total[y0:y0 + c, x0:x0 + c] += F.interpolate(m, size=(c, c), mode="bilinear")[0, 0]
        count[y0:y0 + c, x0:x0 + c] += 1
    return total / count.clamp_min(1)


def argmax_point(m: torch.Tensor) -> tuple[float, float]:
    """(x, y) of the centre of the map's largest pixel."""
    i = int(m.argmax())
    return i % m.shape[1] + 0.5, i // m.shape[1] + 0.5


def correspond(pipe: Pipeline, source: torch.Tensor, target: torch.Tensor,
               point: tuple[float, float], s: Settings = Settings(), seed: int = 0,
               progress: bool = False) -> tuple[tuple[float, float], torch.Tensor]:
    """The point in `target` [1, 3, S, S] matching `point` (x, y) in `source`, and the map
    [S, S] (mean over initialisations) whose argmax it is."""
    g, sites = torch.Generator().manual_seed(seed), decoder_sites(pipe, s.layers)
    query, heat = torch.tensor(point, dtype=torch.float32), 0
    for i in range(s.inits):
        context, losses = optimise(pipe, source, query, s, g, sites)
        heat = heat + locate(pipe, target, context, s, g, sites) / s.inits
        if progress:
            print(f"init {i + 1}/{s.inits}: loss {losses[0]:.4g} -> {losses[-1]:.4g}",
                  file=sys.stderr)
    return argmax_point(heat), heat


def pck(pred: torch.Tensor, true: torch.Tensor, reference: float | torch.Tensor,
        alpha: float = 0.1) -> float:
    """Percentage of correct keypoints: the fraction of predictions [N, 2] within
    alpha * reference of the truth (reference: the image side, or per-point box sizes)."""
    return ((pred - true).norm(dim=-1) <= alpha * torch.as_tensor(reference)).float().mean().item()


def keypoints(subject) -> torch.Tensor:
    """[K, 2] pixel points defined on a toy subject: the centre (mean of its outline), the tips
    of triangles, squares and stars and a heart's bottom, placed as train/scenes.py draws them."""
    import math

    poly = torch.tensor(toy_world().outline(subject.shape)[0], dtype=torch.float32)
    n = len(poly)  # a heart's outline is parametric in t; its bottom tip is at t = pi
    tips = {"triangle": poly, "square": poly, "star": poly[::2],
            "heart": poly[n // 2:n // 2 + 1]}.get(subject.shape, poly[:0])
    a = math.radians(subject.angle)
    rot = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    unit = torch.cat([poly.mean(0, keepdim=True), tips])
    return unit @ rot.T * subject.radius + torch.tensor([subject.x, subject.y])


def toy_pairs(count: int, start: int = 0) -> list[tuple]:
    """Held-out toy scenes with one subject, paired by shape with a different colour (so places,
    sizes and colours differ), shapes in turn: [(source scene, target scene), ...]."""
    scenes = toy_world()
    waiting, pairs, i = {}, {shape: [] for shape in scenes.SHAPES}, start
    per = -(-count // len(scenes.SHAPES))
    while min(map(len, pairs.values())) < per and i < start + 1000 * per:
        scene, i = scenes.test_scene(i, two=0.0), i + 1
        if len(scene.subjects) != 1:
            continue
        shape, other = scene.subjects[0].shape, waiting.pop(scene.subjects[0].shape, None)
        if other is not None and other.subjects[0].colour != scene.subjects[0].colour:
            pairs[shape].append((other, scene))
        else:
            waiting[shape] = scene
    turns = zip(*pairs.values())  # one pair of each shape, then the next
    return [pair for turn in turns for pair in turn][:count]


def evaluate_toy(pipe: Pipeline, pairs: int = 50, alpha: float = 0.1, s: Settings = Settings(),
                 seed: int = 0, progress: bool = False) -> dict[str, float]:
    """PCK@alpha (reference: the image side) over the keypoints of `pairs` held-out toy pairs,
    with two baselines: a uniformly random point, and the source point copied unchanged."""
    render = toy_world().render
    to_image = lambda a: torch.from_numpy(a).permute(2, 0, 1)[None].float() / 255  # noqa: E731
    preds, trues, copies = [], [], []
    for n, (src, tgt) in enumerate(toy_pairs(pairs)):
        source, target = to_image(render(src)[0]), to_image(render(tgt)[0])
        for k, (p, q) in enumerate(zip(keypoints(src.subjects[0]), keypoints(tgt.subjects[0]))):
            found, _ = correspond(pipe, source, target, tuple(p.tolist()), s, seed + 1000 * n + k)
            preds.append(torch.tensor(found)), trues.append(q), copies.append(p)
        if progress:
            print(f"pair {n + 1}/{pairs}: PCK so far "
                  f"{pck(torch.stack(preds), torch.stack(trues), source.shape[-1], alpha):.3f}",
                  file=sys.stderr)
    side, true = source.shape[-1], torch.stack(trues)
    g = torch.Generator().manual_seed(seed)
    return {"pck": pck(torch.stack(preds), true, side, alpha), "keypoints": len(trues),
            "chance": pck(torch.rand(true.shape, generator=g) * side, true, side, alpha),
            "copy source point": pck(torch.stack(copies), true, side, alpha)}


def picture(source: torch.Tensor, target: torch.Tensor, point, found, heat: torch.Tensor):
    """Source with the query, target with the answer, the map over the target."""
    from PIL import ImageDraw

    from sd.images import grid, overlay, to_pil

    src, tgt = to_pil(torch.cat([source, target]))
    m = (heat - heat.min()) / (heat.max() - heat.min()).clamp_min(1e-8)
    k = max(1, 256 // src.width)  # small (toy) images are shown 4x, so the rings can be seen
    tiles = [im.resize((im.width * k, im.height * k), 0) for im in (src, tgt, overlay(tgt, m))]
    r = max(3, tiles[0].width // 64)
    for im, (x, y) in zip(tiles, (point, found, found)):
        x, y = x * k, y * k
        ImageDraw.Draw(im).ellipse([x - r, y - r, x + r, y + r], outline=(0, 255, 255), width=2)
    return grid([tiles])


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    from PIL import Image, ImageOps

    from sd.images import image_format, load_image, save_image
    from sd.weights import WeightsError

    s = settings_from(args, Settings)
    try:  # what the user gave is checked before the model loads
        image_format(args.output)
        if args.toy is None:
            for path in (args.source, args.target):
                load_image(path, 64, 64)
            with Image.open(args.source) as im:  # as displayed, and as load_image crops it
                w, h = ImageOps.exif_transpose(im).size
            unit = [(p - (n - min(w, h)) / 2) / min(w, h) for p, n in zip(args.point, (w, h))]
            if not all(0 <= u < 1 for u in unit):
                raise ValueError(f"--point {args.point[0]:g} {args.point[1]:g} is outside the "
                                 f"centre square of the {w}x{h} source image")
        world = toy_world() if args.toy is not None else None
        pipe = load(args)
        side = pipe.cfg.resolution
        if world is not None:
            result = evaluate_toy(pipe, args.toy, args.alpha, s, args.seed, not args.quiet)
            print(", ".join(f"{k}: {v:.3g}" for k, v in result.items()))
            return 0
        source, target = (load_image(p, side, side) for p in (args.source, args.target))
        point = tuple(u * side for u in unit)
        found, heat = correspond(pipe, source, target, point, s, args.seed, not args.quiet)
    except (WeightsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    save_image(picture(source, target, point, found, heat), args.output)
    print(f"query ({point[0]:.1f}, {point[1]:.1f}) -> ({found[0]:.1f}, {found[1]:.1f}) in "
          f"{side}x{side} pixels; wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
