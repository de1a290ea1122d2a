"""python -m train.null_text photo.jpg --prompt "..." : invert a real photo for editing.

The command line of null-text inversion (Mokady et al. 2022) and its fast variant, negative-prompt
inversion (Miyake et al. 2023); the method is train/inversion.py.
"""

import argparse
import sys
from pathlib import Path

from sd.config import DTYPE_NAMES, PRESETS


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m train.null_text",
                                description="Invert a photo for editing: x_T and one "
                                "unconditional context per step (null-text inversion).",
                                epilog="Weights: `make weights` (see weights/README.md).")
    p.add_argument("image", type=Path, help="the photo (cropped to the model's resolution)")
    p.add_argument("--prompt", required=True, help="describes the photo (the source prompt)")
    p.add_argument("-o", "--output", type=Path, help="inversion file (default: IMAGE.inv)")
    p.add_argument("--model", choices=["auto", *PRESETS], default="auto",
                   help="as for python -m sd (default: from the weights)")
    p.add_argument("--weights", type=Path, help="default: weights/sd2.1-base or weights/MODEL")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    p.add_argument("--guidance", type=float, default=7.5, help="CFG scale (default 7.5)")
    p.add_argument("--fast", action="store_true", help="negative-prompt inversion: no optimising")
    p.add_argument("--inner-steps", type=int, default=10, help="Adam iterations per step")
    p.add_argument("--height", type=int, help="multiple of 64 (default: the model's resolution)")
    p.add_argument("--width", type=int, help="multiple of 64 (default: the model's resolution)")
    p.add_argument("--seed", type=int, default=0, help="seeds --model tiny's random weights")
    p.add_argument("--dtype", choices=DTYPE_NAMES, help="default: fp16 on CUDA, fp32 on CPU")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    # The library (and torch, over a second) loads only now: --help and usage errors are instant.
    import torch

    from sd.config import DTYPES
    from sd.images import load_image
    from sd.pipeline import Pipeline, default_device_dtype
    from sd.weights import WeightsError, resolve
    from train.inversion import invert, psnr, reconstruct, save

    if not args.image.is_file():
        print(f"error: {args.image}: no such file", file=sys.stderr)
        return 1
    try:
        cfg, weights, why = resolve(args.model, args.weights)
    except WeightsError as e:  # says how to download them
        print(e, file=sys.stderr)
        return 2
    device, dtype = default_device_dtype()
    dtype = DTYPES[args.dtype] if args.dtype else dtype
    print(f"model: {cfg.name} ({cfg.schedule.prediction}; {why}) on {device} in "
          f"{str(dtype).removeprefix('torch.')}", file=sys.stderr)
    h, w = args.height or cfg.resolution, args.width or cfg.resolution
    try:
        image = load_image(args.image, h, w)
        torch.manual_seed(args.seed)  # only random (tiny) weights draw from it
        pipe = Pipeline.load(cfg, weights, device, dtype)
        latent = pipe.encode(args.image, h, w)
        inv = invert(pipe, latent, args.prompt, args.steps, args.guidance, args.fast,
                     args.inner_steps, progress=not args.quiet)
    except (WeightsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    out = args.output or args.image.with_suffix(".inv")
    save(inv, out)
    rec, vae = (psnr(pipe.decode(z), image) for z in (reconstruct(pipe, inv), latent))
    print(f"wrote {out} ({inv.method}, {inv.steps} steps, guidance {inv.guidance})\n"
          f"reconstruction PSNR {rec:.2f} dB (the VAE alone: {vae:.2f} dB)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
