"""Text-guided image editing by Delta Denoising Score (Hertz et al., ICCV 2023, arXiv 2304.07090)
and Contrastive Denoising Score (Nam et al., CVPR 2024, arXiv 2311.18608).

The photo's latent z_src stays fixed; a copy z_trg is optimised. At each iteration a timestep t
and a noise eps are drawn once and shared: both latents are noised to t, the guided noise
prediction is taken for z_src with the source prompt and for z_trg with the target prompt, and
their difference is z_trg's gradient (DDS: what the prompt change asks for, with the bias both
predictions share cancelled). CDS adds a PatchNCE loss (CUT, Park et al. 2020) between the
source's and the target's self-attention features in the decoder: at random patch positions a
target feature must match the source feature at the same place more than the source features at
other places, which keeps the structure of the photo.

Settings are the CDS authors' (HyelinNAM/ContrastiveDenoisingScore): SGD lr 0.1, 200 iterations,
guidance 7.5, t uniform in [50, 950), weights 1 (DDS) and 3 (CUT), 256 patches of sizes 1 and 2,
temperature 0.07, and their DDS step: the surrogate loss 2000 * sum(z_trg * delta) / (h * w) at
512 px (64x64 latents), i.e. a gradient of 2000 / 4096 * delta per latent element.
Departures: that per-element factor is kept at every latent size (theirs shrinks with the area:
a 16x16 toy latent would take steps 16 times as large); the features are each self-attention
layer's output before its output projection (what the sd control interface hands a control;
theirs is after `to_out`, a fixed linear map).

The command line: `python -m recipes cds --help` (recipes/__main__.py); the settings:
recipes/settings.py.
"""

import sys
from dataclasses import replace

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from recipes.settings import CDSSettings as Settings
from sd import ddim
from sd.attention import Control, attention
from sd.images import psnr
from sd.pipeline import Pipeline, rows
from toy import heldout


class SelfFeatures(Control):
    """Keeps, with their graph, the conditional rows' outputs of the decoder's self-attention
    layers: feats[site] = ([rows, h*w, channels], (h, w))."""

    def __init__(self, latent_hw: tuple[int, int]):
        super().__init__()
        self.hw, self.feats = latent_hw, {}

    def __call__(self, q, k, v, site):
        out = attention(q, k, v)
        if site.kind == "self" and site.place == "up":
            cond = out[rows(len(out), self.prompts, "cond")]  # [prompts, heads, h*w, d]
            self.feats[site.name] = (cond.transpose(1, 2).flatten(2), site.shape(self.hw))
        return out


def unit(x: torch.Tensor) -> torch.Tensor:
    """x / |x| along the last axis, finite with a finite gradient at x = 0 (F.normalize's
    gradient there is 1/eps = 1e12)."""
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + 1e-8)


def patch_nce(source: torch.Tensor, target: torch.Tensor, hw: tuple[int, int], s: Settings,
              g: torch.Generator) -> torch.Tensor:
    """CUT's PatchNCE between one layer's features [h*w, C] of source (a constant) and target,
    summed over patch sizes (average pooling), each the mean over up to `s.patches` positions."""
    loss = target.new_zeros(())
    for size in s.patch_sizes:
        if min(hw) < size:
            continue  # a map smaller than the patch has no patch of that size
        a, b = (F.avg_pool2d(x.T.reshape(1, -1, *hw), size).flatten(2)[0].T
                for x in (source.detach(), target))
        a, b = unit(a.float()), unit(b.float())
        keep = torch.randperm(len(a), generator=g)[:s.patches].to(a.device)
        a, b = a[keep], b[keep]
        sim = a @ b.T  # sim[i, j]: source patch i against target patch j
        positive = sim.diagonal()[:, None]
        negative = sim.masked_fill(torch.eye(len(a), dtype=torch.bool, device=a.device), -10.0)
        logits = torch.cat([positive, negative], 1) / s.temperature  # the answer is column 0
        loss = loss + F.cross_entropy(logits, torch.zeros(len(a), dtype=torch.long,
                                                          device=a.device))
    return loss


def dds_step(pipe: Pipeline, z_src: torch.Tensor, z_trg: torch.Tensor, cond: torch.Tensor,
             uncond: torch.Tensor, t: int, noise: torch.Tensor, s: Settings,
             g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One evaluation of both branches: (delta = eps_trg - eps_src, detached; the CUT loss,
    differentiable in z_trg). cond = [source, target] contexts, uncond one row."""
    ctrl = SelfFeatures(z_src.shape[-2:])
    ctrl.prompts = 2
    x = ddim.add_noise(torch.cat([z_src, z_trg]), noise.expand(2, -1, -1, -1), t, pipe.ac)
    out = pipe.guided(x.to(pipe.dtype), t, cond, uncond.expand(2, -1, -1), s.guidance, ctrl)
    eps = ddim.to_eps(out.float(), x, ddim.alpha(pipe.ac, t), pipe.cfg.schedule.prediction)
    features = ctrl.feats.values() if s.w_cut else []  # w_cut 0: DDS alone
    cut = sum((patch_nce(f[0], f[1], hw, s, g) for f, hw in features), z_trg.new_zeros(()))
    return (eps[1:] - eps[:1]).detach(), cut


def edit(pipe: Pipeline, z_src: torch.Tensor, source: str, target: str, s: Settings = Settings(),
         seed: int = 0, progress: bool = False) -> torch.Tensor:
    """The edited latent: z_trg, started at z_src [1, 4, h, w] (scaled), after `s.iterations`
    SGD steps on the DDS gradient plus w_cut times the CUT loss."""
    g = torch.Generator().manual_seed(seed)
    cond = pipe.encode_prompt([source, target]).to(pipe.dtype)
    uncond = pipe.encode_prompt("").to(pipe.dtype)
    z_src = z_src.detach().float()
    z_trg = z_src.clone().requires_grad_(True)
    opt = torch.optim.SGD([z_trg], lr=s.lr)
    for _ in tqdm(range(s.iterations), disable=not progress, desc="editing"):
        t = int(torch.randint(s.t_min, s.t_max, (1,), generator=g))
        noise = torch.randn(z_src.shape, generator=g).to(z_src.device)
        with torch.set_grad_enabled(s.w_cut != 0):  # DDS alone needs no graph
            delta, cut = dds_step(pipe, z_src, z_trg, cond, uncond, t, noise, s, g)
        with torch.enable_grad():  # d/dz_trg of sum(z_trg * delta) is delta: DDS's gradient,
            # applied through a surrogate loss as the official codes do
            loss = s.scale * s.w_dds * (z_trg * delta).sum() + s.w_cut * cut
        opt.zero_grad()
        loss.backward()
        opt.step()
    return z_trg.detach()


def evaluate_toy(pipe: Pipeline, scenes: int = 8, s: Settings = Settings(), seed: int = 0,
                 progress: bool = False) -> tuple[dict[str, float], list[list]]:
    """Recolour the subject of `scenes` held-out one-subject toy scenes with DDS (w_cut 0) and
    CDS, from the same seed. Background PSNR: against the photo, outside the exact subject mask
    dilated by 2 px; subject PSNR: against the exact render of the edited scene, inside the mask
    (the unedited photo's is the floor an edit should rise above). Also, per scene, the images
    [photo, exact edit, DDS, CDS] in [0, 1] for a picture."""
    world, results, shown = heldout.world, {}, []
    for n, scene in enumerate(heldout.scenes(scenes)):
        subject = scene.subjects[0]
        taken = (subject.colour, subject.second, scene.background, scene.second)
        colours = [c for c in world.COLOURS if c not in taken]
        edited = replace(scene, subjects=(replace(subject, colour=colours[n % len(colours)]),))
        photo, masks, _ = world.render(scene)
        photo, ideal = heldout.image(photo), heldout.image(world.render(edited)[0])
        mask = torch.from_numpy(masks[0])
        near = F.max_pool2d(mask[None, None].float(), 5, 1, 2)[0, 0] > 0  # dilated by 2 px
        z = pipe.models.vae.encode(photo.to(pipe.device, pipe.dtype) * 2 - 1).mean
        z = z * pipe.cfg.vae.scaling  # as Pipeline.encode
        shown.append([photo, ideal])
        scores = {"unedited subject": psnr(photo, ideal, where=mask).item()}
        for name, w_cut in (("dds", 0.0), ("cds", s.w_cut)):
            out = edit(pipe, z, world.caption(scene), world.caption(edited),
                       replace(s, w_cut=w_cut), seed + n)
            out = pipe.decode(out.to(pipe.dtype)).float().cpu()
            shown[-1].append(out)
            scores |= {f"{name} background": psnr(out, photo, where=~near).item(),
                       f"{name} subject": psnr(out, ideal, where=mask).item()}
        for k, v in scores.items():
            results.setdefault(k, []).append(v)
        if progress:
            print(f"scene {n + 1}/{scenes}: " + ", ".join(f"{k} {v:.2f}"
                                                         for k, v in scores.items()),
                  file=sys.stderr)
    return {k: sum(v) / len(v) for k, v in results.items()}, shown
