"""Research built on the `sd` attention interface, one file per method.

- heat maps (DAAM, Tang et al. 2023): `sd.controls.HeatMap` and `python -m sd --heatmap` (one
  implementation, in sd, because the text-to-image CLI uses it too); `recipes.heatmap` reads it
  for a given image and scores it on the toy world;
- `recipes.correspondence`: unsupervised semantic correspondence (Hedlin et al., NeurIPS 2023);
- `recipes.cds`: Delta and Contrastive Denoising Score editing (Hertz et al. 2023; Nam et al.,
  CVPR 2024);
- `toy.heldout`: the toy world as their benchmark (scenes, keypoints, pairs).
Below: the command-line options and model loading the recipes share. Nothing here imports torch
at import time, so every recipe's --help answers before torch loads.
"""

import argparse
from dataclasses import fields, replace
from pathlib import Path

from sd import cli
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
    cli.add_threads(p)


def settings_options(p: argparse.ArgumentParser, presets: dict, words: dict[str, str]) -> None:
    """--preset NAME (the first is the default), and one option per field of the presets' frozen
    Settings dataclass (noise_index -> --noise-index) that overrides the preset's value; `words`
    and every preset's value make its help. Tuple fields take several values."""
    names = list(presets)
    p.add_argument("--preset", choices=names, default=names[0],
                   help=f"settings the options below start from (default {names[0]})")
    show = lambda v: " ".join(map(str, v)) if isinstance(v, tuple) else f"{v:.6g}"  # noqa: E731
    for f in fields(presets[names[0]]):
        values = [show(getattr(s, f.name)) for s in presets.values()]
        shown = f"default {values[0]}" if len(set(values)) == 1 else ", ".join(
            f"{n} {v}" for n, v in zip(names, values))
        many = isinstance(f.default, tuple)
        p.add_argument(f"--{f.name.replace('_', '-')}", nargs="+" if many else None,
                       type=type(f.default[0] if many else f.default),
                       help=f"{words[f.name]} ({shown})")


def settings_from(args: argparse.Namespace, presets: dict):
    """The chosen preset with the options given on the command line put in."""
    base = presets[args.preset]
    given = {f.name: getattr(args, f.name) for f in fields(base)}
    return replace(base, **{k: tuple(v) if isinstance(v, list) else v
                            for k, v in given.items() if v is not None})


def load(args: argparse.Namespace):
    """The pipeline the options name; says on stderr which model it is. Raises WeightsError,
    or ValueError for a device this machine lacks."""
    from sd.weights import resolve

    cfg, weights, why = resolve(args.model, args.weights)
    return cli.open_pipeline(cfg, weights, why, args.device, args.dtype, args.threads)

