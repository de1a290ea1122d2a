"""What the two trainers share: instance images, their order and random draws, the denoising loss,
the (optionally distributed) run, and checkpoints that an interrupted save never destroys.

DreamBooth (train/dreambooth.py) and textual inversion (train/textual_inversion.py) both teach SD a
concept from a handful of images with the LDM training loss; they differ in which parameters learn
and in the text paired with each image.

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

import argparse
import os
import shutil
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import nn
from tqdm.auto import tqdm

from sd import ddim
from sd.__main__ import DTYPES, grid, resolve, save as save_png
from sd.config import ModelConfig, preset
from sd.pipeline import Pipeline
from sd.weights import FILES, WeightsError, read

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


class UsageError(ValueError):
    """Bad input from the command line: the CLIs print it as one `error:` line."""


# ------------------------------------------------------------------------------------ images

class ImageFolder:
    """A folder's images in memory, uint8 [3, H, W], each resized so min(H, W) == resolution.

    Checked once, up front: unreadable and non-image files are skipped, smaller images upscaled
    (LANCZOS, as sd.pipeline.load_image); both are listed in `warnings` for the CLI to print.
    """

    def __init__(self, folder: str | Path, resolution: int, limit: int | None = None):
        folder = Path(folder)
        if not folder.is_dir():
            raise UsageError(f"{folder}: no such folder; pass the folder that holds the images")
        files = sorted(f for f in folder.iterdir() if f.is_file() and not f.name.startswith("."))
        if not files:
            raise UsageError(f"{folder}: the folder is empty; put the images (jpg, png, webp, "
                             "...) in it")
        self.images: list[torch.Tensor] = []
        self.names: list[str] = []
        self.warnings: list[str] = []
        skipped, small = [], []
        for f in files:
            if limit is not None and len(self.images) == limit:
                break
            try:
                with Image.open(f) as im:
                    im.load()
                    image = ImageOps.exif_transpose(im).convert("RGB")  # phone photos: EXIF turns
            except UnidentifiedImageError:
                skipped.append(f"{f.name} (not an image)")
                continue
            except (OSError, ValueError, SyntaxError) as e:  # PIL raises all three on bad files
                skipped.append(f"{f.name} ({'truncated' if 'truncat' in str(e).lower() else e})")
                continue
            w, h = image.size
            if min(w, h) < resolution:
                small.append(f"{f.name} ({w}x{h})")
            s = resolution / min(w, h)
            size = (max(resolution, round(w * s)), max(resolution, round(h * s)))
            image = image.resize(size, Image.Resampling.LANCZOS)
            self.images.append(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1))
            self.names.append(f.name)
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


def draw(gen: torch.Generator, micro: int, batch: int, run: "Run", parts: int,
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


# ------------------------------------------------------------------------------------ the loss

class Denoiser(nn.Module):
    """Text encoder + UNet as one module, so DDP sees every trained parameter in one forward."""

    def __init__(self, unet: nn.Module, text_encoder: nn.Module | None = None):
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """`text`: token ids [B, 77] if this holds a text encoder, else a context [B, 77, width]."""
        context = text if self.text_encoder is None else self.text_encoder(text)
        return self.unet(x, t, context)  # ctrl=None: the fused attention kernel


def denoising_loss(model: nn.Module, vae: nn.Module, cfg: ModelConfig, ac: torch.Tensor,
                   images: torch.Tensor, text: torch.Tensor, d: Draw) -> torch.Tensor:
    """Per-row MSE of the UNet output against eps (or v for v-models): LDM eq. 3, DDPM eq. 14;
    v = sqrt(a) eps - sqrt(1-a) x0 from Salimans & Ho 2022, as diffusers' train_dreambooth.py."""
    with torch.no_grad():  # the VAE is frozen: its latents are data
        post = vae.encode(images)
        # Posterior.sample() with noise from the Draw, so every rank and a resume agree
        latents = ((post.mean + post.std * d.sample.to(post.mean)) * cfg.vae.scaling).float()
    noise, t = d.noise.to(latents), d.t.to(latents.device)
    target = noise if cfg.schedule.prediction == "epsilon" else ddim.velocity(latents, noise, t, ac)
    out = model(ddim.add_noise(latents, noise, t, ac), t, text)
    return F.mse_loss(out.float(), target, reduction="none").mean(dim=(1, 2, 3))


def lr_at(base: float, step: int, warmup: int) -> float:
    """Constant after a linear warmup (diffusers' constant_with_warmup, one step earlier: step 0
    trains at base / warmup, not 0). Independent of --steps, so a run can be extended."""
    return base * min(1.0, (step + 1) / warmup) if warmup else base


def optimizer_step(opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler, params: list,
                   max_norm: float, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr
    scaler.unscale_(opt)  # clip the true gradients, not the fp16 loss-scaled ones
    if max_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, max_norm)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)


# ------------------------------------------------------------------------------------ the run

@dataclass
class Run:
    """This process's place in the run: rank 0 of 1 unless launched by torchrun."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    quiet: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def say(self, message: str) -> None:
        if self.main:
            tqdm.write(message, file=sys.stderr)

    def wrap(self, model: nn.Module) -> nn.Module:
        """DistributedDataParallel (gradients averaged over ranks) when there are several ranks.
        No buffer sync per forward: no module here has running statistics, and textual
        inversion's frozen rows are a 200 MB buffer that would otherwise be sent every step."""
        if self.world == 1:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, ids, forward_sync_buffers=False)

    def accumulating(self, model: nn.Module, yes: bool):
        """Skip DDP's gradient all-reduce on all but the last micro-batch of a step."""
        return model.no_sync() if yes and self.world > 1 else nullcontext()

    def autocast(self, precision: str):
        """Mixed precision over the fp32 master weights (fp32: a no-op)."""
        dtype = DTYPES[precision]  # "fp32", "bf16", "fp16", as `python -m sd --dtype`
        return torch.autocast(self.device.type, dtype, enabled=dtype != torch.float32)


def start(device: str | None, quiet: bool) -> Run:
    """One process, or this process's rank in a torchrun launch (torchrun passes RANK,
    WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in the environment: its interface).
    NCCL on CUDA, gloo on CPU."""
    cuda = torch.cuda.is_available() and device in (None, "cuda")
    if "RANK" not in os.environ:
        return Run(device=torch.device(device or ("cuda" if cuda else "cpu")), quiet=quiet)
    d = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(d)
    dist.init_process_group("nccl" if cuda else "gloo")
    return Run(dist.get_rank(), dist.get_world_size(), d, quiet)


def finish(run: Run) -> None:
    if run.world > 1:
        dist.barrier()
        dist.destroy_process_group()


def add_arguments(p: argparse.ArgumentParser, lr: float, steps: int, checkpoint_every: int,
                  out: str) -> None:
    """The options both trainers take (the trainer gives its own defaults)."""
    p.add_argument("instance_dir", type=Path, help="folder of images of the concept (jpg, png, "
                   "webp, ...; 3-20 are typical); unreadable files are skipped with a warning, "
                   "images smaller than --resolution are upscaled with a warning")
    p.add_argument("-o", "--out", type=Path, default=Path(out), help=f"output folder ({out})")
    p.add_argument("--model", choices=["auto", "sd2.1-base", "sd2.1", "tiny"], default="auto",
                   help="sd2.1-base: 512 px, epsilon; sd2.1: 768 px, v-prediction; tiny: random "
                        "toy weights, for trying the code on a CPU (default: from the weights)")
    p.add_argument("--weights", type=Path, help="diffusers folder or single-file checkpoint "
                   "(default: weights/sd2.1-base, or weights/MODEL with --model)")
    p.add_argument("--steps", type=int, default=steps, help=f"optimizer steps ({steps})")
    p.add_argument("--lr", type=float, default=lr, help=f"AdamW learning rate ({lr:g}), not "
                   "scaled by the batch size")
    p.add_argument("--batch-size", type=int, default=1, help="images per step and per process; "
                   "the global batch is this x processes (1)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (1)")
    p.add_argument("--warmup-steps", type=int, default=0, help="linear warmup, then constant (0)")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="clip (1.0; 0: off)")
    p.add_argument("--resolution", type=int, help="training image side (default: the model's, "
                   "512 for sd2.1-base, 768 for sd2.1); a multiple of 8")
    p.add_argument("--center-crop", action="store_true", help="crop the centre of each image "
                   "(default: a random square, drawn anew every time an image is used)")
    p.add_argument("--flip", action="store_true", help="random horizontal flips (p = 0.5)")
    p.add_argument("--precision", choices=list(DTYPES), default="fp32",
                   help="autocast dtype over fp32 master weights (fp32); fp16 adds a GradScaler; "
                        "bf16 is the usual choice on a recent GPU")
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing in the "
                   "UNet: much less memory, about a third slower")
    p.add_argument("--checkpoint-every", type=int, default=checkpoint_every, help="save "
                   f"out/checkpoint-N every N steps ({checkpoint_every}) and at the end; 0: at "
                   "the end only")
    p.add_argument("--resume", metavar="CHECKPOINT", help='"latest" (the one out/latest names) '
                   "or a checkpoint folder: continues bit for bit (same options, same -o)")
    p.add_argument("--validate-every", type=int, default=0, metavar="N",
                   help="every N steps write out/validation-N.png, 2 images of "
                        "--validation-prompt (0: never)")
    p.add_argument("--validation-prompt", help="(default: the instance prompt / a photo of TOKEN)")
    p.add_argument("--validation-steps", type=int, default=50, help="DDIM steps (50)")
    p.add_argument("--seed", type=int, default=0, help="data order, crops, noise, timesteps (0)")
    p.add_argument("--device", help="cuda or cpu (default: cuda if present); under torchrun, "
                   "each process takes cuda:LOCAL_RANK")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def load_pipeline(model: str, weights: Path | None, device: torch.device, seed: int) -> Pipeline:
    """fp32 master weights; `--model tiny` without --weights: random tiny weights from `seed`."""
    if model == "tiny" and weights is None:
        with torch.random.fork_rng(devices=[]):  # same weights on every rank, global RNG untouched
            torch.manual_seed(seed)
            return Pipeline.load(preset("tiny"), None, device, torch.float32)
    try:
        cfg, weights, _ = resolve(model, weights)
    except WeightsError as e:
        raise UsageError(str(e)) from None
    return Pipeline.load(cfg, weights, device, torch.float32)


def validate(pipe: Pipeline, prompt: str, file: Path, steps: int, run: Run,
              precision: str) -> None:
    """Two images of `prompt` side by side, from the same seeds every time (so comparable)."""
    with run.autocast(precision):
        images = pipe([prompt, prompt], steps=steps, seed=0)
    save_png(grid([images]), file)  # atomic: written beside, then renamed


def load_modules(folder: Path, **modules: nn.Module) -> None:
    """Load components saved by sd.weights.save (full precision) back into modules, strictly."""
    for name, module in modules.items():
        sd = read(folder / f"{FILES[name]}.safetensors")
        # save() writes the text encoder with transformers' "text_model." prefix
        module.load_state_dict({k.removeprefix("text_model."): v for k, v in sd.items()})


# ------------------------------------------------------------------------------------ checkpoints

def replace_folder(tmp: Path, final: Path) -> None:
    """Move a fully written folder into place (os.replace is atomic on one file system)."""
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():  # a folder cannot replace a non-empty one: swap, then delete
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(out: Path, step: int, write: Callable[[Path], None], state: dict) -> Path:
    """out/checkpoint-N from `write(folder)` and state.pt, then the `latest` pointer.

    Everything goes to checkpoint-N.tmp/ first and is renamed when complete, and `latest` is
    replaced atomically after that: a save killed at any point leaves the previous checkpoint
    and a `latest` that names it. (Against a process crash; no fsync against a power cut.)
    """
    final, tmp = out / f"checkpoint-{step}", out / f"checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # the leftovers of an interrupted save
    tmp.mkdir(parents=True)
    write(tmp)
    torch.save(state, tmp / "state.pt")
    replace_folder(tmp, final)
    (out / "latest.tmp").write_text(final.name + "\n")
    os.replace(out / "latest.tmp", out / "latest")
    return final


def find_checkpoint(out: Path, resume: str) -> Path:
    """--resume: a checkpoint folder, or "latest" (the one out/latest names)."""
    if resume == "latest":
        pointer = out / "latest"
        if not pointer.is_file():
            raise UsageError(f"--resume latest: no checkpoint in {out} (no {pointer}); pass the "
                             "same -o as the interrupted run, or a checkpoint folder")
        folder = out / pointer.read_text().strip()
    else:
        folder = Path(resume)
    if not (folder / "state.pt").is_file():
        raise UsageError(f"--resume: {folder} is not a checkpoint (no state.pt in it)")
    return folder


def training_state(step: int, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                   gen: torch.Generator) -> dict:
    """Everything besides the weights that a bit-exact resume needs; tensors and plain types
    only, so it loads with torch.load(weights_only=True)."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {"step": step, "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
            "rng": {"data": gen.get_state(), "torch": torch.get_rng_state(), "cuda": cuda}}


def restore(folder: Path, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
            gen: torch.Generator) -> int:
    """Load a training_state() from a checkpoint folder; returns its step."""
    state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
    opt.load_state_dict(state["optimizer"])
    if state["scaler"]:  # empty when saved without fp16
        scaler.load_state_dict(state["scaler"])
    gen.set_state(state["rng"]["data"])
    torch.set_rng_state(state["rng"]["torch"])
    if torch.cuda.is_available() and len(state["rng"]["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state["step"]
