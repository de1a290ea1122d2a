"""python -m recipes COMMAND ...: the research recipes on the command line.

    python -m recipes heatmap --toy 50 --weights weights/toy -o out/heat.png
    python -m recipes correspondence source.png target.png --point 120 200 -o out/match.png
    python -m recipes cds photo.png --source "a cat" --target "a dog" -o out/edit.png

`python -m recipes COMMAND --help` explains a command and every setting. Each `--toy`
evaluation scores its recipe on held-out toy scenes with exact masks and keypoints
(toy/heldout.py), prints one result line, and with -o draws the first four scenes.
"""

import argparse
import sys
from collections.abc import Callable
from dataclasses import fields, replace
from pathlib import Path
from typing import NamedTuple

from recipes.settings import (
    CDS_HELP,
    CDS_PRESETS,
    CORRESPONDENCE_HELP,
    CORRESPONDENCE_PRESETS,
)
from sd import cli

HEATMAP = """Heat maps of a given image (DAAM, Tang et al. 2023), scored on the toy world
(recipes/heatmap.py): each scene's latent is noised to every timestep of a DDIM schedule and
denoised once with its caption; the shape word's thresholded map is scored by IoU against the
scene's exact subject mask, beside a centred blob (a centred Gaussian thresholded the same way:
the baseline any layout prior would reach).

    python -m recipes heatmap --toy 50 --weights weights/toy -o out/heat.png  # mean IoU, blob
"""

CORRESPONDENCE = """Unsupervised semantic correspondence (Hedlin et al., NeurIPS 2023;
recipes/correspondence.py): a free text embedding is optimised so that the cross-attention map
of its first token peaks at a query point of the source image; on the target image the argmax of
the same map is the answer. Presets: `paper`, the authors' released settings; `toy`, for the
64 px toy model (a 40x larger rate, fewer steps, initialisations and crops).

    python -m recipes correspondence source.png target.png --point 120 200 -o out/match.png
    python -m recipes correspondence --toy 30 --preset toy --batch 12 --weights weights/toy
"""

CDS = """Text-guided editing by Delta Denoising Score (Hertz et al. 2023) and Contrastive
Denoising Score (Nam et al., CVPR 2024; recipes/cds.py): the photo's latent is optimised along
the difference of the guided noise predictions for the target and the source prompt; CDS adds a
patch-wise contrastive loss between the source's and the target's decoder self-attention
features, which keeps the photo's structure (--w-cut 0: DDS alone). Settings: the CDS authors'.

    python -m recipes cds photo.png --source "a cat" --target "a dog" -o out/edit.png
    python -m recipes cds --toy 8 --weights weights/toy -o out/cds.png  # background PSNR
"""

EDIT = Path("out/edit.png")  # where cds writes the edited image without -o


# --------------------------------------------------------------------------- shared options

def model_options(p: argparse.ArgumentParser) -> None:
    """The shared model options (sd/cli.py; the model in fp32 unless --dtype), and --seed."""
    cli.add_model_options(p, "fp32")
    p.add_argument("--seed", type=int, default=0, help="seed of every random draw (default 0)")


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


def open_model(args: argparse.Namespace):
    """The pipeline the options name; says on stderr which model it is. Raises WeightsError,
    or ValueError for a device this machine lacks."""
    from sd.weights import resolve

    cfg, weights, why = resolve(args.model, args.weights)
    return cli.open_pipeline(cfg, weights, why, args.device, args.dtype, args.threads)


# --------------------------------------------------------------------------- the parsers

def heatmap_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--toy", type=int, metavar="SCENES", required=True,
                   help="held-out one-subject toy scenes to score (the README's numbers: --toy "
                   "50 at the defaults, about 1.5 min on one CPU thread)")
    p.add_argument("--steps", type=int, default=50, help="timesteps the maps are summed over "
                   "(a DDIM schedule, default 50)")
    p.add_argument("--guidance", type=float, default=7.5, help="CFG scale of each evaluation "
                   "(default 7.5; the maps read the conditional half either way)")
    p.add_argument("--threshold", type=float, default=0.4, help="tau on the normalised map "
                   "(default 0.4, DAAM's)")
    model_options(p)
    p.add_argument("-o", "--out", type=Path, help="picture of the first 4 scenes (one image "
                   "file): photo, map, mask against the exact mask")


def correspondence_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", nargs="?", type=Path, help="image holding the query points")
    p.add_argument("target", nargs="?", type=Path, help="image to find the points in")
    p.add_argument("--point", nargs=2, type=float, metavar=("X", "Y"), action="append",
                   help="a query, in the source image's pixels (x right, y down); repeatable")
    p.add_argument("--toy", type=int, metavar="PAIRS", help="instead: PCK on PAIRS held-out toy "
                   "scene pairs (the README's numbers: --toy 30 --preset toy --batch 12, a few "
                   "minutes on one CPU thread; -o draws the first 4 pairs)")
    p.add_argument("--alpha", type=float, default=0.1, help="PCK threshold, a fraction of the "
                   "image side (default 0.1)")
    p.add_argument("--batch", type=int, default=5, help="embeddings optimised at once (points x "
                   "initialisations); the answer does not depend on it (default 5)")
    settings_options(p, CORRESPONDENCE_PRESETS, CORRESPONDENCE_HELP)
    model_options(p)
    p.add_argument("-o", "--out", type=Path, help="picture (one image file): sources with the "
                   "queries, targets with the answers (rings) and the truth (dots), the first "
                   "point's map")


def cds_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", nargs="?", type=Path, help="the photo to edit")
    p.add_argument("--source", help="a prompt describing the photo")
    p.add_argument("--target", help="the same prompt, changed as the photo should change")
    p.add_argument("--toy", type=int, metavar="SCENES", help="instead: recolour the subject of "
                   "SCENES held-out toy scenes with DDS and CDS; report background and subject "
                   "PSNR (the README's numbers: --toy 8, about 30 s a scene on one CPU thread)")
    settings_options(p, CDS_PRESETS, CDS_HELP)
    model_options(p)
    p.add_argument("-o", "--out", type=Path, help=f"the edited image, a file (default {EDIT}); "
                   "with --toy: the first 4 scenes' photo, exact edit, DDS and CDS")


# --------------------------------------------------------------------------- checks

def check_heatmap(args: argparse.Namespace) -> None:
    if args.out:
        cli.writable(args.out)
    if args.toy < 1 or args.steps < 1 or not 0 <= args.threshold <= 1:
        raise cli.UsageError("--toy and --steps must be at least 1, --threshold within 0 to 1")


def check_correspondence(args: argparse.Namespace) -> None:
    s = args.settings
    if args.out:
        cli.writable(args.out)
    if args.toy is None and (args.target is None or args.point is None):
        raise cli.UsageError("give SOURCE TARGET --point X Y, or --toy PAIRS")
    pairs = 1 if args.toy is None else args.toy
    if min(s.steps, s.inits, s.crops, s.layers, args.batch, pairs) < 1:
        raise cli.UsageError("--steps, --inits, --crops, --layers, --batch and --toy: give 1 or "
                             "more")
    if not -s.schedule <= s.noise_index < s.schedule:
        raise cli.UsageError(f"--noise-index: give -{s.schedule} to {s.schedule - 1} "
                             "(--schedule steps)")
    if not (0 < s.crop <= 1 and s.sigma > 0 and args.alpha > 0):
        raise cli.UsageError("--crop: give more than 0, up to 1; --sigma and --alpha: give "
                             "positive numbers")


def check_cds(args: argparse.Namespace) -> None:
    s = args.settings
    cli.writable(args.out or EDIT)
    if args.toy is None and (args.image is None or args.source is None or args.target is None):
        raise cli.UsageError("give IMAGE --source PROMPT --target PROMPT, or --toy SCENES")
    counts = (s.iterations, s.patches, *s.patch_sizes, 1 if args.toy is None else args.toy)
    if min(counts) < 1:
        raise cli.UsageError("--iterations, --patches, --patch-sizes and --toy: give 1 or more")
    if not 0 <= s.t_min < s.t_max <= 1000 or s.temperature <= 0:
        raise cli.UsageError("need 0 <= --t-min < --t-max <= 1000 and a positive --temperature")


# --------------------------------------------------------------------------- the commands
# Each imports its library (and torch) only here: --help and usage errors answer before.

def heatmap(args: argparse.Namespace) -> int:
    from recipes.heatmap import evaluate_toy, picture
    from sd.images import image_format, save_image

    if args.out:
        image_format(args.out)
    pipe = open_model(args)
    r, shown = evaluate_toy(pipe, args.toy, args.steps, args.guidance, args.threshold,
                            args.seed)
    print(f"mean IoU of the shape word's mask with the exact subject mask: {r['mean iou']:.3f} "
          f"(centred blob {r['centred blob iou']:.3f}; {args.toy} toy scenes, tau "
          f"{args.threshold:g}, {args.steps} timesteps)")
    if args.out:
        save_image(picture(shown[:4], args.threshold), args.out)
        print(f"wrote {args.out}")
    return 0


def correspondence(args: argparse.Namespace) -> int:
    import torch

    from recipes.correspondence import correspond, evaluate_toy, picture
    from sd.images import image_format, load_image, open_image, rgb, save_image

    # What the user gave is checked before the model loads.
    if args.out:
        image_format(args.out)
    if args.toy is None:
        for path in (args.source, args.target):
            load_image(path, 64, 64)
        w, h = rgb(open_image(args.source)).size  # as displayed, and as load_image crops it
        unit = [[(p - (n - min(w, h)) / 2) / min(w, h) for p, n in zip(q, (w, h))]
                for q in args.point]
        if bad := [q for q, u in zip(args.point, unit) if not all(0 <= v < 1 for v in u)]:
            raise ValueError(f"--point {bad[0][0]:g} {bad[0][1]:g} is outside the centre "
                             f"square of the {w}x{h} source image")
    pipe = open_model(args)
    side = pipe.cfg.resolution
    if args.toy is not None:
        r, rows = evaluate_toy(pipe, args.toy, args.alpha, args.settings, args.seed,
                               args.batch, not args.quiet)
        print(f"PCK@{args.alpha:g}: {r['pck']:.3f} over {r['keypoints']} keypoints of "
              f"{args.toy} toy pairs (chance {r['chance']:.3f}, copying the source point "
              f"{r['copy']:.3f}; preset {args.preset})")
    else:
        source, target = (load_image(p, side, side) for p in (args.source, args.target))
        points = torch.tensor(unit) * side
        found, heat = correspond(pipe, source, target, points, args.settings, args.seed,
                                 args.batch, not args.quiet)
        rows = [(source, target, points, found, None, heat[0])]
        for p, f in zip(points.tolist(), found.tolist()):  # as the model sees the images
            print(f"query ({p[0]:.1f}, {p[1]:.1f}) -> ({f[0]:.1f}, {f[1]:.1f}) in the "
                  f"{side}x{side} centre squares")
    if args.out:
        save_image(picture(rows[:4]), args.out)
        print(f"wrote {args.out}")
    return 0


def cds(args: argparse.Namespace) -> int:
    import torch

    from recipes.cds import edit, evaluate_toy
    from sd.images import grid, image_format, load_image, save_image, to_pil

    s, out = args.settings, args.out or EDIT
    # What the user gave is checked before the model loads.
    image_format(out)
    if args.toy is None:
        load_image(args.image, 64, 64)
    pipe = open_model(args)
    if args.toy is not None:
        r, shown = evaluate_toy(pipe, args.toy, s, args.seed, not args.quiet)
        print(f"background PSNR outside the subject: DDS {r['dds background']:.2f} dB, CDS "
              f"{r['cds background']:.2f} dB; subject PSNR against the exact edit: DDS "
              f"{r['dds subject']:.2f}, CDS {r['cds subject']:.2f}, unedited "
              f"{r['unedited subject']:.2f} dB ({args.toy} toy scenes)")
        if args.out:  # rows: photo, exact edit, DDS, CDS; shown 4x
            tiles = [[im.resize((256, 256), 0) for im in to_pil(torch.cat(row))]
                     for row in shown[:4]]
            save_image(grid(tiles), args.out)
            print(f"wrote {args.out}")
        return 0
    z = pipe.encode(args.image)
    edited = edit(pipe, z, args.source, args.target, s, args.seed, not args.quiet)
    save_image(to_pil(pipe.decode(edited.to(pipe.dtype)))[0], out)
    print(f"wrote {out}")
    return 0


# --------------------------------------------------------------------------- the table

class Command(NamedTuple):
    line: str  # in python -m recipes --help's list
    description: str  # of python -m recipes NAME --help
    options: Callable[[argparse.ArgumentParser], None]
    check: Callable[[argparse.Namespace], None]  # raises UsageError
    run: Callable[[argparse.Namespace], int]
    presets: dict | None = None  # its settings' presets (recipes/settings.py)


COMMANDS = {
    "heatmap": Command("DAAM heat maps of a given image, scored on the toy world", HEATMAP,
                       heatmap_options, check_heatmap, heatmap),
    "correspondence": Command("semantic correspondence (Hedlin et al. 2023): a point's match in "
                              "another image", CORRESPONDENCE, correspondence_options,
                              check_correspondence, correspondence, CORRESPONDENCE_PRESETS),
    "cds": Command("DDS and CDS editing of a photo by a prompt change", CDS, cds_options,
                   check_cds, cds, CDS_PRESETS),
}


def parser(name: str | None = None) -> argparse.ArgumentParser:
    """The parser of command `name`; without one, of `python -m recipes` itself (--help)."""
    if name is None:
        width = max(map(len, COMMANDS)) + 2
        listing = "".join(f"  {n:{width}}{c.line}\n" for n, c in COMMANDS.items())
        p = cli.parser("python -m recipes", __doc__, f"commands:\n{listing}")
        p.usage = "python -m recipes [-h] COMMAND [OPTIONS]"
        p.add_argument("command", choices=list(COMMANDS), metavar="COMMAND",
                       help="one of the commands below; OPTIONS: see its --help")
        return p
    p = cli.parser(f"python -m recipes {name}", COMMANDS[name].description)
    COMMANDS[name].options(p)
    return p


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, checked as far as it can be before a model loads (UsageError); with
    `settings`, the preset with the options put in, for the commands that have settings."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS:
        parser().parse_args(argv[:1])  # --help, or an error naming the commands: exits
    args = parser(argv[0]).parse_args(argv[1:])
    args.command = argv[0]
    command = COMMANDS[args.command]
    if command.presets:
        args.settings = settings_from(args, command.presets)
    command.check(args)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    return COMMANDS[args.command].run(args)


if __name__ == "__main__":
    sys.exit(cli.run(main))
