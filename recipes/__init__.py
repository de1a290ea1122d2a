"""Research built on the `sd` attention interface, one file per method.

- heat maps (DAAM, Tang et al. 2023): `sd.pipeline.HeatMap` and `python -m sd --heatmap` (one
  implementation, in sd, because the text-to-image CLI uses it too); `recipes.heatmap` reads it
  for a given image and scores it on the toy world;
- `recipes.correspondence`: unsupervised semantic correspondence (Hedlin et al., NeurIPS 2023);
- `recipes.cds`: Delta and Contrastive Denoising Score editing (Hertz et al. 2023; Nam et al.,
  CVPR 2024).
Below: the command-line options and model loading the recipes share. Nothing here imports torch
at import time, so every recipe's --help answers before torch loads.
"""

import argparse
import sys
from dataclasses import fields
from pathlib import Path

from sd.config import DTYPE_NAMES, PRESETS


def model_options(p: argparse.ArgumentParser) -> None:
    """--model, --weights, --device, --dtype, --seed, --quiet, as `python -m sd` spells them."""
    p.add_argument("--model", choices=["auto", *PRESETS], default="auto",
                   help="preset (default: detected from the weights); tiny = random weights")
    p.add_argument("--weights", type=Path, help="diffusers folder or single-file checkpoint "
                   "(default: weights/sd2.1-base, or weights/MODEL with --model)")
    p.add_argument("--device", help="cuda, cpu, ... (default: cuda if present)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="fp32",
                   help="of the model; the optimised tensor is always fp32 (default fp32)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random draw (default 0)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def settings_options(p: argparse.ArgumentParser, settings: type, words: dict[str, str]) -> None:
    """One option per field of a frozen Settings dataclass (noise_index -> --noise-index), with
    `words[field]` and the default as its help; tuple fields take several values."""
    for f in fields(settings):
        many = isinstance(f.default, tuple)
        shown = " ".join(map(str, f.default)) if many else f"{f.default:.6g}"
        p.add_argument(f"--{f.name.replace('_', '-')}", nargs="+" if many else None,
                       type=type(f.default[0] if many else f.default), default=f.default,
                       help=f"{words[f.name]} (default {shown})")


def settings_from(args: argparse.Namespace, settings: type):
    """The Settings instance the options of `settings_options` give."""
    values = {f.name: getattr(args, f.name) for f in fields(settings)}
    return settings(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def toy_world():
    """train.scenes, the toy world's scene generator, or a ValueError that says it is missing."""
    try:
        from train import scenes
    except ImportError as e:
        raise ValueError("--toy needs the toy world's scene generator, train/scenes.py, which "
                         "this checkout does not have") from e
    return scenes


def load(args: argparse.Namespace):
    """The pipeline the options name; says on stderr which model it is. Raises WeightsError,
    or ValueError for a device this machine lacks."""
    from sd.config import DTYPES
    from sd.pipeline import Pipeline, pick_device
    from sd.weights import resolve

    cfg, weights, why = resolve(args.model, args.weights)
    device = pick_device(args.device)
    print(f"model: {cfg.name} ({cfg.schedule.prediction}, {cfg.resolution} px; {why}) on "
          f"{device} in {args.dtype}", file=sys.stderr)
    return Pipeline.load(cfg, weights, device, DTYPES[args.dtype])
