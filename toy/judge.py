"""The toy world's judge: a small CNN that reads a single-subject scene's shape, colour and texture.

It measures text adherence of generated samples (the share whose subject the judge reads as the
caption's shape, colour and texture). Trained on the generator's own labels (training-split
scenes with one subject), with noise, blur and colour jitter so that it reads decoded VAE
outputs too; its accuracy on held-out scenes is reported next to every adherence
figure, since a judge's errors bound what it can certify. A two-tone subject's colour is either of
its two (which half is "first" is not drawn), so it is learnt and read as either.

    python -m toy judge -o out/toyrun/judge.pt          # train (about 30 CPU minutes), report
"""

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from sd.files import atomic_write
from toy import scenes

SHAPES, COLOURS, TEXTURES = scenes.SHAPES, list(scenes.COLOURS), scenes.TEXTURES


class Judge(nn.Module):
    """Images [B, 3, 64, 64] in [-1, 1] -> logits of (shape [B, 6], colour [B, 8], texture
    [B, 5])."""

    def __init__(self, width: int = 32):
        super().__init__()
        # A strided stem first: full-resolution convolutions cost seconds per step on one core.
        layers, c_in = [nn.Conv2d(3, width, 4, stride=2, padding=1), nn.ReLU()], width
        for c in (2 * width, 4 * width, 4 * width):  # 32 -> 16 -> 8 -> 4 px
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
                       nn.Conv2d(c, c, 3, stride=2, padding=1), nn.BatchNorm2d(c), nn.ReLU()]
            c_in = c
        self.body = nn.Sequential(*layers)
        self.shape = nn.Linear(c_in, len(SHAPES))
        self.colour = nn.Linear(c_in, len(COLOURS))
        self.texture = nn.Linear(c_in, len(TEXTURES))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.body(x).amax(dim=(2, 3))  # max-pool: a subject is small and anywhere
        return self.shape(h), self.colour(h), self.texture(h)


def labels(s: scenes.Subject) -> tuple[int, torch.Tensor, int]:
    """(shape id, colour target [8]: one-hot, or half and half for a two-tone, texture id)."""
    colour = torch.zeros(len(COLOURS))
    both = (s.colour, s.second) if s.texture == "two-tone" else (s.colour,)
    for c in both:
        colour[COLOURS.index(c)] = 1 / len(both)
    return SHAPES.index(s.shape), colour, TEXTURES.index(s.texture)


def labelled(indices, split: str) -> tuple[torch.Tensor, ...]:
    """Single-subject scenes of a split: images [-1, 1], shape ids, colour targets, texture ids."""
    draw = {"train": scenes.train_scene, "test": scenes.test_scene}[split]
    xs, ys, cs, ts = [], [], [], []
    for i in indices:
        scene = draw(i, two=0.0)
        xs.append(scenes.render(scene)[0])
        y, c, t = labels(scene.subjects[0])
        ys.append(y), cs.append(c), ts.append(t)
    x = torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return x, torch.tensor(ys), torch.stack(cs), torch.tensor(ts)


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """What generated images get wrong that renders don't: blur, noise, a colour cast."""
    b = x.shape[0]
    blur = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    k = torch.rand(b, 1, 1, 1, generator=g)
    x = (1 - k) * x + k * blur
    x = x + 0.06 * torch.rand(b, 1, 1, 1, generator=g) * torch.randn(x.shape, generator=g)
    x = x * (1 + 0.1 * (torch.rand(b, 3, 1, 1, generator=g) - 0.5))
    return x + 0.1 * (torch.rand(b, 3, 1, 1, generator=g) - 0.5)


@torch.no_grad()
def predict(judge: Judge, images: torch.Tensor) -> tuple[list[str], list[str], list[str]]:
    """(shapes, colours, textures) the judge reads in images [B, 3, 64, 64] in [-1, 1]."""
    judge.eval()
    shape, colour, texture = judge(images.float())
    return ([SHAPES[i] for i in shape.argmax(1)], [COLOURS[i] for i in colour.argmax(1)],
            [TEXTURES[i] for i in texture.argmax(1)])


def agreement(read: tuple[list[str], ...], truth: list[scenes.Subject]) -> dict:
    """The share of subjects read right: shape, colour (a two-tone's either), texture."""
    shapes, colours, textures = read
    both = [(t.colour, t.second) if t.texture == "two-tone" else (t.colour,) for t in truth]
    return {"shape_ok": float(np.mean([s == t.shape for s, t in zip(shapes, truth)])),
            "colour_ok": float(np.mean([c in b for c, b in zip(colours, both)])),
            "texture_ok": float(np.mean([x == t.texture for x, t in zip(textures, truth)]))}


@torch.no_grad()
def adherence(pipe, judge: Judge, count: int = 96, steps: int = 20, guidance: float = 5.0,
              batch: int = 48) -> tuple[dict, torch.Tensor]:
    """Text adherence of a toy model (a Pipeline): sample the first `count` held-out
    single-subject captions (batch k from seed k * batch) and give the share of samples whose
    subject the judge reads as the caption's shape, colour and texture (chance: 1/6, 1/8 and
    2/5: solid is 40% of subjects). Returns those figures and the samples, [count, 3, 64, 64]
    in [0, 1]."""
    truth = [scenes.test_scene(i, two=0.0) for i in range(count)]
    prompts = [scenes.caption(t) for t in truth]
    images = torch.cat([pipe.decode(pipe(prompts[i : i + batch], steps=steps, guidance=guidance,
                                         seed=i, output="latent"))
                        for i in range(0, count, batch)])
    read = predict(judge, images * 2 - 1)
    return agreement(read, [t.subjects[0] for t in truth]), images


def accuracy(judge: Judge, indices, split: str = "test") -> dict:
    """The judge's own accuracy on renders of single-subject scenes of a split."""
    x = labelled(indices, split)[0]
    draw = {"train": scenes.train_scene, "test": scenes.test_scene}[split]
    truth = [draw(i, two=0.0).subjects[0] for i in indices]
    return agreement(predict(judge, x), truth)


def load(file: str | Path) -> Judge:
    """A trained judge from a .safetensors file (weights/toy/judge.safetensors) or a .pt file."""
    judge = Judge()
    file = Path(file)
    safe = file.suffix == ".safetensors"
    state = load_file(file) if safe else torch.load(file, weights_only=True)
    judge.load_state_dict(state)
    return judge.eval()


def train(out: Path, count: int, steps: int, seed: int, progress: bool = True) -> dict:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x, ys, cs, ts = labelled(range(count), "train")
    judge = Judge()
    opt = torch.optim.AdamW(judge.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=steps)
    t0 = time.time()
    for _ in tqdm(range(steps), desc="judge", disable=not progress):
        judge.train()
        i = torch.randint(count, (64,), generator=g)
        xb = augment(x[i], g)
        flip = torch.rand(64, generator=g) < 0.5  # shapes are mirror-symmetric
        xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
        shape, colour, texture = judge(xb)
        loss = (F.cross_entropy(shape, ys[i]) + F.cross_entropy(colour, cs[i])
                + F.cross_entropy(texture, ts[i]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    report = accuracy(judge, range(1000))
    report.update(train_scenes=count, steps=steps, seconds=round(time.time() - t0))
    with atomic_write(out) as tmp:
        if out.suffix == ".safetensors":
            save_file({k: v.contiguous() for k, v in judge.state_dict().items()}, tmp)
        else:
            torch.save(judge.state_dict(), tmp)
    return report
