"""python -m sd "a prompt" ... : text-to-image with SD 2.1, and where the words landed."""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sd.config import ModelConfig, preset
from sd.pipeline import HeatMap, Pipeline, default_device_dtype
from sd.weights import WeightsError, detect_preset

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

EPILOG = """examples:
  python -m sd "a photo of a corgi on the beach" --weights weights/sd2.1-base -o corgi.png
  python -m sd "a red circle" --model tiny --steps 10     # random tiny model: no download
  python -m sd "a cat wearing a hat" --heatmap cat hat   # also writes out_heatmap.png
  python -m sd "a photo of <my-dog> on the moon" --concepts out/learned_embeds.safetensors

Weights: `make weights` (or `python weights/fetch.py sd2.1-base`) downloads SD 2.1-base into
weights/sd2.1-base; see weights/README.md. --weights also takes an original single-file
checkpoint such as v2-1_768-ema-pruned.safetensors."""


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sd", description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt", help="what to draw")
    p.add_argument("--model", choices=["auto", "sd2.1-base", "sd2.1", "tiny"], default="auto",
                   help="sd2.1-base: 512 px, epsilon; sd2.1: 768 px, v-prediction; tiny: random "
                        "toy-size weights for trying the code (default: from the weights)")
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
    p.add_argument("--heatmap", nargs="+", metavar="WORD",
                   help="also save where these words of the prompt attended, as OUT_heatmap.png")
    p.add_argument("--device", help="cuda, cpu, ... (default: cuda if present)")
    p.add_argument("--dtype", choices=list(DTYPES), help="default: fp16 on CUDA, fp32 on CPU")
    p.add_argument("-o", "--output", type=Path, default=Path("out.png"), help="PNG to write")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def save(image: Image.Image, path: Path) -> None:
    """Write atomically: an interrupted run never leaves a truncated PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    image.save(tmp, format="PNG")
    tmp.replace(path)


def overlay(image: Image.Image, heat: torch.Tensor) -> Image.Image:
    """The image darkened, with the [0, 1] heat map in warm colours on top."""
    h = np.asarray(Image.fromarray((heat.numpy() * 255).astype(np.uint8)).resize(
        image.size, Image.Resampling.BILINEAR), dtype=np.float32)[..., None] / 255
    colour = np.concatenate([np.clip(2 * h, 0, 1), np.clip(2 * h - 1, 0, 1), 0 * h], axis=-1)
    mixed = 0.4 * np.asarray(image, dtype=np.float32) / 255 + 0.6 * colour
    return Image.fromarray((mixed * 255).round().astype(np.uint8))


def grid(rows: list[list[Image.Image]]) -> Image.Image:
    w, h = rows[0][0].size
    out = Image.new("RGB", (w * len(rows[0]), h * len(rows)))
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            out.paste(im, (c * w, r * h))
    return out


def resolve(model: str, weights: Path | None) -> tuple[ModelConfig, Path | None, str]:
    """The preset, the weights path (None: random tiny weights) and why that preset.

    Raises WeightsError with the exact download instructions when the weights are absent.
    """
    if model == "tiny":
        return preset("tiny"), weights, "random weights" if weights is None else "--model tiny"
    name = model if model != "auto" else "sd2.1-base"
    weights = weights or Path("weights") / name
    if not weights.exists():
        raise WeightsError(
            f"No SD 2.1 weights at {weights}.\nDownload them (about 2.6 GB) with:\n"
            f"    make weights MODEL={name}\nor: python weights/fetch.py {name}\n"
            "See weights/README.md for the files, the mirrors and the licence. To try the "
            "code without weights, use --model tiny (random weights).")
    if model == "auto":
        model, why = detect_preset(weights)
        return preset(model), weights, why
    return preset(model), weights, "chosen with --model"


def main(argv=None) -> int:
    args = parse(argv)
    try:
        cfg, weights, why = resolve(args.model, args.weights)
    except WeightsError as e:
        print(e, file=sys.stderr)
        return 2
    device, dtype = default_device_dtype()
    device = torch.device(args.device) if args.device else device
    dtype = DTYPES[args.dtype] if args.dtype else (dtype if device.type == "cuda" else torch.float32)
    print(f"model: {cfg.name} ({cfg.schedule.prediction}, {cfg.resolution} px; {why}) on "
          f"{device} in {str(dtype).removeprefix('torch.')}", file=sys.stderr)
    try:
        pipe = Pipeline.load(cfg, weights, device, dtype)
        for file in args.concepts or []:
            pipe.add_concepts(file)
        heat = None
        if args.heatmap:
            tokens = [i for w in args.heatmap for i in pipe.tokenizer.word_indices(args.prompt, w)]
            spans = [len(pipe.tokenizer.word_indices(args.prompt, w)) for w in args.heatmap]
            hw = ((args.height or cfg.resolution) // cfg.vae.factor,
                  (args.width or cfg.resolution) // cfg.vae.factor)
            heat = HeatMap(tokens, hw)
        images = pipe([args.prompt] * args.batch, args.negative, args.steps, args.guidance,
                      args.seed, height=args.height, width=args.width, ctrl=heat, eta=args.eta,
                      progress=not args.quiet)
    except (WeightsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    out = args.output
    for i, image in enumerate(images):
        save(image, out if i == 0 else out.with_name(f"{out.stem}_{i}{out.suffix}"))
    if heat is not None:
        maps, rows = heat.normalised(), []
        for b, image in enumerate(images):
            per_word = maps[b].split(spans)  # a word of several tokens: average its tokens
            rows.append([image] + [overlay(image, m.mean(0)) for m in per_word])
        save(grid(rows), out.with_name(f"{out.stem}_heatmap.png"))
    print(f"wrote {out}" + (f" and {len(images) - 1} more" if len(images) > 1 else ""),
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
