"""Seconds per training step of `make toy`'s long stages (the VAE and the UNet), at one and two
torch threads, quiet and beside a CPU load: what TOY_THREADS and TOY_JOBS are chosen by.

    python -m bench.toy_train                        # about 10 minutes on 2 cores
    python -m bench.toy_train --stages unet --load 1 --steps 40

Method. Each step is toy/pretrain.py's: the same loss functions (vae_loss on a batch of 32
random 32x32 crops; diffusion_loss on 32 latents with their captions, Min-SNR, caption
dropout), backward, AdamW (torch's default implementation, as train.loop.fit), and for the UNet
the EMA update. Data are random tensors in the stages' shapes and captions of the world (the
time does not depend on the values). Every case runs in a fresh process; the first `--warmup`
steps are discarded, reported is the median wall time of the rest. The load is LOAD processes
spinning in Python (load 1 beside a one-thread job is what `make toy`'s other job slot is).
"""

import argparse
import statistics
import subprocess
import sys
import time

from bench.threads import load
from sd import cli


def step_times(stage: str, threads: int, steps: int, warmup: int) -> list[float]:
    import torch

    from toy import pretrain as p
    from toy import scenes
    from train.loop import EMA

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    if stage == "vae":
        r = p.VAE_RECIPE
        model = p.VAE(p.TOY.vae)

        def loss() -> torch.Tensor:
            x = torch.rand(r["batch"], 3, r["crop"], r["crop"], generator=g) * 2 - 1
            return p.vae_loss(model, x, g, r["kl"])
        ema = None
    else:
        r = p.UNET_RECIPE
        cfg = p.toy_config(1.0)
        model = p.Stage2(cfg)
        captions = [scenes.caption(scenes.test_scene(i)) for i in range(64)]
        shape = (64, cfg.unet.in_channels, 16, 16)  # 64 px scenes, a factor-4 VAE
        data = {"mean": torch.randn(shape).half(), "std": torch.full(shape, 0.05).half(),
                "ids": p.token_ids(captions, cfg), "empty": p.token_ids([""], cfg),
                "ac": p.ddim.alphas_cumprod(cfg.schedule)}

        def loss() -> torch.Tensor:
            batch = p.latent_batch(data, r["batch"], g)
            return p.diffusion_loss(model, batch, g, cfg, r["drop"], r["snr_gamma"])
        ema = EMA(model, r["ema"])
    opt = torch.optim.AdamW(model.parameters(), lr=r["lr"], weight_decay=r["weight_decay"])
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss().backward()
        opt.step()
        if ema is not None:
            ema.update(model, i)
        times.append(time.perf_counter() - start)
    return times[warmup:]


def worker(stage: str, threads: int, steps: int, warmup: int) -> int:
    print(statistics.median(step_times(stage, threads, steps, warmup)))
    return 0


def measure(stage: str, threads: int, steps: int, warmup: int) -> float:
    r = subprocess.run([sys.executable, "-m", "bench.toy_train", "--worker", stage,
                        str(threads), str(steps), str(warmup)],
                       capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"the {stage} worker failed:\n{r.stderr[-2000:]}")
    return float(r.stdout.split()[-1])


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        stage, threads, steps, warmup = argv[1], *map(int, argv[2:5])
        return worker(stage, threads, steps, warmup)
    ap = argparse.ArgumentParser(prog="python -m bench.toy_train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", nargs="+", choices=["vae", "unet"], default=["vae", "unet"])
    ap.add_argument("--load", type=int, default=1, help="busy processes beside a run (1)")
    ap.add_argument("--steps", type=int, default=30, help="timed steps per case (30)")
    ap.add_argument("--warmup", type=int, default=5, help="steps discarded first (5)")
    args = ap.parse_args(argv)
    print(f"| stage | quiet, 1 thread | quiet, 2 threads | load {args.load}, 1 thread | "
          f"load {args.load}, 2 threads |")
    print("|---|---|---|---|---|")
    for stage in args.stages:
        cells = []
        for loaded in (False, True):
            for threads in (1, 2):
                if loaded:
                    with load(args.load):
                        s = measure(stage, threads, args.steps, args.warmup)
                else:
                    s = measure(stage, threads, args.steps, args.warmup)
                cells.append(f"{s:.3f} s")
                print(f"{stage}: {'load ' + str(args.load) if loaded else 'quiet'}, {threads} "
                      f"thread(s): {s:.3f} s/step", file=sys.stderr, flush=True)
        print(f"| {stage} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
