"""Heat maps of a given image (DAAM, Tang et al. 2023) and their evaluation on the toy world.

The heat map itself is `sd.controls.HeatMap` (one implementation; `python -m sd --heatmap` draws it
for generated images). Here it is read for an image the model did not generate: the image's
latent is noised to each timestep of a DDIM schedule (one shared noise) and denoised once with
its caption, the control recording as during sampling. On the toy world the subject's exact
mask is known, so the word's thresholded map is scored by IoU against it, beside a centred blob
(a centred Gaussian thresholded the same way): the baseline any layout prior would reach.

    python -m recipes.heatmap --toy 50 --weights weights/toy -o out/heat.png  # mean IoU, baseline
"""

import argparse
import sys
from pathlib import Path

from recipes import load, model_options
from sd import cli
from sd.files import unwritable


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m recipes.heatmap", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--toy", type=int, metavar="SCENES", required=True,
                   help="held-out one-subject toy scenes to score (the README's numbers: --toy "
                   "50 at the defaults, about 1.5 min on one CPU thread)")
    p.add_argument("--steps", type=int, default=50, help="timesteps the maps are summed over "
                   "(a DDIM schedule, default 50)")
    p.add_argument("--guidance", type=float, default=7.5, help="CFG scale of each evaluation "
                   "(default 7.5; the maps read the conditional half either way)")
    p.add_argument("--threshold", type=float, default=0.4, help="tau on the normalised map "
                   "(default 0.4, DAAM's)")
    model_options(p)
    p.add_argument("-o", "--output", type=Path, help="picture of the first 4 scenes: photo, map, "
                   "mask against the exact mask")
    args = p.parse_args(argv)
    if args.output and (message := unwritable(args.output)):
        p.error(message)
    if args.toy < 1 or args.steps < 1 or not 0 <= args.threshold <= 1:
        p.error("--toy and --steps must be at least 1, --threshold within 0 to 1")
    return args


if __name__ == "__main__":
    parse()  # --help and usage errors answer before torch loads

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

from sd import ddim  # noqa: E402
from sd.controls import HeatMap  # noqa: E402
from sd.pipeline import Pipeline  # noqa: E402
from toy import heldout  # noqa: E402


@torch.no_grad()
def image_heat(pipe: Pipeline, z: torch.Tensor, prompt: str, words: list[str], steps: int = 50,
               guidance: float = 7.5, seed: int = 0) -> HeatMap:
    """HeatMap of the words of `prompt` for the scaled latent z [1, 4, h, w]: z noised to every
    timestep of a `steps`-step DDIM schedule with one noise, one guided evaluation each."""
    tokens = [pipe.tokenizer.word_indices(prompt, w) for w in words]
    heat = HeatMap([i for t in tokens for i in t], tuple(z.shape[-2:]))
    heat.prompts, heat.steps = 1, steps
    cond, uncond = pipe.encode_prompt(prompt), pipe.encode_prompt("")
    noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(seed)).to(z)
    for i, t in enumerate(ddim.timesteps(steps, pipe.cfg.schedule).tolist()):
        heat.step, heat.t = i, t
        pipe.guided(ddim.add_noise(z, noise, t, pipe.ac), t, cond, uncond, guidance, heat)
    return heat


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a & b).sum() / (a | b).sum().clamp_min(1)).item()


def centred_blob(h: int, w: int, threshold: float) -> torch.Tensor:
    """A centred Gaussian (std a quarter of each side) thresholded like a normalised heat map."""
    y = torch.arange(h, dtype=torch.float32)[:, None] + 0.5 - h / 2
    x = torch.arange(w, dtype=torch.float32)[None, :] + 0.5 - w / 2
    return torch.exp(-(x / (w / 4)) ** 2 / 2 - (y / (h / 4)) ** 2 / 2) >= threshold


def evaluate_toy(pipe: Pipeline, scenes: int = 50, steps: int = 50, guidance: float = 7.5,
                 threshold: float = 0.4, seed: int = 0) -> tuple[dict[str, float], list[tuple]]:
    """Mean IoU of the subject word's mask (the shape's name; DAAM's tau) with the exact subject
    mask over held-out one-subject toy scenes, and of a centred blob with the same masks; and per
    scene (photo [3, H, W] in [0, 1], normalised map [H, W], exact mask) for a picture."""
    world, scores, blobs, shown = heldout.world, [], [], []
    for i, scene in enumerate(heldout.scenes(scenes)):
        photo, masks, _ = world.render(scene)
        truth = torch.from_numpy(masks[0])
        z = pipe.encode(Image.fromarray(photo), *photo.shape[:2])
        heat = image_heat(pipe, z, world.caption(scene), [scene.subjects[0].shape], steps,
                          guidance, seed + i)
        up = F.interpolate(heat.maps([len(heat.tokens)]).float().cpu(), size=truth.shape,
                           mode="bicubic")[0, 0]
        up = (up - up.min()) / (up.max() - up.min()).clamp_min(1e-8)
        scores.append(iou(up >= threshold, truth))
        blobs.append(iou(centred_blob(*truth.shape, threshold), truth))
        shown.append((heldout.image(photo)[0], up.clamp(0, 1), truth))
    return {"mean iou": sum(scores) / scenes, "centred blob iou": sum(blobs) / scenes}, shown


def picture(shown: list[tuple], threshold: float) -> Image.Image:
    """Per scene: the photo, its map over it, and the thresholded map against the exact mask
    (white: both, red: the map alone, blue: the mask alone); shown 4x."""
    from sd.images import grid, overlay, to_pil

    rows = []
    for photo, heat, truth in shown:
        image, mask = to_pil(photo[None])[0], heat >= threshold
        both = torch.stack([mask, mask & truth, truth]).float()  # red, green, blue
        row = [image, overlay(image, heat), to_pil(both[None])[0]]
        rows.append([im.resize((256, 256), Image.Resampling.NEAREST) for im in row])
    return grid(rows)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    from sd.images import image_format, save_image

    if args.output:
        image_format(args.output)
    pipe = load(args)
    r, shown = evaluate_toy(pipe, args.toy, args.steps, args.guidance, args.threshold,
                            args.seed)
    print(f"mean IoU of the shape word's mask with the exact subject mask: {r['mean iou']:.3f} "
          f"(centred blob {r['centred blob iou']:.3f}; {args.toy} toy scenes, tau "
          f"{args.threshold:g}, {args.steps} timesteps)")
    if args.output:
        save_image(picture(shown[:4], args.threshold), args.output)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
