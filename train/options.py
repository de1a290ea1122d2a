"""What the trainers' command lines share: their options and how an error reaches the user.

Imports nothing heavy: a CLI parses its arguments with this before torch loads (over a second),
so `--help` and usage errors answer at once.
"""

import argparse
import importlib
import sys
from collections.abc import Callable
from pathlib import Path

from sd.config import DTYPE_NAMES, PRESETS
from train import UsageError


def add_arguments(p: argparse.ArgumentParser, lr: float, steps: int, checkpoint_every: int,
                  out: str) -> None:
    """The options both trainers take (the trainer gives its own defaults)."""
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


def main(parse: Callable[[list[str] | None], argparse.Namespace], method: str,
         argv: list[str] | None) -> int:
    """Parse, then run train(args) of the module `method` (e.g. "train.finetune"), imported only
    now so that --help and usage errors answer before torch loads. A UsageError or WeightsError
    is printed as one `error:` line, with exit code 2."""
    args = parse(argv)
    train = importlib.import_module(method).train
    from sd.weights import WeightsError

    try:
        train(args)
    except (UsageError, WeightsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
