"""python -m sd "a prompt" ... : text-to-image with SD 2.1, and where the words landed."""

import argparse
import math
import sys
from pathlib import Path

from sd import cli, files
from sd.config import DTYPE_NAMES, PRESETS

EPILOG = """examples:
  python -m sd "a photo of a corgi on the beach" --weights weights/sd2.1-base -o out/corgi.png
  python -m sd "a red circle" --model tiny --steps 10     # random tiny model: no download
  python -m sd "a cat wearing a hat" --heatmap cat hat   # also out/image_heatmap.png
  python -m sd "a photo of <my-dog> on the moon" --concepts out/learned_embeds.safetensors

Weights: `make weights` (or `python weights/fetch.py sd2.1-base`) downloads SD 2.1-base into
weights/sd2.1-base; see weights/README.md. --weights also takes an original single-file
checkpoint such as v2-1_768-ema-pruned.safetensors."""


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sd", description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    # usage errors in one line, as every other error of this CLI, not after a usage block
    p.error = lambda message: p.exit(2, f"error: {message} (see python -m sd --help)\n")
    p.add_argument("prompt", help="what to draw")
    p.add_argument("--model", choices=["auto", *PRESETS], default="auto",
                   help="sd2.1-base: 512 px, epsilon; sd2.1: 768 px, v-prediction; toy: our 64 px "
                        "model, committed in weights/toy; tiny: random toy-size weights for "
                        "trying the code (default: from the weights)")
    p.add_argument("--weights", type=Path, help="diffusers folder or single-file checkpoint "
                   "(default: weights/sd2.1-base, or weights/MODEL with --model)")
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
    p.add_argument("--device", help="cuda, cpu, ... (default: cuda if present)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, help="default: fp16 on CUDA, fp32 on CPU")
    p.add_argument("-o", "--output", type=Path, default=Path("out/image.png"), help="the image "
                   "to write; its extension names the format: .png, .jpg, .webp (default: "
                   "out/image.png)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    cli.add_threads(p)
    args = p.parse_args(argv)
    for failed, message in ((args.batch < 1, f"--batch {args.batch}: give 1 or more"),
                            (not math.isfinite(args.guidance), "--guidance: give a finite number"),
                            (not args.eta >= 0, "--eta: give 0 (deterministic) or more"),
                            (not 0 <= args.seed < 2**64, "--seed: give 0 to 2**64 - 1"),
                            (not 0 <= (args.threshold or 0) <= 1, "--threshold: give 0 to 1")):
        if failed:
            p.error(message)
    if message := files.unwritable(args.output):
        p.error(message)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    # The library (and torch, over a second) loads only now: --help and usage errors are instant.
    from sd import ddim
    from sd.controls import HeatMap
    from sd.images import grid, image_format, overlay, save_image
    from sd.pipeline import concept_rows, pick_device
    from sd.tokenizer import Tokenizer
    from sd.weights import read, resolve

    # Everything that can be checked before the model loads.
    cfg, weights, why = resolve(args.model, args.weights)
    image_format(args.output)
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
    out = args.output
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
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
