"""How DreamBooth's recipe on the toy model is chosen: recipes side by side, each scored as
`make eval-toy` scores DreamBooth (toy/evaluate.py `dreambooth_check`), but in contexts drawn
with another seed than the benchmark's, so that choosing a recipe here does not tune to EVAL.md.

    python -m bench.dreambooth_recipes                       # the grid below, four concepts
    python -m bench.dreambooth_recipes --concepts dotted-star --contexts 8

For each concept: the base model described in words ("a purple star with white dots", the
untuned model's best try) and, per recipe, the tuned model's "sks star" and its class word
("a star"). A recipe binds the concept when "sks" is well above the class word. Each tuned model
is cached under --cache/RECIPE/ as `make swap` caches its own.
"""

import argparse
import sys
import time
from pathlib import Path

from sd import cli
from sd.config import TOY
from toy import concepts
from toy.settings import CONTEXT_SEED, DREAMBOOTH

SEED = CONTEXT_SEED + 1  # not the benchmark's contexts

PLAIN = {k: v for k, v in DREAMBOOTH.items() if k != "num_class_images"}  # no prior preservation
GRIDS = {  # name -> {label: recipe (DreamBoothSettings' fields)}
    "steps-lr": {f"{steps} steps, lr {lr:g}": {**PLAIN, "steps": steps, "lr": lr}
                 for steps in (150, 300, 600) for lr in (5e-4, 1e-3, 2e-3)},
    # prior preservation (Ruiz et al. eq. 2): 50 images of "a photo of a CLASS" drawn by the
    # base model keep the class word from drifting to the concept
    "prior": {f"{steps} steps, lr {lr:g}, prior": {**PLAIN, "steps": steps, "lr": lr,
                                                     "num_class_images": 50}
              for steps, lr in ((300, 1e-3), (600, 1e-3), (600, 2e-3))},
    # at make swap's cost (300 steps of 4 images): a higher rate, or more steps of 2 images
    "budget": {f"{steps} steps of {b}, lr {lr:g}, prior": {**PLAIN, "steps": steps, "lr": lr,
                                                            "batch_size": b,
                                                            "num_class_images": 50}
               for steps, b, lr in ((300, 4, 2e-3), (600, 2, 1e-3), (600, 2, 2e-3))},
    # each image with its caption in the world's words: the references "a photo of sks star on
    # a ... background", the class images drawn from captions of the world's stars
    "world": {f"{steps} steps, lr {lr:g}{', prior' if prior else ''}, world":
              {**PLAIN, "steps": steps, "lr": lr, "captions": "world",
               **({"num_class_images": 50} if prior else {})}
              for steps, lr, prior in ((300, 1e-3, True), (300, 1e-3, False), (600, 1e-3, True),
                                       (150, 1e-3, True))},
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.dreambooth_recipes", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", type=Path, default=Path("weights/toy"), help="the toy model")
    p.add_argument("--concepts", nargs="+", choices=sorted(concepts.CONCEPTS),
                   default=sorted(concepts.CONCEPTS))
    p.add_argument("--contexts", type=int, default=12, help="backgrounds per concept (12)")
    p.add_argument("--cache", type=Path, default=Path("out/toy/recipes"))
    p.add_argument("--grid", choices=list(GRIDS), default="steps-lr",
                   help="steps-lr: steps x learning rate; prior: with prior preservation; "
                   "budget: prior preservation at the cost of 300 steps of 4 images; "
                   "world: images captioned in the world's words")
    cli.add_threads(p)
    args = p.parse_args(argv)
    from toy import evaluate as ev  # the library, and torch, load only now
    from toy import scenes
    from toy import swap as toy

    if args.contexts < 1:
        raise cli.UsageError("give --contexts 1 or more")
    toy.check_model(args.weights)
    cli.threads(args.threads, TOY)
    started = time.time()
    base = toy.toy_pipeline(args.weights)
    print(f"{'concept':16s} {'recipe':24s} {'sks':>7s} {'class':>7s} {'gain':>7s}  "
          f"(in words, untuned)")
    for name in args.concepts:
        m = toy.measure(name, args.weights)
        bgs = ev.contexts(name, args.contexts, SEED)
        word = concepts.CONCEPTS[name][0]
        kind = scenes.noun(concepts.CONCEPTS[name][1])
        words = ev.sample_identity(base, f"{scenes.article(kind)} {kind}", bgs, m)
        for label, recipe in GRIDS[args.grid].items():
            root = args.cache / label.replace(" ", "").replace(",", "-")
            tuned = toy.toy_pipeline(toy.concept_model(name, args.weights, root, recipe=recipe))
            sks = ev.sample_identity(tuned, f"sks {word}", bgs, m)
            cls = ev.sample_identity(tuned, f"{scenes.article(word)} {word}", bgs, m)
            print(f"{name:16s} {label:24s} {sks:7.3f} {cls:7.3f} {sks - cls:7.3f}  "
                  f"({words:.3f})", flush=True)
    print(f"{time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
