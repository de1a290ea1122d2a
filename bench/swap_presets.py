"""How the `toy` swap preset was chosen (photoswap/settings.py): swap settings side by side on
held-out toy scenes that the benchmark (EVAL.md, scenes 0-15) does not use.

    python -m bench.swap_presets                     # scenes 16-23 x the four concepts
    python -m bench.swap_presets --first 24 --count 8 --concepts dotted-star

For each concept (DreamBooth'd and cached as `make swap` does) the scenes are null-text inverted
once; every setting then swaps all of them from those inversions (toy/swap.py `swaps`) and
is scored as EVAL.md scores (toy/swap.py `score`): mean background PSNR (capped at 60 dB),
layout IoU and identity over scenes x concepts. About 2 minutes per concept for the
inversions and 20 s per setting on 2 CPU threads.
"""

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

from sd import cli
from sd.config import TOY
from toy import concepts


def with_a(s, window: float):
    """Settings s (photoswap/settings.py) with the A window `window`."""
    return replace(s, a=replace(s.a, window=window))


def candidates() -> dict:
    """The settings compared (photoswap.control.Settings by name). The paper's and the official
    presets read the toy's 8x8 maps for local blend (their own quarter-side maps are its 4x4 mid
    block), at their threshold 0.3."""
    from photoswap.settings import PRESETS, no_swap, p2p

    t = PRESETS["toy"]
    return {"none": no_swap(t), "p2p (toy blend)": p2p(t),
            "paper": replace(PRESETS["paper"], blend_level=t.blend_level),
            "official": replace(PRESETS["official"], blend_level=t.blend_level),
            "toy, A 0.6": with_a(t, 0.6), "toy, A 0.8": with_a(t, 0.8), "toy (A 1.0)": t,
            "toy, blend threshold 0.3": replace(t, blend_threshold=0.3),
            "toy without local blend": replace(t, blend_start=None)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.swap_presets", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", type=Path, default=Path("weights/toy"), help="the toy model")
    p.add_argument("--first", type=int, default=16, help="first held-out scene (16)")
    p.add_argument("--count", type=int, default=8, help="scenes (8)")
    p.add_argument("--concepts", nargs="+", choices=sorted(concepts.CONCEPTS),
                   default=sorted(concepts.CONCEPTS))
    p.add_argument("--cache", type=Path, default=Path("out/toy/concepts"))
    cli.add_threads(p)
    args = p.parse_args(argv)
    if args.first < 0 or args.count < 1:
        raise cli.UsageError("give --first 0 or more and --count 1 or more")
    from toy import swap as toy
    from toy.evaluate import mean

    toy.check_model(args.weights)
    cli.threads(args.threads, TOY)
    started = time.time()
    srcs = [toy.source(i) for i in range(args.first, args.first + args.count)]
    work = []  # per concept: (pipe, inversions, target words, what scores against it)
    for name in args.concepts:
        pipe = toy.toy_pipeline(toy.concept_model(name, args.weights, args.cache))
        words = [toy.target_prompt(s, name)[1] for s in srcs]
        m = toy.measure(name, args.weights)
        work.append((pipe, [toy.invert_source(pipe, s) for s in srcs], words, m))
        print(f"{name}: inverted {len(srcs)} scenes", file=sys.stderr)
    print(f"scenes {args.first}-{args.first + args.count - 1} x {len(work)} concepts")
    print(f"{'setting':28s} {'bg PSNR':>8s} {'IoU':>6s} {'identity':>8s}")
    for label, settings in candidates().items():
        rows = []
        for pipe, invs, words, m in work:
            images = toy.swaps(pipe, srcs, invs, words, ("photoswap",), base=settings)
            rows += [toy.score(a, s, m) for a, s in zip(images["photoswap"], srcs)]
        v = mean(rows)
        print(f"{label:28s} {v['background_psnr']:8.2f} {v['layout_iou']:6.3f} "
              f"{v['identity']:8.3f}", flush=True)
    print(f"{time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
