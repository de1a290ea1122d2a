"""Pretraining of the toy model (sd.config.TOY) on the toy world: the VAE, then text encoder + UNet.

    python -m train.pretrain vae  --run /work/toyrun            # stage 1 (resumes if interrupted)
    python -m train.pretrain unet --run /work/toyrun            # stage 2, on stage 1's VAE
    python -m train.pretrain export --run /work/toyrun -o weights/toy

Each stage is (a loss function, its parameters, what to save) run by `train.toyloop.run`, which
checkpoints atomically and resumes bit for bit from (step, model, optimiser, EMA, generators).
Recipe choices and the measurements behind them: weights/toy/README.md.
"""

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sd import ddim
from sd.config import TOY, ModelConfig
from sd.tokenizer import Tokenizer
from sd.vae import VAE
from train import toydata, toyloop


# ---------------------------------------------------------------------------------- the VAE

def vae_loss(vae: VAE, x: torch.Tensor, g: torch.Generator, kl_weight: float) -> tuple:
    """L1 + MSE reconstruction of a sampled latent, plus a KL pull towards N(0, 1) (LDM's
    AutoencoderKL loss without its GAN and LPIPS terms: flat-colour scenes need neither)."""
    post = vae.encode(x)
    rec = vae.decode(post.sample(g))
    kl = 0.5 * (post.mean**2 + post.std**2 - 1 - 2 * post.std.log()).sum((1, 2, 3)).mean()
    loss = (rec - x).abs().mean() + ((rec - x) ** 2).mean() + kl_weight * kl
    return loss, {"kl": kl.item()}


@torch.no_grad()
def vae_psnr(vae: VAE, images: torch.Tensor, batch: int = 64) -> tuple[float, float]:
    """(mean PSNR in dB of posterior-mean reconstructions of full scenes, latent std)."""
    vae.eval()
    zs = torch.cat([vae.encode(images[i : i + batch]).mean for i in range(0, len(images), batch)])
    rec = torch.cat([vae.decode(zs[i : i + batch]) for i in range(0, len(zs), batch)])
    vae.train()
    return toydata.psnr(rec, images).mean().item(), zs.std().item()


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


def diffusion_loss(models: dict, batch: dict, g: torch.Generator, cfg: ModelConfig,
                   drop: float, snr_gamma: float | None) -> tuple:
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
    out = models["unet"](x, t, models["text_encoder"](ids))
    v = cfg.schedule.prediction == "v"
    target = ddim.velocity(z, noise, t, ac) if v else noise
    per = ((out.float() - target) ** 2).mean((1, 2, 3))
    if snr_gamma is not None:
        snr = ac[t] / (1 - ac[t])
        per = per * (snr.clamp(max=snr_gamma) / (snr + 1 if v else snr))
    return per.mean(), {}


def latent_batch(data: dict, size: int, g: torch.Generator) -> dict:
    i = torch.randint(len(data["mean"]), (size,), generator=g)
    flip = torch.rand(size, generator=g) < 0.5  # a mirrored scene is a scene with that caption
    mean = torch.where(flip[:, None, None, None], data["mean"][i].flip(-1), data["mean"][i])
    std = torch.where(flip[:, None, None, None], data["std"][i].flip(-1), data["std"][i])
    return {"mean": mean, "std": std, "ids": data["ids"][i], "empty": data["empty"],
            "ac": data["ac"]}


def toy_config(scaling: float) -> ModelConfig:
    return replace(TOY, vae=replace(TOY.vae, scaling=scaling))


def save_scaling(file: Path, std: float) -> None:
    file.write_text(json.dumps({"latent_std": std, "scaling": 1 / std}))


VAE_RECIPE = dict(steps=4000, lr=3e-3, batch=32, crop=32, kl=1e-5, pool=8192)


def train_vae(run_dir: Path, seed: int, progress: bool) -> VAE:
    r = VAE_RECIPE
    torch.manual_seed(seed)
    images, _ = toydata.pool("train", r["pool"], run_dir, progress)
    test = toydata.to_tensor(toydata.pool("test", 256, run_dir, progress)[0])
    vae = VAE(TOY.vae)

    def loss(model, g):
        return vae_loss(model, toydata.crops(images, r["batch"], r["crop"], g), g, r["kl"])

    def evaluate(model, step):
        psnr, std = vae_psnr(model, test)
        return {"psnr": psnr, "latent_std": std}

    sched = toyloop.Schedule(r["steps"], r["lr"], warmup=100, every=250)
    vae = toyloop.run(run_dir / "vae", vae, loss, sched, seed, evaluate, progress)
    return vae


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("stage", choices=["vae", "unet", "export"])
    p.add_argument("--run", type=Path, default=Path("/work/toyrun"), help="checkpoints, logs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.stage == "vae":
        train_vae(a.run, a.seed, not a.no_progress)


if __name__ == "__main__":
    main()
