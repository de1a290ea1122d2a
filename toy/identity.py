"""Identity: how much a subject is one particular object, not only one of its kind.

The personalization literature scores a subject against its reference images by the cosine of
self-supervised image embeddings (DINO, CLIP-I). The toy world's equivalent: a small CNN embeds a
crop around a subject so that two renders of the same object (shape, paints, texture with its
period, size, direction and phase, rim, notch) in other poses, sizes and backgrounds land close,
and different objects apart. It is trained contrastively (InfoNCE, Oord et al. 2018) on pairs of
renders of random objects of the toy world, each batch holding hard negatives: siblings that share
shape, paints and texture kind and differ only in layout, rim or notch. The same blur, noise and
colour cast as the judge's teach it to read decoded images.

    identity = cosine(embed(crop of the subject), mean embedding of the concept's references)

`validate` checks what the score is for: a concept's held-out views must score above lookalikes
(toy.concepts.lookalike: the same kind in another layout) in at least 90% of pairs.

    python -m toy identity -o out/toyrun/identity.safetensors   # train (6 CPU minutes), validate
"""

import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from sd.files import atomic_write
from toy import concepts, scenes
from toy.judge import augment

CROP = 32  # pixels: the side of the square every subject crop is resized to
SEED = 3 * 10**9  # object seeds: above every scene and concept seed


class Encoder(nn.Module):
    """Subject crops [B, 3, 32, 32] in [-1, 1] -> unit embeddings [B, dim]."""

    def __init__(self, width: int = 32, dim: int = 64):
        super().__init__()
        layers, c_in = [], 3
        for c in (width, 2 * width, 4 * width):  # 32 -> 16 -> 8 -> 4 px
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
                       nn.Conv2d(c, c, 3, stride=2, padding=1), nn.BatchNorm2d(c), nn.ReLU()]
            c_in = c
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(c_in * 16, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.body(x).flatten(1)), dim=1)


def crop(image: np.ndarray, region: np.ndarray, margin: float = 1.25) -> torch.Tensor:
    """The square around a region's bounding box (`margin` times its larger side, edges
    replicated beyond the frame), resized to CROP: float32 [3, CROP, CROP] in [-1, 1]. An empty
    region gives the whole image."""
    x = torch.from_numpy(np.array(image, np.float32)).permute(2, 0, 1) / 127.5 - 1
    if region.any():
        ys, xs = np.nonzero(region)
        cy, cx = (ys.min() + ys.max() + 1) / 2, (xs.min() + xs.max() + 1) / 2
        half = max(ys.max() + 1 - ys.min(), xs.max() + 1 - xs.min()) * margin / 2 + 1
        top, left = int(round(cy - half)), int(round(cx - half))
        side = int(round(2 * half))
        pad = max(0, -top, -left, top + side - image.shape[0], left + side - image.shape[1])
        x = F.pad(x[None], (pad,) * 4, mode="replicate")[0]
        x = x[:, top + pad : top + pad + side, left + pad : left + pad + side]
    return F.interpolate(x[None], size=(CROP, CROP), mode="bilinear", antialias=True,
                         align_corners=False)[0]


@torch.no_grad()
def embed(encoder: Encoder, crops: torch.Tensor) -> torch.Tensor:
    encoder.eval()
    return encoder(crops)


def reference(encoder: Encoder, views: list[tuple[np.ndarray, np.ndarray]]) -> torch.Tensor:
    """A concept's embedding: the normalised mean of its reference views' embeddings."""
    e = embed(encoder, torch.stack([crop(image, mask) for image, mask in views]))
    return F.normalize(e.mean(0), dim=0)


def score(encoder: Encoder, image: np.ndarray, region: np.ndarray, ref: torch.Tensor) -> float:
    """Identity of the subject in `region` of `image` with a concept (reference's output)."""
    return float(embed(encoder, crop(image, region)[None])[0] @ ref)


# ------------------------------------------------------------------------------- training

def objects(seed: int) -> tuple[scenes.Subject, scenes.Subject]:
    """An object of the toy world (a rim one time in four, a notch one in ten) and its sibling: the
    same shape, paints and texture kind in another layout, rim or notch."""
    rng = np.random.default_rng([SEED, seed])
    s = scenes._subject(rng, list(scenes.COLOURS))
    taken = [s.colour, s.second]
    s = replace(s, outline=str(rng.choice([c for c in scenes.COLOURS if c not in taken]))
                if rng.random() < 0.25 else None, notch=bool(rng.random() < 0.1))
    other = scenes._subject(rng, list(scenes.COLOURS))
    sibling = replace(s, period=other.period, duty=other.duty, turn=other.turn, phase=other.phase)
    if s.texture == "solid" or rng.random() < 0.3:  # differ by rim or notch instead
        free = [c for c in scenes.COLOURS if c not in taken]
        sibling = replace(sibling, notch=not s.notch) if rng.random() < 0.5 else replace(
            sibling, outline=None if s.outline else str(rng.choice(free)))
    return s, sibling


def view(subject: scenes.Subject, rng: np.random.Generator) -> torch.Tensor:
    """The subject in a random pose on a random background, cropped."""
    radius = float(rng.uniform(9, 22))
    x, y = rng.uniform(radius + 1, scenes.SIZE - radius - 1, size=2)
    s = replace(subject, x=float(x), y=float(y), radius=radius, angle=float(rng.uniform(-35, 35)))
    bg, pattern, second = scenes.ground(rng, (s.colour, s.second, s.outline))
    scene = scenes.Scene((s,), bg, pattern, int(rng.choice([6, 8, 10, 12, 16])),
                         int(rng.integers(4)), second)
    image, masks, _ = scenes.render(scene)
    return crop(image, masks[0], margin=float(rng.uniform(1.1, 1.4)))


def pool(count: int, views: int) -> torch.Tensor:
    """Crops [2 * count, views, 3, CROP, CROP]: objects 2k and 2k + 1 are siblings."""
    rng = np.random.default_rng(SEED)
    out = [torch.stack([view(s, rng) for _ in range(views)])
           for k in range(count) for s in objects(k)]
    return torch.stack(out)


def train(out: Path, count: int, steps: int, seed: int = 0, batch: int = 64,
          temperature: float = 0.1) -> dict:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    data = pool(count, 4)
    encoder = Encoder()
    opt = torch.optim.AdamW(encoder.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=steps)
    for _ in range(steps):
        encoder.train()
        pairs = torch.randint(count, (batch // 2,), generator=g)
        idx = torch.stack([2 * pairs, 2 * pairs + 1], 1).flatten()  # siblings side by side
        pick = torch.stack([torch.randperm(data.shape[1], generator=g)[:2] for _ in idx])
        a, b = data[idx, pick[:, 0]], data[idx, pick[:, 1]]
        z = encoder(augment(torch.cat([a, b]), g))
        logits = z @ z.T / temperature
        logits.fill_diagonal_(float("-inf"))
        n = len(idx)
        target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
        loss = F.cross_entropy(logits, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    report = {"objects": 2 * count, "steps": steps, "seconds": round(time.time() - t0),
              **validate(encoder)}
    with atomic_write(out) as tmp:
        save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, tmp)
    return report


def validate(encoder: Encoder, views: int = 20) -> dict:
    """For each concept: the share of (held-out view, lookalike) pairs in which the held-out
    view scores higher against the concept's references; and the mean of each."""
    report = {}
    for name in concepts.CONCEPTS:
        ref = reference(encoder, concepts.references(name))
        own = [score(encoder, i, m, ref) for i, m in
               concepts.references(name, views, first=concepts.REFERENCES)]
        look = []
        for k in range(views):
            scene = concepts.concept_scene(name, concepts.REFERENCES + k,
                                           concepts.lookalike(name, k))
            image, masks, _ = scenes.render(scene)
            look.append(score(encoder, image, masks[0], ref))
        report[name] = {"ranked": float(np.mean([o > x for o in own for x in look])),
                        "own": float(np.mean(own)), "lookalike": float(np.mean(look))}
    report["ranked"] = float(np.mean([v["ranked"] for v in report.values()]))
    return report


def load(file: str | Path) -> Encoder:
    encoder = Encoder()
    encoder.load_state_dict(load_file(Path(file)))
    return encoder.eval()
