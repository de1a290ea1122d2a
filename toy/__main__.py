"""python -m toy COMMAND ...: the toy world's commands (make toy, make swap, make eval-toy).

Parsing, --help and usage errors load no torch: what each command runs is imported inside its
function below, once its arguments parse.
"""

import argparse
import sys
from pathlib import Path

from sd import cli
from toy import concepts, scenes
from toy.settings import DEMO, TWO

WEIGHTS = Path("weights/toy")
CACHE = Path("out/toy/concepts")
NAMES = sorted(concepts.CONCEPTS)
RAW = argparse.RawDescriptionHelpFormatter

PRETRAIN = """Pretrain the toy model (sd.config.TOY) on the toy world: the VAE, then text
encoder + UNet (toy/pretrain.py; the recipes and the measurements behind them:
weights/toy/README.md).

examples:
  python -m toy pretrain vae     --run out/toyrun      # stage 1 (resumes if interrupted)
  python -m toy pretrain decoder --run out/toyrun      # stage 1b: the decoder alone
  python -m toy pretrain unet    --run out/toyrun      # stage 2, on stage 1's encoder
  python -m toy pretrain unet-more --run out/toyrun    # stage 2b: a second cycle from 2's EMA
  python -m toy pretrain export  --run out/toyrun -o weights/toy
  python -m toy pretrain all     --run out/toyrun -o weights/toy   # every stage in turn

Each stage keeps checkpoints in RUN/STAGE/checkpoint-N/ (rerunning it resumes from the newest,
bit for bit) and its evaluations in RUN/STAGE/log.csv."""

SWAP = """`make swap` on the toy world: the whole method, offline, on a CPU, measured
against exact masks.

examples:
  python -m toy swap --weights weights/toy              # the default concept and scene
  python -m toy swap --concept striped-heart --scene 3 -o out/toy/swap

Steps: DreamBooth the concept (toy/concepts.py: 5 reference images, "a photo of sks <class>") into
CACHE/<name>-<base digest>/model, cached with the recipe and a digest of the reference
images; draw held-out scene --scene (toy/scenes.py's test split; a quarter of them hold two
subjects, the first is swapped); null-text invert it with the concept model (as the official code
does); swap its subject ("a black star" -> "a sks star") with `photoswap` (the toy preset of
photoswap/control.py), `p2p` and `none` from the inversion; score each output: background PSNR
against the scene rendered without the subject, layout IoU against the subject's exact mask,
identity with the concept's references (toy/identity.py), and colour and texture statistics
(toy/metrics.py). Writes images, grid.png (source | photoswap | p2p | none, then the references)
and metrics.json to the -o folder, and prints the scores. The default concept and scene are the
benchmark's median swap (EVAL.md says how it is chosen)."""

EVALUATE = """The swap benchmark (`make eval-toy`): held-out toy scenes x the concepts, for
photoswap, p2p and none, scored against ground truth, with the paper's pairwise table; and
DreamBooth's acceptance. Writes the table (markdown) to the -o file, each concept's pictures
and results.json to the --pictures folder. How each number is computed: toy/evaluate.py.

examples:
  python -m toy evaluate --weights weights/toy              # 16 scenes x 4 concepts
  python -m toy evaluate --weights weights/toy --scenes 4   # quicker"""

IDENTITY = """Train the toy world's identity encoder
(toy/identity.py; about 6 CPU minutes), then validate it and print the report.

example:
  python -m toy identity -o out/toyrun/identity.safetensors"""

JUDGE = """Train the toy world's judge (toy/judge.py; about 30 CPU minutes), a CNN that
reads a single-subject scene's shape, colour and texture, and print its accuracy on held-out
scenes.

example:
  python -m toy judge -o out/toyrun/judge.pt"""


def pretrain_options(c: argparse.ArgumentParser) -> None:
    c.add_argument("stage", choices=["vae", "decoder", "unet", "unet-more", "export", "all"],
                   help="vae, then decoder (the decoder alone, encoder frozen), then unet (text "
                   "encoder + UNet), then unet-more (a second learning-rate cycle from unet's "
                   "EMA weights), then export; all: each in turn, resuming what is done")
    c.add_argument("--run", type=Path, default=Path("out/toyrun"),
                   help="folder of the stages' checkpoints, logs and caches (out/toyrun)")
    c.add_argument("-o", "--out", type=Path, default=WEIGHTS,
                   help="folder the export stage writes the model to (weights/toy)")
    c.add_argument("--seed", type=int, default=0, help="(0)")
    c.add_argument("--more-threads", nargs=2, metavar=("N", "FILE"),
                   help="the UNet stages: N threads once FILE exists (make toy: the other job "
                   "slot's last file, so the UNet takes the core it frees)")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def swap_options(c: argparse.ArgumentParser) -> None:
    c.add_argument("--weights", type=Path, default=WEIGHTS, help="the toy model (weights/toy)")
    c.add_argument("--concept", choices=NAMES, default=DEMO[0],
                   help=f"the concept to swap in ({DEMO[0]})")
    caption = scenes.caption(scenes.test_scene(DEMO[1], two=TWO))  # toy/swap.py source's
    c.add_argument("--scene", type=int, default=DEMO[1],
                   help=f"held-out scene index ({DEMO[1]}: {caption[11:]})")
    c.add_argument("--cache", type=Path, default=CACHE,
                   help="folder where DreamBooth'd concepts are kept (out/toy/concepts)")
    c.add_argument("-o", "--out", type=Path, default=Path("out/swap"),
                   help="output folder: images, grid.png, metrics.json (out/swap)")


def evaluate_options(c: argparse.ArgumentParser) -> None:
    c.add_argument("--weights", type=Path, default=WEIGHTS, help="the toy model (weights/toy)")
    c.add_argument("--scenes", type=int, default=16, help="held-out scenes per concept (16: "
                   "scenes 0-15)")
    c.add_argument("--concepts", nargs="+", choices=NAMES, default=NAMES, metavar="CONCEPT",
                   help=f"the concepts to swap in (all: {' '.join(NAMES)})")
    c.add_argument("--cache", type=Path, default=CACHE,
                   help="folder where DreamBooth'd concepts are kept (out/toy/concepts)")
    c.add_argument("-o", "--out", type=Path, default=Path("EVAL.md"),
                   help="the table file to write, markdown (EVAL.md)")
    c.add_argument("--pictures", type=Path, default=Path("out/eval"),
                   help="folder for each concept's outputs (a grid, CONCEPT.png) and "
                   "results.json, the scores per scene and concept (out/eval)")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress lines or bars")


def identity_options(c: argparse.ArgumentParser) -> None:
    c.add_argument("-o", "--out", type=Path, required=True,
                   help="the encoder file to write (.safetensors)")
    c.add_argument("--count", type=int, default=2000, help="object pairs (2000)")
    c.add_argument("--steps", type=int, default=3000, help="(3000)")
    c.add_argument("--seed", type=int, default=0, help="(0)")


def judge_options(c: argparse.ArgumentParser) -> None:
    c.add_argument("-o", "--out", type=Path, required=True,
                   help="the judge file to write (.pt, or .safetensors)")
    c.add_argument("--count", type=int, default=30000, help="training scenes (30000)")
    c.add_argument("--steps", type=int, default=10000, help="batches of 64 (10000)")
    c.add_argument("--seed", type=int, default=0, help="(0)")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def parser() -> argparse.ArgumentParser:
    p = cli.parser("python -m toy", __doc__.split("\n")[0])
    sub = p.add_subparsers(title="commands", metavar="COMMAND", required=True)
    for name, options, run, oneline, description in COMMANDS:
        c = sub.add_parser(name, help=oneline, description=description, formatter_class=RAW)
        c.error = lambda m, c=c: c.exit(cli.USAGE, f"error: {m} (see {c.prog} --help)\n")
        c.set_defaults(handler=run)
        options(c)
        cli.add_threads(c)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = parser().parse_args(argv)
    return args.handler(args, argv) or 0


# ------------------------------------------------ what each command runs, once its arguments parse

def threads(requested: int | None) -> None:
    """The thread policy (sd/cli.py) for the toy model: one thread unless asked for more."""
    from sd.config import TOY

    cli.threads(requested, TOY)


def pretrain(args: argparse.Namespace, argv: list[str]) -> None:
    cli.writable(args.run, "--run", folder=True)
    if args.stage in ("export", "all"):
        cli.writable(args.out, folder=True)
    if args.more_threads:
        n, file = args.more_threads
        if not n.isdigit() or int(n) < 1:
            raise cli.UsageError(f"--more-threads: N is a whole number of 1 or more, not {n!r}")
    from toy import pretrain as lib

    threads(args.threads)
    progress = not args.quiet
    more = args.more_threads and lib.MoreThreads(int(n), Path(file))
    if args.stage in ("vae", "all"):
        lib.train_vae(args.run, args.seed, progress)
    if args.stage in ("decoder", "all"):
        lib.train_decoder(args.run, args.seed, progress)
    if args.stage in ("unet", "all"):
        lib.train_unet(args.run, args.seed, progress, more=more)
    if args.stage in ("unet-more", "all"):
        lib.train_unet_more(args.run, args.seed, progress, more)
    if args.stage in ("export", "all"):
        print(lib.export(args.run, args.out))


def swap(args: argparse.Namespace, argv: list[str]) -> None:
    if args.scene < 0:
        raise cli.UsageError("--scene: give 0 or more")
    cli.writable(args.out, folder=True)
    import time

    from photoswap.settings import METHODS
    from toy import metrics
    from toy import swap as lib

    lib.check_model(args.weights)
    threads(args.threads)
    started = time.time()
    model = lib.concept_model(args.concept, args.weights, args.cache, quiet=False)
    trained = time.time()
    pipe = lib.toy_pipeline(model)
    src = lib.source(args.scene)
    inv = lib.invert_source(pipe, src, progress=True)
    inverted = time.time()
    target, words = lib.target_prompt(src, args.concept)
    images = lib.swaps(pipe, [src], [inv], [words])
    scorer = lib.measure(args.concept, args.weights)
    results = {m: lib.score(images[m][0], src, scorer) for m in METHODS}
    results["reconstruction"] = lib.score(images["source"][0], src, scorer)  # the source branch
    results["photo"] = lib.score(src.image, src, scorer)  # unswapped, for scale
    record = {"concept": args.concept, "scene": args.scene, "source_prompt": src.caption,
              "target_prompt": target, "weights": str(args.weights), "steps": lib.STEPS,
              "guidance": lib.GUIDANCE, "preset": "toy", "dreambooth": lib.DREAMBOOTH,
              "metrics": results,
              "reconstruction_psnr": metrics.psnr(images["source"][0], src.image),
              "seconds": {"dreambooth": round(trained - started, 1),
                          "inversion": round(inverted - trained, 1),
                          "swaps": round(time.time() - inverted, 1)}}
    write_swap(args.out, src, images, concepts.references(args.concept), record)
    print(f"{src.caption!r} -> {target!r}")
    print(f"{'':14s} {'bg PSNR':>8s} {'IoU':>6s} {'identity':>8s} {'colour':>6s} {'texture':>7s}")
    for m in (*METHODS, "reconstruction", "photo"):
        r = results[m]
        print(f"{m:14s} {r['background_psnr']:8.2f} {r['layout_iou']:6.3f} {r['identity']:8.3f} "
              f"{r['colour']:6.3f} {r['texture']:7.3f}")
    print(f"inversion reconstructs the photo at {record['reconstruction_psnr']:.2f} dB; "
          f"seconds {record['seconds']}; wrote the pictures, grid.png, metrics.json to {args.out}")


def write_swap(out: Path, src, images: dict, refs: list, record: dict) -> None:
    """The swap's pictures, grid.png (source and methods over the first four references) and
    metrics.json, into `out`."""
    import numpy as np
    from PIL import Image

    from photoswap.settings import METHODS
    from photoswap.visual import label
    from sd.files import atomic_write
    from sd.images import grid, save_image
    from toy.swap import to_json

    pil: dict[str, np.ndarray] = {"photo.png": src.image, "reconstruction.png": images["source"][0],
                                  **{f"{m}.png": images[m][0] for m in METHODS}}

    def big(a: np.ndarray) -> Image.Image:
        return Image.fromarray(a).resize((128, 128), Image.Resampling.NEAREST)

    top = [label(big(src.image), "source")] + [label(big(images[m][0]), m) for m in METHODS]
    bottom = [label(big(im), f"ref {i}") for i, (im, _) in enumerate(refs[:4])]
    out.mkdir(parents=True, exist_ok=True)
    for name, a in pil.items():
        save_image(Image.fromarray(a), out / name)
    save_image(grid([top, bottom]), out / "grid.png")
    with atomic_write(out / "metrics.json") as tmp:
        tmp.write_text(to_json(record))


def evaluate(args: argparse.Namespace, argv: list[str]) -> None:
    if args.scenes < 1:
        raise cli.UsageError("--scenes: give 1 or more")
    cli.writable(args.out)
    cli.writable(args.pictures, "--pictures", folder=True)
    import time

    from sd.files import atomic_write
    from toy import evaluate as lib
    from toy import swap as toyswap

    toyswap.check_model(args.weights)
    threads(args.threads)
    started = time.time()
    result = lib.evaluate(args.weights, args.scenes, args.concepts, args.cache, args.pictures,
                          not args.quiet)
    command = "python -m toy " + " ".join(argv)
    text = lib.table(result, command.strip(), args.weights, args.scenes, time.time() - started)
    with atomic_write(args.out) as tmp:
        tmp.write_text(text)
    with atomic_write(args.pictures / "results.json") as tmp:  # per scene and concept
        tmp.write_text(toyswap.to_json(result))
    print(text)


def identity(args: argparse.Namespace, argv: list[str]) -> None:
    cli.writable(args.out)
    from toy import identity as lib

    threads(args.threads)
    print(lib.train(args.out, args.count, args.steps, args.seed))


def judge(args: argparse.Namespace, argv: list[str]) -> None:
    cli.writable(args.out)
    from toy import judge as lib

    threads(args.threads)
    print(lib.train(args.out, args.count, args.steps, args.seed, progress=not args.quiet))


COMMANDS = [  # name, its options, what it runs, its line in `python -m toy --help`, its --help
    ("pretrain", pretrain_options, pretrain,
     "train the toy model, stage by stage (make toy; hours)", PRETRAIN),
    ("swap", swap_options, swap, "Photoswap a concept into a held-out scene, scored (make swap)",
     SWAP),
    ("evaluate", evaluate_options, evaluate,
     "the swap benchmark over held-out scenes x concepts, into EVAL.md (make eval-toy)", EVALUATE),
    ("identity", identity_options, identity, "train and validate the identity encoder (make toy)",
     IDENTITY),
    ("judge", judge_options, judge, "train the judge of shapes, colours and textures (make toy)",
     JUDGE),
]


if __name__ == "__main__":
    sys.exit(cli.run(main))
