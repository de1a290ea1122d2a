"""python -m photoswap "a photo of a cat" --subject cat --concept "sks dog": swap a subject.

Writes to --out: swap.png (the target branch), source.png (the source branch: the photo's
reconstruction, or the seed's image), grid.png (side by side), settings.json; on request
heat.png (--heatmap), layout.png (--layout) and sweep.png (--sweep-phi / --sweep-a).
"""

import argparse
import json
import math
import struct
import sys
from pathlib import Path

from photoswap.settings import METHODS, PRESETS
from sd import cli
from sd.files import unwritable

EPILOG = """examples:
  python -m photoswap "a photo of a cat on the grass" --subject cat --concept "sks dog" \\
      --weights out/dreambooth-dog                       # a DreamBooth'd model, seed 0
  python -m photoswap "a photo of a cat" --subject cat --concept "<my-dog>" \\
      --embeds out/learned_embeds.safetensors --image cat.jpg --heatmap --layout
  python -m photoswap "a photo of a cat" --subject cat --concept "sks dog" --inversion cat.inv \\
      --sweep-phi 0 0.2 0.4 --sweep-a 0.2 0.4 0.6
  python -m photoswap "a red circle" --subject circle --concept square --model tiny --steps 10

Presets (fractions of the steps; see README): paper phi 0.2, M 0.5, A 0.4;
official phi 0.8, M 0, A 0.6; toy phi 0.8, M 0, A 1.0. Local blend from 0.2 of the
steps; p2p blends from the first step. Windows end as the official code's do: phi
through step int(f T), M below int(f T), A below int(f (T + 1))."""


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = cli.parser("python -m photoswap", __doc__, EPILOG)
    p.add_argument("prompt", help="the source prompt (describes the photo, if one is given)")
    p.add_argument("--subject", nargs="+", required=True, metavar="WORD",
                   help="the subject word(s) of the source prompt to swap (one per subject)")
    p.add_argument("--concept", nargs="+", required=True, metavar="WORDS",
                   help="what replaces each subject word, e.g. \"sks dog\" or \"<my-dog>\"")
    p.add_argument("--target", help="the target prompt (default: the prompt with each subject "
                   "word replaced by its concept)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--image", type=Path, help="a photo to swap into (inverted on the fly)")
    src.add_argument("--inversion", type=Path, help="a saved inversion (python -m sd invert)")
    p.add_argument("--fast", action="store_true", help="with --image: negative-prompt inversion")
    p.add_argument("--seed", type=int, default=0, help="without a photo: the source's noise seed "
                   "(also seeds --model tiny's random weights)")
    p.add_argument("--embeds", type=Path, help="a textual-inversion file defining the concept")
    p.add_argument("--method", choices=list(METHODS), default="photoswap",
                   help="; ".join(f"{name}: {what}" for name, what in METHODS.items()))
    p.add_argument("--preset", choices=list(PRESETS), default="paper",
                   help="the swaps' windows, layers and blend: paper (Gu et al. 2023), official "
                   "(the authors' notebook), toy (for the 64 px toy model; photoswap/settings.py)")
    for name, what in (("phi", "self-attention output"), ("m", "self-attention map"),
                       ("a", "cross-attention map")):
        p.add_argument(f"--{name}", type=float, metavar="F",
                       help=f"{what} window, fraction of the steps (default: the preset's)")
    p.add_argument("--blend-start", type=float, metavar="F", help="local blend from F * steps")
    p.add_argument("--no-blend", action="store_true", help="turn local blend off")
    p.add_argument("--mask", type=Path, help="an image (any size); the swap changes only where "
                   "it is bright")
    p.add_argument("--explicit", action="store_true", help="edit explicit fp32 maps, as the "
                   "official code (same result, more memory)")
    p.add_argument("--steps", type=int, help="DDIM steps (default 50, or the inversion's)")
    p.add_argument("--guidance", type=float, help="CFG scale (default 7.5, or the inversion's)")
    p.add_argument("--negative", default="", help="negative prompt (without a photo)")
    p.add_argument("--height", type=int, help="default: the model's resolution")
    p.add_argument("--width", type=int, help="default: the model's resolution")
    p.add_argument("--heatmap", action="store_true", help="also write heat.png")
    p.add_argument("--layout", action="store_true", help="also write layout.png (SVD, Fig. 3)")
    p.add_argument("--sweep-phi", type=float, nargs="+", metavar="F", help="phi windows")
    p.add_argument("--sweep-a", type=float, nargs="+", metavar="F", help="A windows")
    p.add_argument("-o", "--out", type=Path, default=Path("out/swap"), help="output folder")
    cli.add_model_options(p, weights_help="the concept model (a DreamBooth'd folder) or the base "
                          "model: diffusers folder or single-file checkpoint")
    return p.parse_args(argv)


def embeds_tokens(path: Path) -> list[str]:
    """Token names in a textual-inversion safetensors file, from its header (no torch needed)."""
    try:
        with open(path, "rb") as f:
            size = struct.unpack("<Q", f.read(8))[0]
            if size > path.stat().st_size - 8:  # text read as a header size is absurdly large
                raise ValueError("not a safetensors file")
            header = json.loads(f.read(size))
    except (OSError, ValueError, struct.error) as e:
        raise cli.UsageError(f"{path}: cannot be read as a textual-inversion file ({e})") from e
    return [k for k in header if k != "__metadata__"]


def check(args: argparse.Namespace) -> None:
    """Everything that can be checked before a model loads; raises UsageError."""
    windows = {"--phi": [args.phi], "--m": [args.m], "--a": [args.a],
               "--blend-start": [args.blend_start], "--sweep-phi": args.sweep_phi or [],
               "--sweep-a": args.sweep_a or []}
    for flag, values in windows.items():
        for value in values:
            if value is not None and not 0 <= value <= 1:
                raise cli.UsageError(f"{flag} {value} is outside [0, 1]: windows and the blend "
                                     "start are fractions of the steps")
    if args.method == "pnp" and (args.image is None or args.fast):
        raise cli.UsageError("pnp swaps into a photo, which it inverts its own way (DDIM under "
                             "the empty prompt): give --image, without --fast")
    if args.method in ("masactrl", "pnp"):
        used = {"--phi": args.phi is not None, "--m": args.m is not None,
                "--a": args.a is not None, "--blend-start": args.blend_start is not None,
                "--no-blend": args.no_blend, "--mask": args.mask, "--sweep-phi": args.sweep_phi,
                "--explicit": args.explicit}
        given = [flag for flag, on in used.items() if on]
        if given:
            raise cli.UsageError(f"{' '.join(given)}: Photoswap's and p2p's settings; "
                                 f"{args.method} has its published ones (photoswap/settings.py)")
    if len(args.concept) != len(args.subject):
        raise cli.UsageError(f"{len(args.subject)} subject word(s) but {len(args.concept)} "
                             "concept(s): give one --concept per --subject word")
    if (args.sweep_phi is None) != (args.sweep_a is None):
        raise cli.UsageError("a sweep needs both --sweep-phi and --sweep-a")
    if args.steps is not None and args.steps < 1:
        raise cli.UsageError(f"--steps must be at least 1, got {args.steps}")
    if args.guidance is not None and not math.isfinite(args.guidance):  # as sd.pipeline's
        raise cli.UsageError(f"--guidance {args.guidance}: give a finite number (0: the "
                             "unconditional model alone; 1: the prompt without guidance; 7.5: "
                             "the default)")
    if problem := unwritable(args.out, folder=True):
        raise cli.UsageError(f"-o: {problem}")
    multiple = 64 if args.image else 8  # sd.images.load_image crops photos to multiples of 64
    for flag, side in (("--height", args.height), ("--width", args.width)):
        if side is not None and (side <= 0 or side % multiple):
            raise cli.UsageError(f"{flag} must be a positive multiple of {multiple}, got {side}")
    if args.fast and args.image is None:
        raise cli.UsageError("--fast chooses how --image is inverted: give --image")
    for path in (args.image, args.inversion, args.embeds, args.mask, args.weights):
        if path is not None and not path.exists():
            raise cli.UsageError(f"{path}: no such file or folder")
    from sd.images import open_image  # noqa: PLC0415 (Pillow is quick; torch is not)

    for path in (args.mask, args.image):
        if path is not None:
            open_image(path)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    check(args)
    tokens = embeds_tokens(args.embeds) if args.embeds else []
    # The library and torch load only now: --help and usage errors are instant.
    from photoswap.cli import execute

    return execute(args, tokens)


if __name__ == "__main__":
    sys.exit(cli.run(main))
