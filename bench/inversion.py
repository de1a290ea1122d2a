"""Time one null-text inversion (sd/inversion.py), end to end from a clean latent.

    python -m bench.inversion               # tiny preset on CPU; with CUDA also SD 2.1-base
    python -m bench.inversion --threads 1   # CPU threads (default: all cores)

CPU: the tiny preset with random weights and an 8x8 latent (64 px). GPU: the SD 2.1-base config at
512 px (a 64x64 latent) with random weights in fp16, after a 2-step warm-up. Both run the
paper's settings: 50 DDIM steps, at most 10 Adam iterations each, guidance 7.5. Random weights
rarely meet the early stop (loss < 1e-5 + i * 2e-5), so these are close to the worst case of
500 UNet forward+backward passes plus 150 forwards.
"""

import argparse
import sys
import time

from bench.common import LOAD
from sd import cli
from sd.config import SD21_BASE, TINY, InversionSettings, ModelConfig


def one(cfg: ModelConfig, device: str, dtype, side: int, steps: int = 50) -> float:
    """Seconds for one inversion of a random latent (after a 2-step warm-up); dtype: a
    torch.dtype."""
    import torch

    from sd.inversion import invert
    from sd.pipeline import Pipeline

    torch.manual_seed(0)
    pipe = Pipeline.load(cfg, None, torch.device(device), dtype)
    latent = torch.randn(1, 4, side // 8, side // 8, generator=torch.Generator().manual_seed(0))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    invert(pipe, latent, "a photo of a cat",
           InversionSettings(steps=2, inner_steps=2))  # kernels, allocator
    sync()
    start = time.perf_counter()
    inv = invert(pipe, latent, "a photo of a cat", InversionSettings(steps=steps))
    sync()
    seconds = time.perf_counter() - start
    if not all(u.isfinite().all() for u in inv.uncond):  # timing still counts every iteration
        print(f"note: {cfg.name}'s random weights gave non-finite embeddings", file=sys.stderr)
    return seconds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.inversion", description=__doc__)
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    args = p.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    s0 = LOAD.snap()
    cpu = one(TINY, "cpu", torch.float32, TINY.resolution)
    others = LOAD.others(s0, LOAD.snap())
    print(f"tiny, CPU fp32, {torch.get_num_threads()} thread(s), 50 steps x <= 10 iterations: "
          f"{cpu:.1f} s (other processes used {others:.0%} of the cores meanwhile)")
    if not torch.cuda.is_available():
        print("sd2.1-base 512 px fp16: skipped, no CUDA device here (run this on a GPU machine)",
              file=sys.stderr)
        return 0
    gpu = one(SD21_BASE, "cuda", torch.float16, 512)
    print(f"sd2.1-base, {torch.cuda.get_device_name()} fp16, 512 px, 50 steps x <= 10 "
          f"iterations: {gpu:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
