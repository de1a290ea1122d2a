"""How a swap is scored on the toy world, where every source scene has an exact subject mask and a
render of its background alone (toy/scenes.py). Plain functions of uint8 [H, W, 3] images and
bool [H, W] masks, so they are tested on synthetic arrays (tests/test_toy_swap.py).

- background PSNR: outside the source subject's mask dilated by DILATE pixels (the subject's
  soft edge and the VAE's blur around it are not background), against the background render.
- layout IoU: the output's subject region against the source subject's mask. The region is
  found by difference: pixels whose largest channel differs from the background render by more
  than REGION_THRESHOLD (0..255), then opened (eroded and dilated by 1 px) to drop specks. A
  swap that keeps the background and draws the new subject where the old one was scores 1; one
  that redraws the whole picture differs everywhere and scores about the subject's area.
- concept fidelity: how much the pixels of a region look like the concept's reference subjects
  (their exact masks), from two statistics, each in [0, 1]:
  colour, the histogram intersection of the named-paint histograms (every pixel counted as the
  nearest of toy.scenes.COLOURS, so a VAE's small colour shifts do not move it across bins);
  texture, min/max of the mean absolute difference between 4-neighbours inside the region eroded
  by 1 px (polka dots and stripes are busy, flat paint is not; the outline is left out).
  fidelity = (colour + texture) / 2.
- For a generated sample, which has no background render, `border_region` finds the subject:
  pixels farther than REGION_THRESHOLD from every colour on the image's 2 px border (the toy
  world draws subjects inside the frame, so the border is background).
"""


import numpy as np
import torch

from sd import images
from toy.scenes import COLOURS

DILATE = 3  # pixels: the anti-aliased edge is 1 px, the toy VAE's blur about 2 more
REGION_THRESHOLD = 48.0  # 0..255: above the VAE's error (30 dB is RMS 8) and a gradient's slope
PALETTE = np.array(list(COLOURS.values()), np.float32)  # [8, 3]


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation by a (2r+1)^2 square (a max over shifted copies; no scipy)."""
    padded = np.pad(mask, radius)
    h, w = mask.shape
    out = np.zeros_like(mask)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            out |= padded[dy : dy + h, dx : dx + w]
    return out


def erode(mask: np.ndarray, radius: int) -> np.ndarray:
    return ~dilate(~mask, radius)


def psnr(image: np.ndarray, reference: np.ndarray, where: np.ndarray | None = None) -> float:
    """PSNR in dB (sd.images.psnr) of two uint8 [H, W, 3] images, over the pixels where `where`
    [H, W] is true if given; inf when equal."""
    chw = lambda a: torch.tensor(a).permute(2, 0, 1)  # noqa: E731 (a copy: inputs may be read-only)
    mask = None if where is None else torch.tensor(where)
    return images.psnr(chw(image), chw(reference), 255.0, mask).item()


def background_psnr(image: np.ndarray, background: np.ndarray, mask: np.ndarray,
                    radius: int = DILATE) -> float:
    """PSNR of `image` against `background` outside the dilated `mask`."""
    keep = ~dilate(mask, radius)
    assert keep.any(), "the dilated mask covers the whole image: nothing to compare"
    return psnr(image, background, keep)


def subject_region(image: np.ndarray, background: np.ndarray,
                   threshold: float = REGION_THRESHOLD) -> np.ndarray:
    """Where `image` departs from the background render: max channel |difference| > threshold,
    then opened by 1 px."""
    diff = np.abs(image.astype(np.float32) - background.astype(np.float32)).max(-1)
    return dilate(erode(diff > threshold, 1), 1)


def border_region(image: np.ndarray, threshold: float = REGION_THRESHOLD,
                  width: int = 2) -> np.ndarray:
    """The subject of an image without a background render: pixels farther (max channel) than
    `threshold` from every colour on its `width`-pixel border, opened by 1 px."""
    img = image.astype(np.float32)
    edge = np.ones(image.shape[:2], bool)
    edge[width:-width, width:-width] = False
    border = np.unique(img[edge].round(), axis=0)  # [k, 3]
    near = np.zeros(image.shape[:2], bool)
    for chunk in np.array_split(border, max(1, len(border) // 64)):
        near |= (np.abs(img[:, :, None] - chunk[None, None]).max(-1) <= threshold).any(-1)
    return dilate(erode(~near, 1), 1)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two bool masks (1 when both are empty)."""
    union = (a | b).sum()
    return 1.0 if union == 0 else float((a & b).sum() / union)


def paint_histogram(pixels: np.ndarray) -> np.ndarray:
    """[N, 3] pixels -> the fraction of them nearest to each named paint, [len(COLOURS)]."""
    d = ((pixels[:, None].astype(np.float32) - PALETTE[None]) ** 2).sum(-1)
    counts = np.bincount(d.argmin(1), minlength=len(PALETTE)).astype(np.float64)
    return counts / max(counts.sum(), 1)


def busyness(image: np.ndarray, region: np.ndarray) -> float:
    """Mean absolute 4-neighbour difference (0..255, channels averaged) inside the region eroded
    by 1 px; 0 for an empty region."""
    inner = erode(region, 1)
    img = image.astype(np.float32)
    total, count = 0.0, 0
    for axis in (0, 1):
        diff = np.abs(np.diff(img, axis=axis)).mean(-1)
        both = np.delete(inner, -1, axis) & np.delete(inner, 0, axis)
        total, count = total + float(diff[both].sum()), count + int(both.sum())
    return total / count if count else 0.0


def concept_stats(references: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, float]:
    """(paint histogram, busyness) of a concept's reference subjects, from their exact masks."""
    pixels = np.concatenate([image[mask] for image, mask in references])
    return paint_histogram(pixels), float(np.mean([busyness(i, m) for i, m in references]))


def fidelity(image: np.ndarray, region: np.ndarray,
             stats: tuple[np.ndarray, float]) -> dict[str, float]:
    """{"colour", "texture", "fidelity"} of the region against concept_stats(references)."""
    if not region.any():
        return {"colour": 0.0, "texture": 0.0, "fidelity": 0.0}
    hist, busy = stats
    colour = float(np.minimum(paint_histogram(image[region]), hist).sum())
    mine = busyness(image, region)
    texture = min(mine, busy) / max(mine, busy) if max(mine, busy) > 0 else 1.0
    return {"colour": colour, "texture": texture, "fidelity": (colour + texture) / 2}
