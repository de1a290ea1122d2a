"""Pretraining of the toy model (sd.config.TOY) on the toy world: the VAE, then text encoder + UNet.

    python -m toy pretrain vae     --run out/toyrun         # stage 1 (resumes if interrupted)
    python -m toy pretrain decoder --run out/toyrun         # stage 1b: the decoder alone
    python -m toy pretrain unet    --run out/toyrun         # stage 2, on stage 1's encoder
    python -m toy pretrain unet-more --run out/toyrun       # stage 2b: a second rate cycle
    python -m toy pretrain export  --run out/toyrun -o weights/toy

Each stage is (a model, its loss, an evaluation) run by `train.loop.fit`, the trainers' shared
loop: AdamW with warmup and cosine decay, an EMA for the UNet stage, checkpoints in
<run>/<stage>/checkpoint-N/ (rerunning a stage resumes from the newest, bit for bit) and the
evaluations in <run>/<stage>/log.csv. Stage 1b leaves the encoder, and so the latents stage 2
learns, as they are: it may run before or after stage 2. Recipe choices and the measurements
behind them: weights/toy/README.md.
"""

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from sd import ddim
from sd.clip import TextEncoder
from sd.config import TOY, ModelConfig
from sd.files import atomic_write
from sd.images import to_pil
from sd.pipeline import Pipeline
from sd.tokenizer import Tokenizer
from sd.unet import UNet
from sd.vae import VAE
from sd.weights import Models
from toy import data as toydata
from toy import judge as judgelib
from train import UsageError, checkpoints
from train.checkpoints import save_weights
from train.loop import EMA, Run, Settings, fit

# ------------------------------------------------------------------------------- the stages

def stage_settings(out: Path, r: dict, seed: int, progress: bool) -> Settings:
    """A recipe as fit's settings: cosine decay to 2% (final_lr), no clipping; checkpoint and
    evaluate every r["every"] steps; rerunning a stage resumes from its newest checkpoint."""
    return Settings(out, r["steps"], r["lr"], warmup_steps=r["warmup"], schedule="cosine",
                    weight_decay=r["weight_decay"], max_grad_norm=0.0,
                    checkpoint_every=r["every"], keep=2, validate_every=r["every"],
                    resume="latest" if (out / "latest").is_file() else None, seed=seed,
                    quiet=not progress)


def stage(s: Settings, model: nn.Module, loss: Callable[[nn.Module, torch.Generator, int], Tensor],
          evaluate: Callable[[nn.Module, int], dict], ema: EMA | None = None) -> nn.Module:
    """Train every parameter of `model` (one process); the EMA model if any, else the model."""
    file = "model.safetensors"

    def write(folder: Path) -> None:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / file)

    fit(Run(quiet=s.quiet), s, model, [p for p in model.parameters() if p.requires_grad], loss,
        write, lambda folder: model.load_state_dict(load_file(folder / file)),
        desc=s.out.name, ema=ema, evaluate=evaluate)
    return model if ema is None else ema.module


def ema_weights(out: Path) -> dict:
    """The EMA weights of a stage's newest checkpoint."""
    if (out / "latest").is_file():
        return load_file(checkpoints.find(out, "latest") / EMA.FILE)
    raise UsageError(f"no checkpoint in {out}: train it first (python -m toy pretrain unet)")


# ---------------------------------------------------------------------------------- the VAE

def vae_loss(vae: VAE, x: torch.Tensor, g: torch.Generator, kl_weight: float) -> torch.Tensor:
    """L1 + MSE reconstruction of a sampled latent, plus a KL pull towards N(0, 1) (LDM's
    AutoencoderKL loss without its GAN and LPIPS terms: flat-colour scenes need neither)."""
    post = vae.encode(x)
    kl = 0.5 * (post.mean**2 + post.std**2 - 1 - 2 * post.std.log()).sum((1, 2, 3)).mean()
    return reconstruction_loss(vae.decode(post.sample(g)), x) + kl_weight * kl


def reconstruction_loss(rec: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (rec - x).abs().mean() + ((rec - x) ** 2).mean()


@torch.no_grad()
def vae_psnr(vae: VAE, images: torch.Tensor, batch: int = 64) -> tuple[float, float]:
    """(mean PSNR in dB of posterior-mean reconstructions of full scenes, latent std)."""
    vae.eval()
    zs = torch.cat([vae.encode(images[i : i + batch]).mean for i in range(0, len(images), batch)])
    rec = torch.cat([vae.decode(zs[i : i + batch]) for i in range(0, len(zs), batch)])
    vae.train()
    return toydata.psnr(rec, images).mean().item(), zs.std().item()


def vae_evaluation(run_dir: Path, progress: bool) -> tuple[torch.Tensor, Callable]:
    """(256 held-out scenes, the VAE stages' evaluation: PSNR on them and on 256 of the second
    renderer's, latent std)."""
    test = toydata.to_tensor(toydata.pool("test", 256, run_dir, progress)[0])
    elsewhere = toydata.to_tensor(toydata.pool("outside", 256, run_dir, progress)[0])

    def evaluate(model: VAE, step: int) -> dict:
        psnr, std = vae_psnr(model, test)
        return {"psnr": psnr, "latent_std": std, "psnr_outside": vae_psnr(model, elsewhere)[0]}

    return test, evaluate


# ---------------------------------------------------------------------------------- the UNet

@torch.no_grad()
def encode_pool(vae: VAE, images: np.ndarray, batch: int = 128) -> tuple[torch.Tensor, ...]:
    """Posterior (mean, std) of every image: the UNet stage samples latents from these."""
    vae.eval()
    means, stds = [], []
    for i in range(0, len(images), batch):
        post = vae.encode(toydata.to_tensor(images[i : i + batch]))
        means.append(post.mean.half())
        stds.append(post.std.half())
    return torch.cat(means), torch.cat(stds)


def token_ids(captions: list[str], cfg: ModelConfig) -> torch.Tensor:
    tok = Tokenizer(cfg.text.max_len, cfg.text.pad_id)
    return torch.cat([tok(captions[i : i + 512]) for i in range(0, len(captions), 512)])


def diffusion_loss(model: nn.Module, batch: dict, g: torch.Generator, cfg: ModelConfig,
                   drop: float, snr_gamma: float | None) -> torch.Tensor:
    """The LDM training loss: noise a latent to a random timestep, predict the noise (or v).

    Captions are replaced by the empty prompt with probability `drop`, so the model also learns
    the unconditional prediction that classifier-free guidance needs (Ho & Salimans 2022). With
    `snr_gamma`, each timestep's loss is weighted by min(SNR, gamma) / SNR (Min-SNR, Hang et al.
    2023, eq. 9 for epsilon), which stops the easy low-noise steps from dominating the gradient.
    """
    ac = batch["ac"]
    z = (batch["mean"] + batch["std"] * torch.randn(batch["mean"].shape, generator=g))
    z = z.float() * cfg.vae.scaling
    b = z.shape[0]
    ids = torch.where((torch.rand(b, generator=g) < drop)[:, None], batch["empty"], batch["ids"])
    t = torch.randint(cfg.schedule.train_steps, (b,), generator=g)
    noise = torch.randn(z.shape, generator=g)
    x = ddim.add_noise(z, noise, t, ac)
    out = model.unet(x, t, model.text_encoder(ids))
    v = cfg.schedule.prediction == "v"
    target = ddim.velocity(z, noise, t, ac) if v else noise
    per = ((out.float() - target) ** 2).mean((1, 2, 3))
    if snr_gamma is not None:
        snr = ac[t] / (1 - ac[t])
        per = per * (snr.clamp(max=snr_gamma) / (snr + 1 if v else snr))
    return per.mean()


def latent_batch(data: dict, size: int, g: torch.Generator) -> dict:
    i = torch.randint(len(data["mean"]), (size,), generator=g)
    # No flips: the VAE pads asymmetrically, so a mirrored latent is not the mirrored image's.
    return {"mean": data["mean"][i], "std": data["std"][i], "ids": data["ids"][i],
            "empty": data["empty"],
            "ac": data["ac"]}


def toy_config(scaling: float) -> ModelConfig:
    return replace(TOY, vae=replace(TOY.vae, scaling=scaling))


VAE_RECIPE = dict(steps=6000, lr=3e-3, batch=32, crop=32, kl=1e-5, pool=8192, warmup=100,
                  weight_decay=0.0, every=250, widen=True)


def train_vae(run_dir: Path, seed: int, progress: bool) -> VAE:
    r = VAE_RECIPE
    s = stage_settings(run_dir / "vae", r, seed, progress)  # first: it refuses an old run
    torch.manual_seed(seed)
    images, _ = toydata.pool("train", r["pool"], run_dir, progress)
    test, evaluate = vae_evaluation(run_dir, progress)
    vae = VAE(TOY.vae)

    def loss(model: VAE, g: torch.Generator, micro: int) -> torch.Tensor:
        x = toydata.crops(images, r["batch"], r["crop"], g, r["widen"])
        return vae_loss(model, x, g, r["kl"])

    stage(s, vae, loss, evaluate)
    finish_vae(run_dir, vae, images, test)
    return vae


@torch.no_grad()
def finish_vae(run_dir: Path, vae: VAE, images: np.ndarray, test: torch.Tensor) -> dict:
    """Save the VAE and its latent scale: 1 / std of sampled latents of training scenes, so the
    UNet sees unit-variance latents (as SD's 0.18215; Rombach et al. 2022, sec. 4.3.2)."""
    mean, std = encode_pool(vae, images[:2048])
    g = torch.Generator().manual_seed(0)
    z = mean.float() + std.float() * torch.randn(mean.shape, generator=g)
    psnr, _ = vae_psnr(vae, test)
    stats = {"latent_std": z.std().item(), "scaling": 1 / z.std().item(), "psnr_test": psnr}
    # vae.pt last: it is make's stamp for the stage, so it must not exist without vae.json.
    with atomic_write(run_dir / "vae.json") as tmp:
        tmp.write_text(json.dumps(stats, indent=1))
    with atomic_write(run_dir / "vae.pt") as tmp:
        torch.save(vae.state_dict(), tmp)
    return stats


# Stage 1b: the decoder alone on whole scenes, the encoder frozen. The latent space, and so the
# UNet trained on it, is unchanged: Stability's ft-MSE VAE fine-tuned SD's decoder the same way.
DECODER_RECIPE = dict(steps=3000, lr=5e-4, batch=16, crop=64, pool=8192, warmup=100,
                      weight_decay=0.0, every=250, widen=True)


def train_decoder(run_dir: Path, seed: int, progress: bool) -> VAE:
    need_vae(run_dir)
    r = DECODER_RECIPE
    s = stage_settings(run_dir / "decoder", r, seed, progress)
    torch.manual_seed(seed)
    images, _ = toydata.pool("train", r["pool"], run_dir, progress)
    _, evaluate = vae_evaluation(run_dir, progress)
    vae = VAE(TOY.vae)
    vae.load_state_dict(torch.load(run_dir / "vae.pt"))
    vae.encoder.requires_grad_(False)
    vae.quant_conv.requires_grad_(False)

    def loss(model: VAE, g: torch.Generator, micro: int) -> torch.Tensor:
        x = toydata.crops(images, r["batch"], r["crop"], g, r["widen"])
        with torch.no_grad():
            z = model.encode(x).sample(g)
        return reconstruction_loss(model.decode(z), x)

    stage(s, vae, loss, evaluate)
    with atomic_write(run_dir / "decoder.pt") as tmp:
        torch.save(vae.state_dict(), tmp)
    return vae


def need_vae(run_dir: Path) -> None:
    if not ((run_dir / "vae.json").is_file() and (run_dir / "vae.pt").is_file()):
        raise UsageError(f"no trained VAE in {run_dir}: python -m toy pretrain vae --run ...")


class Stage2(nn.Module):
    """The parts that learn in stage 2, under the names sd.weights.Models uses."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.text_encoder = TextEncoder(cfg.text)
        self.unet = UNet(cfg.unet)


UNET_RECIPE = dict(steps=10000, lr=1e-3, batch=32, drop=0.1, snr_gamma=5.0, ema=0.999,
                   warmup=500, pool=20000, weight_decay=0.01, every=250)
# Stage 2b: a second cosine cycle (a warm restart, Loshchilov & Hutter 2017) from stage 2's EMA
# weights, with a fresh optimiser: shape adherence was still rising when stage 2's rate decayed.
UNET_MORE = {**UNET_RECIPE, "steps": 6000, "lr": 5e-4, "warmup": 200}


def latent_data(run_dir: Path, vae: VAE, cfg: ModelConfig, count: int, split: str,
                progress: bool) -> dict:
    """Posterior moments and token ids of the first `count` scenes of a split (cached)."""
    file = run_dir / f"latents-{split}-{count}.pt"
    if file.exists():
        return torch.load(file)
    images, captions = toydata.pool(split, count, run_dir, progress)
    mean, std = encode_pool(vae, images)
    data = {"mean": mean, "std": std, "ids": token_ids(captions, cfg), "captions": captions}
    with atomic_write(file) as tmp:
        torch.save(data, tmp)
    return data


@torch.no_grad()
def text_gain(model: Stage2, data: dict, cfg: ModelConfig, ac: torch.Tensor) -> float:
    """How much the caption lowers the denoising loss on a fixed held-out batch (same latents,
    noise and timesteps with the caption and with the empty prompt): 0 means text is ignored."""
    model.eval()
    g = torch.Generator().manual_seed(1234)
    batch = {k: v[:128] if torch.is_tensor(v) and k != "empty" else v for k, v in data.items()}
    losses = []
    for drop in (0.0, 1.0):
        g.manual_seed(1234)
        losses.append(diffusion_loss(model, {**batch, "ac": ac}, g, cfg, drop, None).item())
    model.train()
    return losses[1] - losses[0]


@torch.no_grad()
def adherence(model: Stage2, vae: VAE, cfg: ModelConfig, judge, grid_file: Path) -> dict:
    """The judge's reading of samples of held-out captions (toy.judge.adherence), and a grid
    of the first 48 of them (4 rows of 12) saved to grid_file."""
    model.eval()
    figures, images = judgelib.adherence(Pipeline(Models(model.text_encoder, vae, model.unet),
                                                  cfg), judge)
    rows = [torch.cat(list(images[r * 12 : (r + 1) * 12]), dim=2) for r in range(4)]
    to_pil(torch.cat(rows, dim=1)[None])[0].save(grid_file)
    model.train()
    return figures


@dataclass
class MoreThreads:
    """`threads` torch threads once `file` exists. make toy runs two one-thread jobs; when the
    other job slot's chain (judge, identity encoder, decoder) writes its last file, the UNet
    stage, the long chain, takes the core it frees (two threads pay only on a free core:
    BENCHMARKS.md, python -m bench.toy_train)."""

    threads: int
    file: Path

    def claim(self) -> None:
        if torch.get_num_threads() < self.threads and self.file.exists():
            torch.set_num_threads(self.threads)


def train_unet(run_dir: Path, seed: int, progress: bool, recipe: dict | None = None,
               folder: str = "unet", init: dict | None = None,
               more: MoreThreads | None = None) -> Stage2:
    """Stage 2 into <run>/<folder>: text encoder and UNet from scratch, or from `init` (a Stage2
    state dict; stage 2b starts from stage 2's EMA weights); `more` looked at every
    checkpoint's worth of steps."""
    r = {**UNET_RECIPE, **(recipe or {})}
    need_vae(run_dir)
    s = stage_settings(run_dir / folder, r, seed, progress)  # first: it refuses an old run
    torch.manual_seed(seed)
    vae = VAE(TOY.vae)
    vae.load_state_dict(torch.load(run_dir / "vae.pt"))
    vae.eval().requires_grad_(False)
    stats = json.loads((run_dir / "vae.json").read_text())
    cfg = toy_config(stats["scaling"])
    ac = ddim.alphas_cumprod(cfg.schedule)
    data = latent_data(run_dir, vae, cfg, r["pool"], "train", progress)
    held = latent_data(run_dir, vae, cfg, 256, "test", progress)
    empty = token_ids([""], cfg)
    data["empty"], held["empty"] = empty, empty

    def loss(model: Stage2, g: torch.Generator, micro: int) -> torch.Tensor:
        if more is not None and micro % r["every"] == 0:
            more.claim()
        return diffusion_loss(model, latent_batch({**data, "ac": ac},
                              r["batch"], g), g, cfg, r["drop"], r["snr_gamma"])

    def evaluate(model: Stage2, step: int) -> dict:
        # The same columns on every row of the log; NaN where the judge did not run.
        row = {"text_gain": text_gain(model, held, cfg, ac), "shape_ok": float("nan"),
               "colour_ok": float("nan"), "texture_ok": float("nan")}
        if (run_dir / "judge.pt").exists() and step % (4 * r["every"]) == 0:
            judge = judgelib.load(run_dir / "judge.pt")  # toy.judge may finish after we start
            row.update(adherence(model, vae, cfg, judge, grid_file=s.out / f"grid-{step}.png"))
        return row

    model = Stage2(cfg)
    if init is not None:
        model.load_state_dict(init)
    return stage(s, model, loss, evaluate, EMA(model, r["ema"]))


def train_unet_more(run_dir: Path, seed: int, progress: bool,
                    more: MoreThreads | None = None) -> Stage2:
    """Stage 2b: UNET_MORE from stage 2's EMA weights, into <run>/unet-more."""
    done = run_dir / "unet" / f"checkpoint-{UNET_RECIPE['steps']}"
    if not (done / EMA.FILE).is_file():
        raise UsageError(f"stage 2 has not finished in {run_dir} (no {done}): "
                         "python -m toy pretrain unet --run ... first")
    init = load_file(done / EMA.FILE)
    return train_unet(run_dir, seed, progress, UNET_MORE, "unet-more", init, more)


def final_unet(run_dir: Path) -> Path:
    """The stage whose EMA weights are the model: 2b where it ran, else 2."""
    more = run_dir / "unet-more"
    return more if (more / "latest").is_file() else run_dir / "unet"


def export(run_dir: Path, out: Path) -> dict:
    """The trained model as fp16 safetensors in the diffusers layout (save_weights)."""
    need_vae(run_dir)
    stats = json.loads((run_dir / "vae.json").read_text())
    cfg = toy_config(stats["scaling"])
    vae = VAE(cfg.vae)  # with the fine-tuned decoder where stage 1b ran
    tuned = run_dir / "decoder.pt"
    vae.load_state_dict(torch.load(tuned if tuned.is_file() else run_dir / "vae.pt"))
    model = Stage2(cfg)
    model.load_state_dict(ema_weights(final_unet(run_dir)))
    save_weights(out, cfg, fp16=True, unet=model.unet, vae=vae, text_encoder=model.text_encoder)
    (out / "MODEL").write_text("preset=toy\n")
    # The measuring instruments trained beside the model (toy.judge, toy.identity) ship with it.
    if (run_dir / "judge.pt").exists():
        with atomic_write(out / "judge.safetensors") as tmp:
            save_file(torch.load(run_dir / "judge.pt", weights_only=True), tmp)
    if (run_dir / "identity.safetensors").exists():
        with atomic_write(out / "identity.safetensors") as tmp:
            shutil.copyfile(run_dir / "identity.safetensors", tmp)
    files = [f for f in out.rglob("*") if f.is_file()]
    return {"folder": str(out), "bytes": sum(f.stat().st_size for f in files)}

