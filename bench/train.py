"""Training-step benchmark: seconds per DreamBooth step and peak memory.

    python -m bench.train            # CPU (tiny preset), then GPU (SD 2.1-base, 512 px; CUDA only)
    python -m bench.train --cpu      # the CPU part only
    python -m bench.train --gpu      # the GPU part only; exits with "no CUDA" where none is present

Method. The step is train/dreambooth.py's, with the same functions: a Draw, VAE encode of the
batch, noise, UNet (+ text encoder) forward and backward under autocast, gradient clipping and an
AdamW step on fp32 master weights. Weights are random (the timing does not depend on them),
images are random tensors (no folder to read). Every case runs in a fresh process, so its peak
memory is its own: on CPU the peak resident set (ru_maxrss) and its growth over the RSS before
the first step (gradients, AdamW state, activations); on CUDA torch.cuda.max_memory_allocated.
`warmup` steps are discarded; reported is the median seconds per step of the rest.
"""

import argparse
import resource
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context

from bench import common
from sd import cli

CPU_CASES = [("tiny", 64, 1), ("tiny", 64, 4)]  # preset, image side, batch
GPU_CASES = [("sd2.1-base", 512, 1)]


@dataclass(frozen=True)
class Case:
    preset: str
    side: int
    batch: int
    device: str
    precision: str
    text: bool  # train the text encoder too
    checkpointing: bool
    steps: int
    warmup: int
    threads: int

    @property
    def label(self) -> str:
        what = "UNet + text encoder" if self.text else "UNet"
        ckpt = ", checkpointing" if self.checkpointing else ""
        return (f"{self.preset} {self.side} px, batch {self.batch}, {what}, "
                f"{self.precision}{ckpt}")


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def run_case(case: Case) -> dict:
    """One case, in this (fresh) process."""
    import torch

    from sd.pipeline import Pipeline
    from train.dataset import draw
    from train.loop import Denoiser, Run, denoising_loss, optimizer_step

    torch.set_num_threads(case.threads)
    device = torch.device(case.device)
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    pipe = Pipeline.load(common.config(case.preset), None, device, torch.float32)
    cfg, m = pipe.cfg, pipe.models
    trained = [m.unet] + ([m.text_encoder] if case.text else [])
    for module in trained:
        module.train().requires_grad_(True)
    m.unet.set_checkpointing(case.checkpointing)
    model = Denoiser(m.unet, m.text_encoder if case.text else None)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6, weight_decay=1e-2)
    scaler = torch.amp.GradScaler(device.type, enabled=case.precision == "fp16")
    run, gen = Run(device=device, quiet=True), torch.Generator().manual_seed(0)
    ids = pipe.tokenizer(["a photo of sks dog"] * case.batch).to(device)
    text = ids if case.text else m.text_encoder(ids).detach()
    latent = (cfg.unet.in_channels, case.side // cfg.vae.factor, case.side // cfg.vae.factor)
    images = torch.rand(case.batch, 3, case.side, case.side, generator=gen) * 2 - 1
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    before = rss_mib()
    times = []
    for i in range(case.warmup + case.steps):
        sync()
        t0 = time.perf_counter()
        d = draw(gen, i, case.batch, run, 1, latent, cfg.schedule.train_steps)
        with run.autocast(case.precision):
            loss = denoising_loss(model, m.vae, cfg, pipe.ac, images.to(device), text, d).mean()
        scaler.scale(loss).backward()
        optimizer_step(opt, scaler, params, 1.0, 1e-6)
        sync()
        times.append(time.perf_counter() - t0)
    out = {"s_per_step": statistics.median(times[case.warmup:]), "loss": loss.item()}
    if cuda:
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    else:
        out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        out["growth_mib"] = out["peak_rss_mib"] - before
    return out


def in_fresh_process(case: Case) -> dict:
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        return pool.submit(run_case, case).result()


def cases(where: str, threads: int) -> list[Case]:
    if where == "cpu":
        return [Case(p, side, b, "cpu", "fp32", text, ckpt, 10, 3, threads)
                for p, side, b in CPU_CASES for text in (False, True) for ckpt in (False, True)]
    return [Case(p, side, b, "cuda", "bf16", text, ckpt, 10, 3, threads)
            for p, side, b in GPU_CASES for text in (False, True) for ckpt in (False, True)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cpu", action="store_true", help="the CPU part only")
    p.add_argument("--gpu", action="store_true", help="the GPU part only")
    p.add_argument("--threads", type=int, default=common.cpu_cores(),
                   help="torch.set_num_threads on CPU (default: all cores)")
    args = p.parse_args(argv)
    import torch

    parts = ["cpu", "gpu"] if args.cpu == args.gpu else ["cpu"] if args.cpu else ["gpu"]
    print(f"{common.cpu_name()}, {common.cpu_cores()} cores; {common.versions()}", flush=True)
    for where in parts:
        if where == "gpu" and not torch.cuda.is_available():
            print("no CUDA: skipping the GPU part (SD 2.1-base at 512 px, bf16, random weights); "
                  "run `python -m bench.train --gpu` on a machine with an NVIDIA GPU",
                  file=sys.stderr)
            return 0 if "cpu" in parts else 1
        if where == "gpu":
            print(f"GPU: {torch.cuda.get_device_name()}", flush=True)
        for case in cases(where, args.threads):
            r = in_fresh_process(case)
            memory = (f"peak {r['peak_gib']:.2f} GiB allocated" if "peak_gib" in r else
                      f"peak RSS {r['peak_rss_mib']:.0f} MiB (+{r['growth_mib']:.0f} MiB "
                      f"over the loaded model), threads {case.threads}")
            print(f"{case.label}: {common.fmt_s(r['s_per_step'])}/step, {memory}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
