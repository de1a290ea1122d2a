"""python -m sd "a prompt" ... : text-to-image with SD 2.1, and where the words landed.
python -m sd invert photo.jpg --prompt "..." : invert a photo for editing (null-text inversion).
"""

import math
import sys
from dataclasses import fields
from pathlib import Path

from sd import cli
from sd.config import MAX_INVERSION_STEPS, InversionSettings

EPILOG = """examples:
  python -m sd "a photo of a corgi on the beach" --weights weights/sd2.1-base -o out/corgi.png
  python -m sd "a red circle" --model tiny --steps 10     # random tiny model: no download
  python -m sd "a cat wearing a hat" --heatmap cat hat   # also out/image_heatmap.png
  python -m sd "a photo of <my-dog> on the moon" --concepts out/learned_embeds.safetensors
  python -m sd invert photo.jpg --prompt "a photo of a cat" -o out/cat.inv   # see its --help

Weights: `make weights` (or `python weights/fetch.py sd2.1-base`) downloads SD 2.1-base into
weights/sd2.1-base; see weights/README.md. --weights also takes an original single-file
checkpoint such as v2-1_768-ema-pruned.safetensors."""

INVERT = """python -m sd invert photo.jpg --prompt "..." : invert a photo for editing.

Null-text inversion (Mokady et al. 2022) or, with --fast, negative-prompt inversion (Miyake et al.
2023), as sd/inversion.py: the photo's x_T and one unconditional context per DDIM step, written as
one .inv file that `python -m photoswap --inversion` replays (with the same model and steps)."""


def generate_parser():
    p = cli.parser("python -m sd", __doc__, EPILOG)
    p.add_argument("prompt", help="what to draw (or `invert`: the command above)")
    p.add_argument("--concepts", nargs="+", type=Path, metavar="FILE",
                   help="learned tokens from textual inversion (learned_embeds.safetensors)")
    p.add_argument("--negative", default="", help="negative prompt (default: none)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    p.add_argument("--guidance", type=float, default=7.5, help="CFG scale (default 7.5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise (default 0)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta, 0 = deterministic")
    p.add_argument("--height", type=int, help="multiple of 8 (default: the model's resolution)")
    p.add_argument("--width", type=int, help="multiple of 8 (default: the model's resolution)")
    p.add_argument("--batch", type=int, default=1, help="images of the same prompt (default 1)")
    p.add_argument("--heatmap", nargs="+", metavar="WORD", help="also save where these words of "
                   "the prompt attended (DAAM heat maps) as OUT_heatmap.png")
    p.add_argument("--threshold", type=float, metavar="TAU", help="with --heatmap: add each word's "
                   "mask, its normalised map >= TAU (DAAM uses 0.4)")
    p.add_argument("-o", "--out", type=Path, default=Path("out/image.png"), help="the image "
                   "to write; its extension names the format: .png, .jpg, .webp (default: "
                   "out/image.png)")
    cli.add_model_options(p)
    return p


def invert_parser():
    d = InversionSettings()
    p = cli.parser("python -m sd invert", INVERT, "Weights: as for python -m sd.")
    p.add_argument("image", type=Path, help="the photo (cropped to the model's resolution)")
    p.add_argument("--prompt", required=True, help="describes the photo (the source prompt)")
    p.add_argument("-o", "--out", type=Path, help="the inversion file (default: IMAGE.inv)")
    p.add_argument("--steps", type=int, default=d.steps, help=f"DDIM steps (default {d.steps}; "
                   f"null-text inversion takes at most {MAX_INVERSION_STEPS})")
    p.add_argument("--guidance", type=float, default=d.guidance,
                   help=f"the CFG scale it will be sampled with (default {d.guidance})")
    p.add_argument("--fast", action="store_true", help="negative-prompt inversion: no optimising")
    p.add_argument("--inner-steps", type=int, default=d.inner_steps,
                   help=f"Adam iterations per step, at most (default {d.inner_steps})")
    p.add_argument("--height", type=int, help="multiple of 64 (default: the model's resolution)")
    p.add_argument("--width", type=int, help="multiple of 64 (default: the model's resolution)")
    p.add_argument("--seed", type=int, default=0, help="seeds --model tiny's random weights")
    cli.add_model_options(p)
    return p


def parse(argv: list[str] | None = None):
    """The options of `python -m sd` or, when the first word is `invert`, of its inversion."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["invert"]:
        args = invert_parser().parse_args(argv[1:])
        args.command = "invert"
        checks = [(not math.isfinite(args.guidance), "--guidance: give a finite number"),
                  (args.inner_steps < 0, "--inner-steps: give 0 or more"),
                  (not args.fast and args.steps > MAX_INVERSION_STEPS,
                   f"--steps {args.steps}: null-text inversion takes at most "
                   f"{MAX_INVERSION_STEPS} (its lr schedule); --fast takes more")]
    else:
        args = generate_parser().parse_args(argv)
        args.command = "generate"
        checks = [(args.batch < 1, f"--batch {args.batch}: give 1 or more"),
                  (not math.isfinite(args.guidance), "--guidance: give a finite number"),
                  (not args.eta >= 0, "--eta: give 0 (deterministic) or more"),
                  (not 0 <= args.seed < 2**64, "--seed: give 0 to 2**64 - 1"),
                  (not 0 <= (args.threshold or 0) <= 1, "--threshold: give 0 to 1")]
    if problem := next((message for failed, message in checks if failed), None):
        raise cli.UsageError(problem)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    return invert(args) if args.command == "invert" else generate(args)


def generate(args) -> int:
    # The library (and torch, over a second) loads only now: --help and usage errors are instant.
    from sd import ddim
    from sd.controls import HeatMap
    from sd.images import image_format
    from sd.pipeline import concept_rows, pick_device
    from sd.tokenizer import Tokenizer
    from sd.weights import read, resolve

    # Everything that can be checked before the model loads.
    cli.writable(args.out)
    cfg, weights, why = resolve(args.model, args.weights)
    image_format(args.out)
    for side in (args.height, args.width):
        if side is not None and (side <= 0 or side % cfg.vae.factor):
            raise cli.UsageError(f"--height and --width: give multiples of {cfg.vae.factor}, "
                                 f"such as {cfg.resolution}; got {side}")
    ddim.timesteps(args.steps, cfg.schedule)
    pick_device(args.device)
    concepts = {k: v for file in args.concepts or [] for k, v in read(file).items()}
    if concepts:
        concept_rows(concepts, cfg.text.width)
    tokenizer = Tokenizer(cfg.text.max_len, cfg.text.pad_id)
    tokenizer.add_tokens(list(concepts))
    spans = [len(tokenizer.word_indices(args.prompt, w)) for w in args.heatmap or []]
    pipe = cli.open_pipeline(cfg, weights, why, args.device, args.dtype, args.threads,
                             args.height, args.width, args.batch)
    if concepts:
        pipe.add_concepts(concepts)
    heat = None
    if args.heatmap:
        tokens = [i for w in args.heatmap for i in pipe.tokenizer.word_indices(args.prompt, w)]
        hw = ((args.height or cfg.resolution) // cfg.vae.factor,
              (args.width or cfg.resolution) // cfg.vae.factor)
        heat = HeatMap(tokens, hw)
    images = pipe([args.prompt] * args.batch, args.negative, args.steps, args.guidance,
                  args.seed, height=args.height, width=args.width, ctrl=heat, eta=args.eta,
                  progress=not args.quiet)
    write(args, images, heat, spans)
    return 0


def write(args, images, heat, spans: list[int]) -> None:
    """The images, numbered after the first, and the heat maps' grid if asked for."""
    from sd.images import grid, overlay, save_image

    out = args.out
    for i, image in enumerate(images):
        save_image(image, out if i == 0 else out.with_name(f"{out.stem}_{i}{out.suffix}"))
    if heat is not None:
        pictures = [heat.normalised(spans)]  # then the masks: one overlay per word each
        pictures += [] if args.threshold is None else [heat.masks(spans, args.threshold).float()]
        rows = [[im] + [overlay(im, m) for p in pictures for m in p[b]]
                for b, im in enumerate(images)]
        save_image(grid(rows), out.with_name(f"{out.stem}_heatmap.png"))
    print(f"wrote {out}" + (f" and {len(images) - 1} more" if len(images) > 1 else ""),
          file=sys.stderr)


def invert(args) -> int:
    from sd import ddim
    from sd.images import fit_warning, load_image, open_image, psnr, rgb
    from sd.inversion import invert, reconstruct, save
    from sd.weights import resolve

    # Everything that can be checked before the model loads.
    out = cli.writable(args.out or args.image.with_suffix(".inv"))
    cfg, weights, why = resolve(args.model, args.weights)
    h, w = args.height or cfg.resolution, args.width or cfg.resolution
    ddim.timesteps(args.steps, cfg.schedule)
    image = load_image(args.image, h, w)  # a photo that cannot be read: say so now
    if warning := fit_warning(rgb(open_image(args.image)).size, h, w):
        print(f"warning: {args.image}: {warning}", file=sys.stderr)
    pipe = cli.open_pipeline(cfg, weights, why, args.device, args.dtype, args.threads,
                             seed=args.seed)  # the seed: only random (tiny) weights draw from it
    latent = pipe.encode(args.image, h, w)
    given = {f.name: getattr(args, f.name) for f in fields(InversionSettings) if f.name in args}
    inv = invert(pipe, latent, args.prompt, InversionSettings(**given), not args.quiet)
    save(inv, out)
    rec, vae = (psnr(pipe.decode(z), image).item() for z in (reconstruct(pipe, inv), latent))
    print(f"wrote {out} ({inv.method}, {inv.steps} steps, guidance {inv.guidance})\n"
          f"reconstruction PSNR {rec:.2f} dB (the VAE alone: {vae:.2f} dB)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
