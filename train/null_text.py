"""python -m train.null_text photo.jpg --prompt "..." : invert a real photo for editing.

The command line of null-text inversion (Mokady et al. 2022) and its fast variant, negative-prompt
inversion (Miyake et al. 2023); the method is train/inversion.py.
"""

import argparse
import math
import sys
from pathlib import Path

from sd import cli
from sd.config import DTYPE_NAMES, PRESETS


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m train.null_text",
                                description="Invert a photo for editing: x_T and one "
                                "unconditional context per step (null-text inversion).",
                                epilog="Weights: `make weights` (see weights/README.md).")
    p.error = lambda message: p.exit(2, f"error: {message} (see {p.prog} --help)\n")
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
    p.add_argument("--device", help="cuda, cpu, ... (default: cuda if present)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, help="default: fp16 on CUDA, fp32 on CPU")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    cli.add_threads(p)
    return p.parse_args(argv)


def fit_warning(size: tuple[int, int], height: int, width: int) -> str | None:
    """What load_image's resize-and-crop of an image of `size` (w, h) loses, if it is a lot."""
    w, h = size
    scale = max(width / w, height / h)
    kept = (width * height) / (w * h * scale**2)  # the share of the image the crop keeps
    if scale > 4:
        return f"it is {w}x{h}, scaled up {scale:.3g}x to {width}x{height}: use a larger image"
    if kept < 0.25:
        return f"it is {w}x{h}: a {width}x{height} crop keeps {kept:.1%}: crop it yourself first"
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    # The library (and torch, over a second) loads only now: --help and usage errors are instant.
    from sd import ddim
    from sd.images import load_image, open_image, rgb
    from sd.weights import resolve
    from train.inversion import MAX_STEPS, invert, psnr, reconstruct, save

    # Everything that can be checked before the model loads.
    cfg, weights, why = resolve(args.model, args.weights)
    out = cli.writable(args.output or args.image.with_suffix(".inv"))
    h, w = args.height or cfg.resolution, args.width or cfg.resolution
    checks = [(not math.isfinite(args.guidance), "--guidance: give a finite number"),
              (args.inner_steps < 0, "--inner-steps: give 0 or more"),
              (not args.fast and args.steps > MAX_STEPS, f"--steps {args.steps}: null-text "
               f"inversion takes at most {MAX_STEPS} (its lr schedule); --fast takes more")]
    if problem := next((m for failed, m in checks if failed), None):
        raise cli.UsageError(problem)
    ddim.timesteps(args.steps, cfg.schedule)
    image = load_image(args.image, h, w)  # a photo that cannot be read: say so now
    if warning := fit_warning(rgb(open_image(args.image)).size, h, w):
        print(f"warning: {args.image}: {warning}", file=sys.stderr)
    pipe = cli.open_pipeline(cfg, weights, why, args.device, args.dtype, args.threads,
                             seed=args.seed)  # the seed: only random (tiny) weights draw from it
    latent = pipe.encode(args.image, h, w)
    inv = invert(pipe, latent, args.prompt, args.steps, args.guidance, args.fast,
                 args.inner_steps, progress=not args.quiet)
    save(inv, out)
    rec, vae = (psnr(pipe.decode(z), image) for z in (reconstruct(pipe, inv), latent))
    print(f"wrote {out} ({inv.method}, {inv.steps} steps, guidance {inv.guidance})\n"
          f"reconstruction PSNR {rec:.2f} dB (the VAE alone: {vae:.2f} dB)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
