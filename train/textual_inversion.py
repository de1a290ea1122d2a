"""Textual inversion (Gal et al. 2022, arXiv:2208.01618): learn the embedding of a NEW token
("<my-dog>") from a few images; every weight of the model stays as it was.

This is the command line; the method is train/embedding.py, the loop train/loop.py.
"""

import argparse
import sys

from train import options

PROG = "python -m train.textual_inversion"
EPILOG = """examples:
  python -m train.textual_inversion photos/my-dog --token "<my-dog>" --init-word dog \\
      --weights weights/sd2.1-base -o out/my-dog-ti
  # then draw with the learned token (--concepts loads it):
  python -m sd "a photo of <my-dog> on the beach" --weights weights/sd2.1-base \\
      --concepts out/my-dog-ti/learned_embeds.safetensors -o out/dog.png

  # try the code on a CPU without weights (random tiny model):
  python -m train.textual_inversion photos/my-dog --token "<my-dog>" --model tiny --steps 20

Output, in -o: learned_embeds.safetensors ({token: vector}, loaded by `python -m sd --concepts`
and sd.pipeline.Pipeline.add_concepts), checkpoint-N/ (the vector and state.pt; `latest` names the
newest, --resume latest continues bit for bit), validation-N.png with --validate-every N.
Multi-GPU: torchrun --nproc_per_node N -m train.textual_inversion ... (as train.dreambooth)."""


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = options.parser(PROG, __doc__, EPILOG, lr=5e-4, steps=3000, checkpoint_every=500,
                       out="out/textual-inversion")
    p.add_argument("--token", required=True, help='the new word, e.g. "<my-dog>"; it must not '
                   "be in CLIP's vocabulary already")
    p.add_argument("--init-word", help='start from this one-token word\'s embedding, e.g. "dog" '
                   "(default: random, with the table's standard deviation)")
    # the keys of train.embedding.TEMPLATES, typed out: importing that module loads torch
    p.add_argument("--what", choices=("object", "style"), default="object",
                   help="prompt templates: an object (a photo of a TOKEN) or a style (object)")
    args = p.parse_args(argv)
    return options.check(p, args, (not args.token.strip() or " " in args.token.strip(),
                                   '--token: give one new word without spaces, such as "<my-dog>"'))


def main(argv: list[str] | None = None) -> int:
    return options.main(PROG, parse, "train.embedding", argv)


if __name__ == "__main__":
    sys.exit(main())
