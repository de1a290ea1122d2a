"""The training images: a folder of them, their order, and every random number of a micro-batch.

Data order, randomness and DDP. Every random number of a micro-batch is drawn for the GLOBAL batch
(--batch-size x world size examples) from one CPU torch.Generator seeded with --seed, identically
on every rank, and rank r keeps examples r, r + world, ... (r::world). Example k of the run's
stream is image perm_e[k mod n] of epoch e = k // n, where perm_e is a pure function of
(seed, e). Hence:
- 2 processes with --batch-size b see exactly the images, crops, timesteps and noise that 1
  process with --batch-size 2b sees; DDP averages the ranks' gradients of their b-example means,
  which is the gradient of the 2b-example mean: the runs agree up to float summation order;
- a resumed run needs only the step and the generator's state, both in the checkpoint. Nothing
  draws from python's `random` or numpy; torch's global CPU and CUDA states are saved anyway.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from sd.images import rgb
from train import UsageError


class Ranks(Protocol):
    """What draw() reads of a run (train.loop.Run has both)."""

    rank: int
    world: int


MAX_ASPECT = 4
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


class ImageFolder:
    """A folder's images in memory, uint8 [3, H, W], each resized so min(H, W) == resolution,
    and their captions: the text of NAME.txt beside NAME.png, where there is one (else None).

    Checked once, up front: unreadable and non-image files are skipped, and so are images more
    than MAX_ASPECT times as wide as high or the reverse (a random square of 12800x1 shows
    nothing, and resizing it takes gigabytes); smaller images are upscaled (LANCZOS, as
    sd.images.load_image). All are listed in `warnings` for the CLI to print.
    """

    def __init__(self, folder: str | Path, resolution: int, limit: int | None = None):
        folder = Path(folder)
        if not folder.is_dir():
            raise UsageError(f"{folder}: no such folder; pass the folder that holds the images")
        every = sorted(f for f in folder.iterdir() if f.is_file() and not f.name.startswith("."))
        files = [f for f in every if f.suffix.lower() != ".txt"]  # captions go with images
        if not files:
            raise UsageError(f"{folder}: " + ("no images, only captions (.txt)" if every else
                             "the folder is empty") + "; put the images (jpg, png, webp, ...) "
                             "in it")
        self.images: list[torch.Tensor] = []
        self.names: list[str] = []
        self.captions: list[str | None] = []
        self.warnings: list[str] = []
        skipped, small = [], []
        for f in files:
            if limit is not None and len(self.images) == limit:
                break
            try:
                with Image.open(f) as im:
                    im.load()
                    image = rgb(im)  # EXIF orientation (phone photos), 16-bit scaled to 8
            except UnidentifiedImageError:
                skipped.append(f"{f.name} (not an image)")
                continue
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
                skipped.append(f"{f.name} ({'truncated' if 'truncat' in str(e).lower() else e})")
                continue
            w, h = image.size
            if max(w, h) > MAX_ASPECT * min(w, h):
                skipped.append(f"{f.name} ({w}x{h}: crop it to the subject)")
                continue
            if min(w, h) < resolution:
                small.append(f"{f.name} ({w}x{h})")
            s = resolution / min(w, h)
            size = (max(resolution, round(w * s)), max(resolution, round(h * s)))
            image = image.resize(size, Image.Resampling.LANCZOS)
            self.images.append(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1))
            self.names.append(f.name)
            self.captions.append(caption(f.with_suffix(".txt")))
        if skipped:
            self.warnings.append(f"{folder}: skipped {len(skipped)} of {len(files)} files: "
                                 + ", ".join(skipped))
        if small:
            self.warnings.append(f"{folder}: {len(small)} images smaller than the training "
                                 f"resolution {resolution} px were upscaled and may look soft: "
                                 + ", ".join(small))
        if not self.images:
            raise UsageError(f"{folder}: none of its {len(files)} files is a readable image: "
                             + ", ".join(skipped))

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, index: list[int], u: torch.Tensor, resolution: int, center_crop: bool,
              flip: bool) -> torch.Tensor:
        """Crops of images `index` as [b, 3, res, res] in [-1, 1]; the uniforms u [b, 3] place a
        random crop (top, left) and decide a flip (< 0.5), so all randomness comes from the Draw."""
        out = []
        for i, (uy, ux, uf) in zip(index, u.tolist()):
            image = self.images[i % len(self.images)]
            h, w = image.shape[1:]
            top, left = (((h - resolution) // 2, (w - resolution) // 2) if center_crop else
                         (int(uy * (h - resolution + 1)), int(ux * (w - resolution + 1))))
            crop = image[:, top : top + resolution, left : left + resolution]
            out.append(crop.flip(-1) if flip and uf < 0.5 else crop)
        return torch.stack(out).float() / 127.5 - 1


def caption(file: Path) -> str | None:
    """An image's caption file read, None where there is none (or it is blank)."""
    if not file.is_file():
        return None
    try:
        return file.read_text(encoding="utf-8").strip() or None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{file}: not a readable UTF-8 caption ({e}); fix or delete it (an "
                         "image's NAME.txt is its training prompt)") from None


def examples(n: int, seed: int, positions: torch.Tensor) -> list[int]:
    """Dataset indices of stream positions (see the module docstring): a reshuffle per epoch."""
    out = []
    for p in positions.tolist():
        epoch, k = divmod(p, n)
        g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**63)
        out.append(int(torch.randperm(n, generator=g)[k]))
    return out


@dataclass
class Draw:
    """The random numbers of one micro-batch, already cut to this rank's b examples.

    parts = 2 with DreamBooth's prior preservation (instance rows, then class rows), else 1.
    """

    positions: torch.Tensor  # [b] positions in the example stream
    u: torch.Tensor  # [parts, b, 3] uniforms: crop top, crop left, flip
    pick: torch.Tensor  # [b] uniforms: which prompt template (textual inversion)
    t: torch.Tensor  # [parts * b] timesteps, uniform in [0, train_steps)
    noise: torch.Tensor  # [parts * b, C, h, w] eps of q(x_t | x_0)
    sample: torch.Tensor  # [parts * b, C, h, w] noise of the VAE posterior sample


def draw(gen: torch.Generator, micro: int, batch: int, run: Ranks, parts: int,
         latent: tuple[int, int, int], train_steps: int) -> Draw:
    """Draw micro-batch number `micro` of the global batch, keep this rank's r::world share."""
    g, mine = batch * run.world, slice(run.rank, None, run.world)
    u = torch.rand(parts, g, 3, generator=gen)
    pick = torch.rand(g, generator=gen)
    t = torch.randint(0, train_steps, (parts, g), generator=gen)
    noise = torch.randn(parts, g, *latent, generator=gen)
    sample = torch.randn(parts, g, *latent, generator=gen)
    rows = lambda x: x[:, mine].flatten(0, 1)  # noqa: E731  [parts, g, ...] -> [parts * b, ...]
    return Draw(torch.arange(micro * g, (micro + 1) * g)[mine], u[:, mine], pick[mine], rows(t),
                rows(noise), rows(sample))
