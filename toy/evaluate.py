"""The swap benchmark (`make eval-toy`): held-out toy scenes x the three concepts, for photoswap,
p2p and none, scored against exact masks; and DreamBooth's acceptance. Writes EVAL.md.

    python -m toy.evaluate --weights weights/toy              # 4 scenes, ~10 CPU minutes
    python -m toy.evaluate --weights weights/toy --scenes 20  # more

For each concept (DreamBooth'd and cached as `make swap` does, toy/swap.py) and each of the
first --scenes held-out one-subject scenes: null-text inversion with the concept model, then the
three methods from it (toy/swap.py `swaps`: photoswap with the toy preset, p2p and none derived
from it; and photoswap with the paper's windows), each output scored by toy/metrics.py:
background PSNR outside the source mask dilated by 3 px against the background render (capped at
PSNR_CAP before averaging, since a perfect background is infinite), layout IoU of the region that
departs from the background render against the source mask, concept fidelity of that region against
the concept's reference subjects (paint-colour histogram intersection and texture busyness; the
metrics module says how). The unswapped source scene is scored too, for scale.

DreamBooth's acceptance: SAMPLES images of "a photo of sks <class>" from the DreamBooth'd model
and from the untuned base model, same seeds; the subject of a free sample is found against its
border colours (metrics.border_region); mean concept fidelity of each.
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from photoswap.swap import METHODS
from sd import cli
from sd.config import TOY
from sd.files import atomic_write
from sd.images import grid, save_image
from sd.pipeline import Pipeline
from toy import concepts, metrics
from toy import swap as toyswap

PSNR_CAP = 60.0  # dB; 8-bit images equal but for one pixel in a million are ~108 dB
SAMPLES = 8
ROWS = (*METHODS, "paper", "reconstruction", "photo")
NAMES = {"photoswap": "`photoswap` (toy preset: phi 0.8, M 0, A 1.0)",
         "paper": "`photoswap` with the paper's windows (phi 0.2, M 0.5, A 0.4)",
         "reconstruction": "source branch (the inversion's reconstruction)",
         "photo": "the source photo itself (unswapped, for scale)"}
KEYS = ("background_psnr", "layout_iou", "fidelity", "colour", "texture")


def sample_fidelity(pipe: Pipeline, name: str, stats: tuple[np.ndarray, float],
                    count: int = SAMPLES, steps: int = toyswap.STEPS,
                    guidance: float = toyswap.GUIDANCE) -> float:
    """Mean concept fidelity of `count` samples of "a photo of sks <class>" (one generator,
    seeded 0, draws their noise)."""
    images = pipe([concepts.prompt(name)] * count, steps=steps, guidance=guidance, seed=0)
    scores = [metrics.fidelity(a, metrics.border_region(a), stats)["fidelity"]
              for a in map(np.asarray, images)]
    return float(np.mean(scores))


def mean(rows: list[dict[str, float]]) -> dict[str, float]:
    out = {}
    for k in KEYS:
        values = [min(r[k], PSNR_CAP) if k == "background_psnr" else r[k] for r in rows]
        out[k] = float(np.mean(values))
    return out


def evaluate(weights: Path, scenes: int, names: list[str], cache: Path, pictures: Path,
             progress: bool = True) -> dict:
    """{"swaps": {method: {concept: [scores per scene]}}, "dreambooth": {concept: {...}}}; the
    outputs go to pictures/<concept>.png, a row per scene: photo, source branch, the methods."""
    base = toyswap.load(weights)
    srcs = [toyswap.source(i) for i in range(scenes)]
    result: dict = {"swaps": {m: {} for m in ROWS}, "dreambooth": {}}
    for name in names:
        started = time.time()
        model = toyswap.concept_model(name, weights, cache, quiet=not progress)
        pipe = toyswap.load(model)
        stats = metrics.concept_stats(concepts.references(name))
        invs = [toyswap.invert_source(pipe, s) for s in srcs]
        words = [toyswap.target_prompt(s, name)[1] for s in srcs]
        images = toyswap.swaps(pipe, srcs, invs, words)
        images["paper"] = toyswap.swaps(pipe, srcs, invs, words, ("photoswap",),
                                        base=toyswap.PAPER)["photoswap"]
        for m in (*METHODS, "paper"):
            result["swaps"][m][name] = [toyswap.score(a, s, stats) for a, s in zip(images[m], srcs)]
        result["swaps"]["reconstruction"][name] = [toyswap.score(a, s, stats)
                                                   for a, s in zip(images["source"], srcs)]
        result["swaps"]["photo"][name] = [toyswap.score(s.image, s, stats) for s in srcs]
        cells = [[Image.fromarray(a) for a in (s.image, images["source"][i],
                                               *(images[m][i] for m in METHODS))]
                 for i, s in enumerate(srcs)]
        pictures.mkdir(parents=True, exist_ok=True)
        save_image(grid(cells), pictures / f"{name}.png")
        result["dreambooth"][name] = {"tuned": sample_fidelity(pipe, name, stats),
                                      "untuned": sample_fidelity(base, name, stats)}
        if progress:
            print(f"{name}: {time.time() - started:.0f} s", file=sys.stderr)
    return result


def table(result: dict, command: str, weights: Path, scenes: int, seconds: float) -> str:
    """EVAL.md: the swap table (means over scenes x concepts), then DreamBooth's acceptance."""
    lines = ["# Swap benchmark on the toy world", "",
             f"Made by `{command}` with the weights in `{weights}`, {scenes} held-out scenes x "
             f"{len(result['dreambooth'])} concepts, {toyswap.STEPS} DDIM steps, guidance "
             f"{toyswap.GUIDANCE}, null-text inversion with each concept's DreamBooth'd model, "
             f"in {seconds / 60:.1f} minutes on {torch.get_num_threads()} CPU thread(s). "
             "How each number is computed: toy/metrics.py and toy/evaluate.py.", "",
             "| method | background PSNR (dB) | layout IoU | concept fidelity | colour | texture |",
             "|---|---|---|---|---|---|"]
    for m in ROWS:
        rows = [r for per in result["swaps"][m].values() for r in per]
        v = mean(rows)
        name = NAMES.get(m, f"`{m}`")
        lines.append(f"| {name} | {v['background_psnr']:.2f} | {v['layout_iou']:.3f} | "
                     f"{v['fidelity']:.3f} | {v['colour']:.3f} | {v['texture']:.3f} |")
    lines += ["", f"Background PSNR is capped at {PSNR_CAP:.0f} dB before averaging (the "
              "unswapped photo's background is exact: infinite).", "",
              f"DreamBooth acceptance: mean concept fidelity of {SAMPLES} samples of "
              '"a photo of sks <class>" (same seeds).', "",
              "| concept | DreamBooth'd | untuned |", "|---|---|---|"]
    for name, d in result["dreambooth"].items():
        lines.append(f"| {name} | {d['tuned']:.3f} | {d['untuned']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m toy.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", type=Path, default=Path("weights/toy"), help="the toy model")
    p.add_argument("--scenes", type=int, default=4, help="held-out scenes per concept (4: "
                   "scenes 0-3; the toy preset was chosen on 4-11)")
    p.add_argument("--concepts", nargs="+", choices=sorted(concepts.CONCEPTS),
                   default=sorted(concepts.CONCEPTS))
    p.add_argument("--cache", type=Path, default=Path("out/toy/concepts"))
    p.add_argument("-o", "--out", type=Path, default=Path("EVAL.md"))
    p.add_argument("--pictures", type=Path, default=Path("out/eval"),
                   help="where each concept's outputs (a grid) and results.json go (out/eval)")
    p.add_argument("-q", "--quiet", action="store_true")
    cli.add_threads(p)
    args = p.parse_args(argv)
    if args.scenes < 1:
        raise cli.UsageError("--scenes: give 1 or more")
    cli.writable(args.out)
    cli.writable(args.pictures, "--pictures", folder=True)
    toyswap.check_model(args.weights)
    cli.threads(args.threads, TOY)
    started = time.time()
    result = evaluate(args.weights, args.scenes, args.concepts, args.cache, args.pictures,
                      not args.quiet)
    command = "python -m toy.evaluate " + " ".join(argv if argv is not None else sys.argv[1:])
    text = table(result, command.strip(), args.weights, args.scenes, time.time() - started)
    with atomic_write(args.out) as tmp:
        tmp.write_text(text)
    with atomic_write(args.pictures / "results.json") as tmp:  # per scene and concept
        tmp.write_text(toyswap.to_json(result))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
