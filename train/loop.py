"""The one training loop, and what it runs on: the (optionally distributed) run, the denoising
loss, the learning-rate schedule and the optimizer step.

DreamBooth (train/dreambooth.py) and textual inversion (train/textual_inversion.py) both teach
SD a concept from a handful of images with the LDM training loss; they differ only in which
parameters learn, the text paired with each image, and what they export. The toy model's pretraining
(toy/pretrain.py) trains a VAE, then text encoder + UNet, from scratch. `fit` is what they
share: gradient accumulation, autocast and the fp16 GradScaler, clipping, AdamW with a constant or
cosine schedule, an optional EMA, checkpoints and resuming, validation images, an evaluation
callback with its CSV log, and the DDP barriers; each trainer hands it a loss function and its own
checkpoint contents.
"""

import copy
import math
import os
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from sd import ddim
from sd.config import RANDOM, ModelConfig, preset
from sd.images import grid, save_image
from sd.pipeline import DTYPES, Pipeline, pick_device
from sd.weights import WeightsError, resolve
from train import UsageError, checkpoints
from train.dataset import Draw
from train.settings import TrainerSettings


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
    try:
        chosen = pick_device(device)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if "RANK" not in os.environ:
        return Run(device=chosen, quiet=quiet)
    cuda = chosen.type == "cuda"
    d = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(d)
    dist.init_process_group("nccl" if cuda else "gloo")
    return Run(dist.get_rank(), dist.get_world_size(), d, quiet)


def finish(run: Run) -> None:
    if run.world > 1:
        dist.barrier()
        dist.destroy_process_group()


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


@dataclass
class Settings:
    """How `fit` optimises: from a trainer's settings (train/settings.py) or given directly."""

    out: Path  # checkpoints, validation images and log.csv go here
    steps: int
    lr: float
    grad_accum: int = 1
    warmup_steps: int = 0
    schedule: str = "constant"  # after the warmup: "constant", or "cosine" down to final_lr x lr
    final_lr: float = 0.02
    # AdamW's; 1e-2, betas (0.9, 0.999) and eps 1e-8 as diffusers' example trainers
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0  # 0: no clipping
    precision: str = "fp32"  # autocast dtype over fp32 master weights; fp16 adds a GradScaler
    checkpoint_every: int = 0  # and at the end
    keep: int = 0  # the newest checkpoints kept (0: all)
    validate_every: int = 0  # preview and evaluate (0: never; evaluate also at the end)
    resume: str | None = None  # "latest" or a checkpoint folder
    seed: int = 0  # of the data generator the loss draws from
    quiet: bool = False

    # What a resumed run must share with the run it resumes to continue it bit for bit (steps
    # may grow: a longer run of a constant schedule; the cosine one says so through final_lr).
    TRAJECTORY = ("lr", "grad_accum", "warmup_steps", "schedule", "final_lr", "weight_decay",
                  "max_grad_norm", "precision", "seed")

    def trajectory(self) -> dict:
        return {name: getattr(self, name) for name in self.TRAJECTORY}

    @classmethod
    def of(cls, trainer: TrainerSettings) -> "Settings":
        """From a trainer's settings; what it does not set (the schedule, weight decay) keeps
        its default."""
        return cls(**{f.name: getattr(trainer, f.name) for f in fields(cls)
                      if hasattr(trainer, f.name)})


def lr_at(s: Settings, step: int) -> float:
    """Linear warmup (step 0 trains at lr / warmup, not 0), then constant (diffusers'
    constant_with_warmup; independent of --steps, so a run can be extended) or a half cosine
    from lr to final_lr x lr at s.steps (Loshchilov & Hutter 2017, SGDR eq. 5, one cycle)."""
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    if s.schedule == "constant":
        return s.lr
    assert s.schedule == "cosine", f"unknown schedule {s.schedule!r}"
    p = (step - s.warmup_steps) / max(1, s.steps - s.warmup_steps)
    return s.lr * (s.final_lr + (1 - s.final_lr) * 0.5 * (1 + math.cos(math.pi * p)))


class EMA:
    """An exponential moving average of a model's parameters (the copy one samples from) with
    LDM's warm-up of the decay, so that early on the average follows the model: min(decay,
    (1 + n) / (10 + n)) at step n from 0 (CompVis/latent-diffusion ldm/modules/ema.py LitEma,
    which counts its updates from 1)."""

    FILE = "ema.safetensors"  # in each checkpoint folder

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """After optimizer step number `step` (from 0)."""
        d = min(self.decay, (1 + step) / (10 + step))
        for e, p in zip(self.module.parameters(), model.parameters()):
            e.lerp_(p, 1 - d)

    def save(self, folder: Path) -> None:
        sd = {k: v.detach().cpu().contiguous() for k, v in self.module.state_dict().items()}
        save_file(sd, folder / self.FILE)

    def load(self, folder: Path) -> None:
        self.module.load_state_dict(load_file(folder / self.FILE))


def fit(run: Run, s: Settings, model: nn.Module, params: list[nn.Parameter],
        loss: Callable[[nn.Module, torch.Generator, int], torch.Tensor],
        write: Callable[[Path], None], load: Callable[[Path], None],
        preview: Callable[[Path], None] | None = None, desc: str = "training",
        ema: EMA | None = None,
        evaluate: Callable[[nn.Module, int], dict] | None = None) -> list[float]:
    """AdamW on `params` for s.steps steps of s.grad_accum micro-batches; each step's mean loss.

    loss(model, gen, micro): the loss of micro-batch number `micro`, whose random numbers come
    from `gen` (the data generator checkpoints save); `model` is DDP-wrapped when distributed.
    write(folder), load(folder): the trained weights into and out of a checkpoint folder.
    preview(file): writes a validation image, every s.validate_every steps.
    ema: updated after every step, saved in checkpoints; ema.module is the averaged model.
    evaluate(model, step): metrics of the model (ema.module if any) every s.validate_every
    steps and at the end, appended with the step's loss to s.out/log.csv.
    """
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    scaler = torch.amp.GradScaler(run.device.type, enabled=s.precision == "fp16")
    gen = torch.Generator().manual_seed(s.seed)
    first, seconds = resume(run, s, load, ema, opt, scaler, gen)
    log = s.out / "log.csv"
    if evaluate is not None and run.main:
        checkpoints.cut_log(log, first)
    ddp = run.wrap(model)
    losses = []
    bar = tqdm(range(first, s.steps), initial=first, total=s.steps, desc=desc,
               disable=s.quiet or not run.main)
    start = time.monotonic() - seconds  # training time, summed over resumes
    for step in bar:
        total = 0.0
        for a in range(s.grad_accum):
            with run.accumulating(ddp, a < s.grad_accum - 1):
                with run.autocast(s.precision):
                    value = loss(ddp, gen, step * s.grad_accum + a)
                scaler.scale(value / s.grad_accum).backward()
            total += value.item() / s.grad_accum
        optimizer_step(opt, scaler, params, s.max_grad_norm, lr_at(s, step))
        if ema is not None:
            ema.update(model, step)
        losses.append(total)
        bar.set_postfix(loss=f"{total:.4f}")
        done = step + 1
        keep = done == s.steps or (s.checkpoint_every and done % s.checkpoint_every == 0)
        due = s.validate_every and done % s.validate_every == 0
        look, measure = preview and due, evaluate and (due or done == s.steps)
        if run.main and measure:  # before the checkpoint: a crash between them loses no row
            row = {"step": done, "seconds": round(time.monotonic() - start), "loss": total}
            log_metrics(run, log, row | evaluate(model if ema is None else ema.module, done))
        if run.main and keep:
            state = checkpoints.training_state(done, opt, scaler, gen, time.monotonic() - start,
                                               s.trajectory())
            checkpoints.save(s.out, done, partial(write_all, write, ema), state, s.keep)
        if run.main and look:
            with run.autocast(s.precision):
                preview(s.out / f"validation-{done}.png")
        if keep or look or measure:
            run.barrier()  # the other ranks wait for rank 0's checkpoint or validation
    return losses


def write_all(write: Callable[[Path], None], ema: "EMA | None", folder: Path) -> None:
    """A checkpoint's weights: the trainer's, and the EMA's if any."""
    write(folder)
    if ema is not None:
        ema.save(folder)


def log_metrics(run: Run, log: Path, row: dict) -> None:
    """One row of log.csv, also said on the console."""
    checkpoints.log_row(log, row)
    run.say(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in row.items()))


def resume(run: Run, s: Settings, load: Callable[[Path], None], ema: "EMA | None",
           opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
           gen: torch.Generator) -> tuple[int, float]:
    """With s.resume, the checkpoint's weights, EMA, optimizer, scaler and random states put
    back: (its step, its training seconds); else (0, 0.0). A UsageError for a damaged one."""
    if not s.resume:
        return 0, 0.0
    folder = checkpoints.find(s.out, s.resume)
    try:
        load(folder)
        if ema is not None:
            ema.load(folder)
    except WeightsError as e:
        raise UsageError(f"--resume: {folder}'s weights cannot be read ({e}); resume from "
                         f"an earlier checkpoint in {s.out}, or start afresh") from None
    first, seconds = checkpoints.restore(folder, opt, scaler, gen, s.trajectory())
    run.say(f"resumed from {folder} at step {first}")
    return first, seconds


def begin(args: TrainerSettings) -> tuple[Run, ModelConfig, int]:
    """A trainer's start, before anything loads: the run (--device checked), the preset (absent
    weights: how to download them), and the side of the training images."""
    run = start(args.device, args.quiet)
    cfg = resolve(args.model, args.weights)[0]
    side = args.resolution or cfg.resolution
    if side % cfg.vae.factor:
        raise UsageError(f"--resolution must be a multiple of {cfg.vae.factor}, got {side}")
    return run, cfg, side


def trainer_pipeline(args: TrainerSettings, run: Run, cfg: ModelConfig) -> Pipeline:
    """load_pipeline for a trainer, announced with a `model:` line as every CLI does."""
    run.say(f"model: {cfg.name} ({cfg.schedule.prediction}) on {run.device}, fp32 weights")
    return load_pipeline(args.model, args.weights, run.device, args.seed)


def load_pipeline(model: str, weights: Path | None, device: torch.device, seed: int) -> Pipeline:
    """fp32 master weights; `--model tiny` (or sd1.5-tiny) without --weights: random weights
    from `seed`."""
    if model in RANDOM and weights is None:
        with torch.random.fork_rng(devices=[]):  # same weights on every rank, global RNG untouched
            torch.manual_seed(seed)
            return Pipeline.load(preset(model), None, device, torch.float32)
    cfg, weights, _ = resolve(model, weights)
    return Pipeline.load(cfg, weights, device, torch.float32)


def validate(pipe: Pipeline, prompt: str, file: Path, steps: int) -> None:
    """Two images of `prompt` side by side, from the same seeds every time (so comparable)."""
    images = pipe([prompt, prompt], steps=steps, seed=0)
    save_image(grid([images]), file)  # atomic: written beside, then renamed
