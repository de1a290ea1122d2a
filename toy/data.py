"""Tensors of the toy world for pretraining: rendered scene pools, random crops, latent caches.

Pools are rendered once and cached as .npy files in the run folder (a pool is a pure function of
its split and size, so a cache can always be rebuilt); training then draws batches from them with
a seeded torch.Generator, so a run is reproducible and resumable from (step, generator state).
"""

from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from sd import images
from toy import outside, scenes


def pool(split: str, count: int, cache: Path | None = None, progress: bool = True):
    """(images uint8 [N, 64, 64, 3], captions [N]) of the first `count` scenes of a split
    (toy/scenes.py); split "outside": scenes of toy/outside.py's second renderer."""
    draw = {"train": scenes.train_scene, "test": scenes.test_scene, "outside": None}[split]
    file = None if cache is None else Path(cache) / f"pool-{split}-{count}.npz"
    if file is not None and file.exists():
        data = np.load(file)
        return data["images"], [str(c) for c in data["captions"]]
    images = np.empty((count, scenes.SIZE, scenes.SIZE, 3), np.uint8)
    captions = []
    for i in tqdm(range(count), desc=f"rendering {split}", disable=not progress):
        if draw is None:
            images[i], text = outside.scene(i)
        else:
            scene = draw(i)
            images[i], text = scenes.render(scene)[0], scenes.caption(scene)
        captions.append(text)
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_name(file.name + ".tmp.npz")
        np.savez(tmp, images=images, captions=np.array(captions))
        tmp.replace(file)
    return images, captions


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float32 [N, 3, H, W] in [-1, 1], as the VAE takes images."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def crops(images: np.ndarray, batch: int, crop: int, g: torch.Generator,
          widen: bool = False) -> torch.Tensor:
    """A batch of random crops (and horizontal flips) from a pool, [-1, 1] [B, 3, crop, crop].
    With `widen`, also quarter turns and a per-channel colour gain and offset (+-10%), so the
    VAE sees directions and paints beyond the world's own."""
    idx = torch.randint(len(images), (batch,), generator=g)
    side = images.shape[1]
    oy, ox = torch.randint(side - crop + 1, (2, batch), generator=g)
    flip = torch.rand(batch, generator=g) < 0.5
    turns = torch.randint(4 if widen else 1, (batch,), generator=g)
    out = []
    for i, y, x, f, k in zip(idx.tolist(), oy.tolist(), ox.tolist(), flip.tolist(),
                             turns.tolist()):
        a = images[i, y : y + crop, x : x + crop]
        out.append(np.rot90(a[:, ::-1] if f else a, k))
    x = to_tensor(np.ascontiguousarray(np.stack(out)))
    if widen:
        gain = 1 + 0.2 * (torch.rand(batch, 3, 1, 1, generator=g) - 0.5)
        offset = 0.2 * (torch.rand(batch, 3, 1, 1, generator=g) - 0.5)
        x = (x * gain + offset).clamp(-1, 1)
    return x


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [-1, 1] (peak-to-peak 2), after clamping and 8-bit
    rounding of `a` as a saved image would have."""
    a = ((a.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1
    return images.psnr(a, b, peak=2.0)
