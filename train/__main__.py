"""python -m train dreambooth|textual-inversion IMAGES ... : teach SD a concept from a few images.

  dreambooth          fine-tune SD on a subject bound to a rare token ("a photo of sks dog"),
                      optionally with prior preservation (Ruiz et al. 2023); train/dreambooth.py
  textual-inversion   learn the embedding of a NEW token ("<my-dog>"), every weight of the model
                      unchanged (Gal et al. 2022); train/textual_inversion.py

`python -m train COMMAND --help` lists a command's options. The same settings from Python, with no
command line: train/settings.py (DreamBoothSettings, TextualInversionSettings).
"""

import argparse
import os
import shlex
import sys
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace

from sd import cli
from sd.config import DTYPE_NAMES, PRESETS
from train.settings import TEMPLATES, DreamBoothSettings, TextualInversionSettings

DREAMBOOTH_ABOUT = """DreamBooth (Ruiz et al. 2023, arXiv:2208.12242): fine-tune SD 2.1 on a
few images of a subject bound to a rare token ("a photo of sks dog"), optionally with prior
preservation.

Photoswap (Gu et al. 2023, arXiv:2307.03157) learns its target concept this way: SD 2.1, UNet and
text encoder, AdamW, lr 1e-6, 800 steps; those are the defaults here (add --train-text-encoder).
The method is train/dreambooth.py, the loop train/loop.py."""

TEXTUAL_INVERSION_ABOUT = """Textual inversion (Gal et al. 2022, arXiv:2208.01618): learn the
embedding of a NEW token ("<my-dog>") from a few images; every weight of the model stays as it
was. The method is train/textual_inversion.py, the loop train/loop.py."""

DREAMBOOTH = """examples:
  # Photoswap's setting, on one GPU (bf16 and checkpointing to save memory):
  python -m train dreambooth photos/my-dog --instance-prompt "a photo of sks dog" \\
      --train-text-encoder --class-prompt "a photo of a dog" --class-dir out/class-dog \\
      --weights weights/sd2.1 --precision bf16 --checkpointing -o out/my-dog
  python -m sd "a photo of sks dog on the beach" --weights out/my-dog/model

  # the same on 4 GPUs: each process takes --batch-size images (global batch 4); add
  # --batch-size 4 to a 1-process run and it sees the same examples in the same order
  torchrun --nproc_per_node 4 -m train dreambooth photos/my-dog ...

  # interrupted? the same command with --resume latest continues bit for bit
  # try the code on a CPU without weights (random tiny model):
  python -m train dreambooth photos/my-dog --instance-prompt "a photo of sks dog" \\
      --model tiny --steps 20 --lr 1e-4

Output, in -o:
  checkpoint-N/   unet/ (+ text_encoder/ if trained) in the diffusers layout, and state.pt
                  (optimizer, GradScaler, random states, step); `latest` names the newest one.
                  Written as checkpoint-N.tmp/ then renamed: a killed save never breaks one.
  model/          the final model, all three components + MODEL (the frozen ones copied), so
                  `python -m sd --weights OUT/model` and diffusers'
                  UNet2DConditionModel.from_pretrained("OUT/model/unet") load it.
  validation-N.png  with --validate-every N.
The token: DreamBooth binds the subject to an existing, rarely used token ("sks"), on purpose;
to add a NEW token instead, use textual inversion (python -m train textual-inversion)."""

TEXTUAL_INVERSION = """examples:
  python -m train textual-inversion photos/my-dog --token "<my-dog>" --init-word dog \\
      --weights weights/sd2.1-base -o out/my-dog-ti
  # then draw with the learned token (--concepts loads it):
  python -m sd "a photo of <my-dog> on the beach" --weights weights/sd2.1-base \\
      --concepts out/my-dog-ti/learned_embeds.safetensors -o out/dog.png

  # try the code on a CPU without weights (random tiny model):
  python -m train textual-inversion photos/my-dog --token "<my-dog>" --model tiny --steps 20

Output, in -o: learned_embeds.safetensors ({token: vector}, loaded by `python -m sd --concepts`
and sd.pipeline.Pipeline.add_concepts), checkpoint-N/ (the vector and state.pt; `latest` names the
newest, --resume latest continues bit for bit), validation-N.png with --validate-every N.
Multi-GPU: torchrun --nproc_per_node N -m train textual-inversion ... (as dreambooth)."""


def common(prog: str, description: str, epilog: str, d) -> argparse.ArgumentParser:
    """The options every trainer takes, with the defaults of its settings `d`."""
    p = cli.parser(prog, description, epilog)
    p.add_argument("instance_dir", type=Path, help="folder of images of the concept (jpg, png, "
                   "webp, ...; 3-20 are typical); unreadable files are skipped with a warning, "
                   "images smaller than --resolution are upscaled with a warning")
    p.add_argument("-o", "--out", type=Path, default=d.out, help=f"output folder ({d.out})")
    p.add_argument("--model", choices=["auto", *PRESETS], default=d.model, help=cli.MODEL_HELP)
    p.add_argument("--weights", type=Path, help="diffusers folder or single-file checkpoint "
                   "(default: weights/sd2.1-base, or weights/MODEL with --model)")
    p.add_argument("--steps", type=int, default=d.steps, help=f"optimizer steps ({d.steps})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"AdamW learning rate ({d.lr:g}), not "
                   "scaled by the batch size")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="images per step and per "
                   f"process; the global batch is this x processes ({d.batch_size})")
    p.add_argument("--grad-accum", type=int, default=d.grad_accum,
                   help=f"micro-batches per step ({d.grad_accum})")
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps,
                   help=f"linear warmup, then constant ({d.warmup_steps})")
    p.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm,
                   help=f"clip ({d.max_grad_norm}; 0: off)")
    p.add_argument("--resolution", type=int, help="training image side (default: the model's, "
                   "512 for sd2.1-base, 768 for sd2.1); a multiple of 8")
    p.add_argument("--center-crop", action="store_true", help="crop the centre of each image "
                   "(default: a random square, drawn anew every time an image is used)")
    p.add_argument("--flip", action="store_true", help="random horizontal flips (p = 0.5)")
    p.add_argument("--precision", choices=DTYPE_NAMES, default=d.precision,
                   help=f"autocast dtype over fp32 master weights ({d.precision}); fp16 adds a "
                        "GradScaler; bf16 is the usual choice on a recent GPU")
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing in the "
                   "UNet: much less memory, about a third slower")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help="save "
                   f"out/checkpoint-N every N steps ({d.checkpoint_every}) and at the end; 0: at "
                   "the end only")
    p.add_argument("--keep", type=int, default=d.keep, metavar="N", help="keep the newest N "
                   f"complete checkpoints, removing older ones once a new one is complete "
                   f"({d.keep}; 0: all)")
    p.add_argument("--resume", metavar="CHECKPOINT", help='"latest" (the one out/latest names) '
                   "or a checkpoint folder: continues bit for bit (same options, same -o)")
    p.add_argument("--validate-every", type=int, default=d.validate_every, metavar="N",
                   help="every N steps write out/validation-N.png, 2 images of "
                        "--validation-prompt (0: never)")
    p.add_argument("--validation-prompt", help="(default: the instance prompt / a photo of TOKEN)")
    p.add_argument("--validation-steps", type=int, default=d.validation_steps,
                   help=f"DDIM steps ({d.validation_steps})")
    p.add_argument("--seed", type=int, default=d.seed, help="data order, crops, noise, timesteps "
                   f"({d.seed})")
    p.add_argument("--device", help="cuda or cpu (default: cuda if present); under torchrun, "
                   "each process takes cuda:LOCAL_RANK")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    cli.add_threads(p)
    return p


def defaults(kind) -> SimpleNamespace:
    """A settings class's defaults, by field name (required fields: MISSING)."""
    return SimpleNamespace(**{f.name: f.default for f in fields(kind)})


def dreambooth_parser() -> argparse.ArgumentParser:
    d = defaults(DreamBoothSettings)
    p = common("python -m train dreambooth", DREAMBOOTH_ABOUT, DREAMBOOTH, d)
    p.add_argument("--instance-prompt", required=True, help='e.g. "a photo of sks dog": the '
                   "prompt of every image without a caption; an image NAME.png with a NAME.txt "
                   'beside it is trained with that text ("a photo of sks dog on a sofa")')
    p.add_argument("--train-text-encoder", action="store_true",
                   help="fine-tune the text encoder too, at the same lr (Photoswap does)")
    p.add_argument("--class-prompt", action="append", help='prior preservation: e.g. "a photo '
                   'of a dog"; its images, generated by the model before training, keep the class '
                   "from drifting. Repeat it to draw them from several prompts in turn (each "
                   "image's prompt is saved beside it as NAME.txt, its caption)")
    p.add_argument("--class-dir", type=Path, help="where class images are (or get) cached; only "
                   "the missing number is generated")
    p.add_argument("--num-class-images", type=int, default=d.num_class_images,
                   help=f"({d.num_class_images})")
    p.add_argument("--prior-weight", type=float, default=d.prior_weight,
                   help=f"prior loss weight ({d.prior_weight})")
    return p


def textual_inversion_parser() -> argparse.ArgumentParser:
    d = defaults(TextualInversionSettings)
    p = common("python -m train textual-inversion", TEXTUAL_INVERSION_ABOUT, TEXTUAL_INVERSION,
               d)
    p.add_argument("--token", required=True, help='the new word, e.g. "<my-dog>"; it must not '
                   "be in CLIP's vocabulary already")
    p.add_argument("--init-word", help='start from this one-token word\'s embedding, e.g. "dog" '
                   "(default: random, with the table's standard deviation)")
    p.add_argument("--what", choices=list(TEMPLATES), default=d.what,
                   help="prompt templates: an object (a photo of a TOKEN) or a style "
                        f"({d.what})")
    return p


def dreambooth(s: DreamBoothSettings) -> None:
    from train import dreambooth  # the method, and torch (over a second), load only now

    dreambooth.train(s)


def textual_inversion(s: TextualInversionSettings) -> None:
    from train import textual_inversion

    textual_inversion.train(s)


COMMANDS = {"dreambooth": (dreambooth_parser, DreamBoothSettings, dreambooth),
            "textual-inversion": (textual_inversion_parser, TextualInversionSettings,
                                  textual_inversion)}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS:
        if argv[:1] in (["-h"], ["--help"]):
            print(__doc__.strip())
            return 0
        raise cli.UsageError(f"give a command first: {' or '.join(COMMANDS)} "
                             "(see python -m train --help)")
    make_parser, kind, train = COMMANDS[argv[0]]
    args = make_parser().parse_args(argv[1:])
    settings = kind.of(args).check()  # usage errors before torch loads
    from sd.weights import resolve

    cli.threads(args.threads, resolve(settings.model, settings.weights)[0])
    try:
        train(settings)
    except KeyboardInterrupt:
        if os.environ.get("RANK", "0") == "0":  # under torchrun, one rank speaks
            print(interrupted(argv[0], settings.out, argv[1:]), file=sys.stderr)
        return cli.INTERRUPTED
    return 0


def interrupted(command: str, out: Path, argv: list[str]) -> str:
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
    line = f"python -m train {command} " + shlex.join([*kept, "--resume", "latest"])
    return (f"interrupted; the last complete checkpoint is {out / latest.read_text().strip()}. "
            f"Continue with:\n    {line}")


if __name__ == "__main__":
    sys.exit(cli.run(main))
