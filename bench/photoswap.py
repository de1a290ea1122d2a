"""CPU benchmark: Photoswap fused vs explicit vs plain sampling of the same two-prompt batch.

    python -m bench.photoswap                      # sides 16 32 48 64, 5 steps, one thread
    python -m bench.photoswap --sides 32 --steps 3

Model: MID below (SD 2.1's UNet design at a fifth of its widths, head dim 64 as SD 2.1, random
weights), source "a photo of a cat on the grass", target "a photo of a sks dog on the grass",
guidance 7.5: the UNet sees a batch of 4 (two prompts, both CFG halves). Variants, each in a
fresh subprocess so that its peak memory is its own:
  plain     pipe.sample of the same two prompts, no control
  fused     the paper preset (phi 0.2, M 0.5, A 0.4, local blend from 0.2), fused control
  explicit  the same with explicit fp32 maps (as the official code computes them)
  fused-all / explicit-all   every swap on every step (the worst case for cost)
Seconds: CPU time of the process (one thread) for the whole sampling loop, the best of two runs
after a one-step plain warm-up. Peak memory: the process's peak resident set (ru_maxrss) minus
its resident set just before sampling (weights and text contexts in), i.e. what sampling adds;
glibc is told to hand every large free block back (MALLOC_MMAP_THRESHOLD_), so that the resident
set follows the live tensors.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import replace

from sd import cli

MID = dict(channels=(64, 128, 256, 256), heads=(1, 2, 4, 4))  # head dim 64, as SD 2.1
VARIANTS = ("plain", "fused", "explicit", "fused-all", "explicit-all")
SRC, TGT = "a photo of a cat on the grass", "a photo of a sks dog on the grass"


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(variant: str, side: int, steps: int) -> dict:
    import torch

    from photoswap.settings import PRESETS, Layers, Settings, Swap
    from photoswap.swap import Pair, control
    from sd.config import TINY, TextConfig, UNetConfig
    from sd.pipeline import Pipeline

    torch.set_num_threads(1)
    cfg = replace(TINY, name="mid", text=TextConfig(width=256, layers=2, heads=4, mlp_width=512),
                  unet=UNetConfig(**MID, context_dim=256), resolution=side * 8)
    torch.manual_seed(0)
    pipe = Pipeline.load(cfg, None, "cpu", torch.float32)
    x = pipe.noise(1, side * 8, side * 8, 0).repeat(2, 1, 1, 1)
    cond, uncond = pipe.encode_prompt([SRC, TGT]), pipe.encode_prompt("")
    settings = PRESETS["paper"]
    if variant.endswith("-all"):
        every = Swap(1.0, Layers(), "both")
        settings = Settings(phi=every, m=replace(settings.m, window=1.0), a=Swap(1.0),
                            blend_start=0.0)

    def sample(n):
        ctrl = None
        if variant != "plain":
            pair = Pair(SRC, TGT, ["cat"], ["sks dog"], x[:1])
            ctrl = control(pipe, [pair], settings, explicit=variant.startswith("explicit"))
        cb = ctrl.callback if ctrl is not None else None
        return pipe.sample(x, cond, uncond, n, 7.5, ctrl, callback=cb)

    pipe.sample(x, cond, uncond, 1, 7.5)  # warm-up: thread pools, kernel choice
    before = rss_mb()
    seconds = []
    for _ in range(2):
        t0 = time.process_time()
        sample(steps)
        seconds.append(time.process_time() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"variant": variant, "side": side, "seconds": min(seconds), "peak_mb": peak - before,
            "total_mb": peak}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.photoswap", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sides", type=int, nargs="+", default=[16, 32, 48, 64], help="latent sides")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), int(args.child[2]))))
        return 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}
    print(f"{args.steps} steps, guidance 7.5, batch 4 (2 prompts x CFG), fp32, one thread")
    print("| latent | variant | CPU s | vs plain | peak MB added | peak MB total | explicit/fused "
          "added |")
    print("|---|---|---|---|---|---|---|")
    for side in args.sides:
        results = {}
        for variant in args.variants:
            out = subprocess.run([sys.executable, "-m", "bench.photoswap", "--child", variant,
                                  str(side), str(args.steps)], capture_output=True, text=True,
                                 env=env)
            if out.returncode:
                raise SystemExit(f"{variant} at {side}x{side} failed:\n{out.stderr[-2000:]}")
            results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
        for variant, r in results.items():
            plain = results.get("plain", r)["seconds"]
            fused = results.get(variant.replace("explicit", "fused"), r)["peak_mb"]
            ratio = r["peak_mb"] / max(fused, 1e-9) if variant.startswith("explicit") else ""
            print(f"| {side}x{side} | {variant} | {r['seconds']:.2f} | "
                  f"{r['seconds'] / plain:.3f} | {r['peak_mb']:.0f} | {r['total_mb']:.0f} | "
                  f"{f'{ratio:.1f}' if ratio else ''} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
