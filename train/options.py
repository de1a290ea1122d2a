"""What the trainers' command lines share: their options, checking them, and how an error or a
Ctrl-C reaches the user.

Imports nothing heavy: a CLI parses and checks its arguments with this before torch loads (over
a second), so `--help` and usage errors answer at once.
"""

import argparse
import importlib
import math
import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

from sd import cli
from sd.config import DTYPE_NAMES, PRESETS
from sd.files import unwritable


def parser(prog: str, description: str, epilog: str, lr: float, steps: int,
           checkpoint_every: int, out: str) -> argparse.ArgumentParser:
    """The options every trainer takes, with the trainer's defaults; usage errors in one line."""
    p = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = lambda message: p.exit(2, f"error: {message} (see {prog} --help)\n")
    p.add_argument("instance_dir", type=Path, help="folder of images of the concept (jpg, png, "
                   "webp, ...; 3-20 are typical); unreadable files are skipped with a warning, "
                   "images smaller than --resolution are upscaled with a warning")
    p.add_argument("-o", "--out", type=Path, default=Path(out), help=f"output folder ({out})")
    p.add_argument("--model", choices=["auto", *PRESETS], default="auto",
                   help="sd2.1-base: 512 px, epsilon; sd2.1: 768 px, v-prediction; tiny: random "
                        "toy weights, for trying the code on a CPU (default: from the weights)")
    p.add_argument("--weights", type=Path, help="diffusers folder or single-file checkpoint "
                   "(default: weights/sd2.1-base, or weights/MODEL with --model)")
    p.add_argument("--steps", type=int, default=steps, help=f"optimizer steps ({steps})")
    p.add_argument("--lr", type=float, default=lr, help=f"AdamW learning rate ({lr:g}), not "
                   "scaled by the batch size")
    p.add_argument("--batch-size", type=int, default=1, help="images per step and per process; "
                   "the global batch is this x processes (1)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (1)")
    p.add_argument("--warmup-steps", type=int, default=0, help="linear warmup, then constant (0)")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="clip (1.0; 0: off)")
    p.add_argument("--resolution", type=int, help="training image side (default: the model's, "
                   "512 for sd2.1-base, 768 for sd2.1); a multiple of 8")
    p.add_argument("--center-crop", action="store_true", help="crop the centre of each image "
                   "(default: a random square, drawn anew every time an image is used)")
    p.add_argument("--flip", action="store_true", help="random horizontal flips (p = 0.5)")
    p.add_argument("--precision", choices=DTYPE_NAMES, default="fp32",
                   help="autocast dtype over fp32 master weights (fp32); fp16 adds a GradScaler; "
                        "bf16 is the usual choice on a recent GPU")
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing in the "
                   "UNet: much less memory, about a third slower")
    p.add_argument("--checkpoint-every", type=int, default=checkpoint_every, help="save "
                   f"out/checkpoint-N every N steps ({checkpoint_every}) and at the end; 0: at "
                   "the end only")
    p.add_argument("--keep", type=int, default=3, metavar="N", help="keep the newest N complete "
                   "checkpoints, removing older ones once a new one is complete (3; 0: all)")
    p.add_argument("--resume", metavar="CHECKPOINT", help='"latest" (the one out/latest names) '
                   "or a checkpoint folder: continues bit for bit (same options, same -o)")
    p.add_argument("--validate-every", type=int, default=0, metavar="N",
                   help="every N steps write out/validation-N.png, 2 images of "
                        "--validation-prompt (0: never)")
    p.add_argument("--validation-prompt", help="(default: the instance prompt / a photo of TOKEN)")
    p.add_argument("--validation-steps", type=int, default=50, help="DDIM steps (50)")
    p.add_argument("--seed", type=int, default=0, help="data order, crops, noise, timesteps (0)")
    p.add_argument("--device", help="cuda or cpu (default: cuda if present); under torchrun, "
                   "each process takes cuda:LOCAL_RANK")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    cli.add_threads(p)
    return p


def check(p: argparse.ArgumentParser, args: argparse.Namespace,
          *more: tuple[bool, str]) -> argparse.Namespace:
    """`args`, once every value that cannot work is refused (one line, exit code 2); `more`:
    the trainer's own (failed, message) pairs."""
    checks = [
        (args.steps < 1, "--steps: give 1 or more"),
        (args.batch_size < 1, "--batch-size: give 1 or more"),
        (args.grad_accum < 1, "--grad-accum: give 1 or more"),
        (not (math.isfinite(args.lr) and args.lr > 0), "--lr: give a positive number"),
        (args.warmup_steps < 0, "--warmup-steps: give 0 or more"),
        (not 0 <= args.max_grad_norm < math.inf, "--max-grad-norm: give 0 (no clipping) or more"),
        (args.resolution is not None and args.resolution < 8, "--resolution: give a multiple of 8"),
        (args.checkpoint_every < 0, "--checkpoint-every: give 0 (at the end only) or more"),
        (args.keep < 0, "--keep: give 0 (keep all) or more"),
        (args.validate_every < 0, "--validate-every: give 0 (never) or more"),
        (args.validation_steps < 1, "--validation-steps: give 1 or more"),
        *more,
    ]
    for failed, message in checks:
        if failed:
            p.error(message)
    if problem := unwritable(args.out, folder=True):
        p.error(f"-o: {problem}")
    return args


def main(prog: str, parse: Callable[[list[str] | None], argparse.Namespace], method: str,
         argv: list[str] | None) -> int:
    """`prog` (the command) parses, then runs train(args) of the module `method` (e.g.
    "train.finetune"), imported only
    now so that --help and usage errors answer before torch loads. A UsageError or WeightsError
    is printed as one `error:` line (exit code 2), a failure of the disk or memory too (exit code
    1, sd.cli's policy); Ctrl-C says how to resume (exit code 130)."""
    args = parse(argv)
    train = importlib.import_module(method).train
    from sd.weights import resolve

    try:
        cli.threads(args.threads, resolve(args.model, args.weights)[0])
        train(args)
    except ValueError as e:  # UsageError, WeightsError: what was given
        print(f"error: {cli.one_line(e)}{cli.advice(e)}", file=sys.stderr)
        return cli.USAGE
    except (OSError, MemoryError) as e:
        print(f"error: {cli.one_line(e)}", file=sys.stderr)
        return cli.FAILED
    except KeyboardInterrupt:
        if os.environ.get("RANK", "0") == "0":  # under torchrun, one rank speaks
            print(interrupted(prog, args.out, sys.argv[1:] if argv is None else argv),
                  file=sys.stderr)
        return 130
    return 0


def interrupted(prog: str, out: Path, argv: list[str]) -> str:
    """What to say on Ctrl-C: where the last complete checkpoint is and how to go on from it."""
    latest = out / "latest"
    if not latest.is_file():
        return f"interrupted before the first checkpoint: nothing to resume in {out}"
    kept, rest = [], iter(argv)
    for a in rest:  # the same command without its --resume, if it had one
        if a == "--resume":
            next(rest, None)
        elif not a.startswith("--resume="):
            kept.append(a)
    command = prog + " " + shlex.join([*kept, "--resume", "latest"])
    return (f"interrupted; the last complete checkpoint is {out / latest.read_text().strip()}. "
            f"Continue with:\n    {command}")
