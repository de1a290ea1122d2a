"""Heat maps of a given image (DAAM, Tang et al. 2023) and their evaluation on the toy world.

The heat map itself is `sd.controls.HeatMap` (one implementation; `python -m sd --heatmap` draws it
for generated images). Here it is read for an image the model did not generate: the image's
latent is noised to each timestep of a DDIM schedule (one shared noise) and denoised once with
its caption, the control recording as during sampling. On the toy world the subject's exact
mask is known, so the word's thresholded map is scored by IoU against it, beside a centred blob
(a centred Gaussian thresholded the same way): the baseline any layout prior would reach.

The command line: `python -m recipes heatmap --help` (recipes/__main__.py).
"""

import torch
import torch.nn.functional as F
from PIL import Image

from sd import ddim
from sd.controls import HeatMap
from sd.images import grid, overlay, to_pil
from sd.pipeline import Pipeline
from toy import heldout


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
    rows = []
    for photo, heat, truth in shown:
        image, mask = to_pil(photo[None])[0], heat >= threshold
        both = torch.stack([mask, mask & truth, truth]).float()  # red, green, blue
        row = [image, overlay(image, heat), to_pil(both[None])[0]]
        rows.append([im.resize((256, 256), Image.Resampling.NEAREST) for im in row])
    return grid(rows)
