"""The swap benchmark (`make eval-toy`): held-out toy scenes x the concepts, for photoswap, p2p
and none, scored against ground truth, with the paper's pairwise table; and DreamBooth's
acceptance. Its command line, `python -m toy evaluate` (toy/__main__.py), writes EVAL.md.

For each concept (DreamBooth'd and cached as `make swap` does, toy/swap.py) and each of the
first --scenes held-out scenes (a quarter with two subjects; the first subject is
swapped): null-text inversion with the concept model, then the methods from it (toy/swap.py
`swaps`: photoswap with the toy preset, p2p and none derived from it; and photoswap with the
paper's windows), each output scored (toy/swap.py `score`): background PSNR outside the swapped
subject's mask dilated by 3 px against the scene rendered without it (capped at PSNR_CAP before
averaging: a perfect background is infinite), layout IoU of the region that departs from that
render against the mask, identity (toy/identity.py: cosine of the identity encoder's embedding of
that region with the concept's references'), and as secondary columns the paint-colour histogram
intersection and texture busyness against the references (toy/metrics.py).

The pairwise table, as the paper's human study (its Table 1) but on measurements: for each swap,
whether photoswap is better, tied or worse than another method on identity (tie: |difference| <=
IDENTITY_TIE), on background (tie: |difference| <= PSNR_TIE dB) and overall (the method that wins
more of the two; a tie when they win as many). The bands and the overall rule were fixed before
any result was seen.

DreamBooth's acceptance: in CONTEXTS new contexts per concept (backgrounds drawn from a seed,
never the concept's paints), identity of samples of "a photo of sks <class> on <background>" from
the DreamBooth'd model, against the untuned model with the same prompt, the DreamBooth'd model
with the class word alone ("a photo of a star on ...") and the untuned model with the concept's
kind in words ("a photo of a purple star with white dots on ..."); same seeds. The subject of a
free sample is found against its border colours (metrics.border_region).
"""

import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from photoswap.settings import METHODS
from sd.images import grid, save_image
from sd.pipeline import Pipeline
from toy import concepts, identity, metrics, scenes
from toy import swap as toyswap
from toy.settings import CONTEXT_SEED, CONTEXTS

PSNR_CAP = 60.0  # dB; 8-bit images equal but for one pixel in a million are ~108 dB
IDENTITY_TIE, PSNR_TIE = 0.02, 0.5  # the pairwise table's tie bands (cosine, dB)
ROWS = (*METHODS, "paper", "reconstruction", "photo")
NAMES = {"photoswap": "`photoswap` (toy preset: phi 0.8, M 0, A 1.0)",
         "paper": "`photoswap` with the paper's windows (phi 0.2, M 0.5, A 0.4)",
         "masactrl": "`masactrl` (its published settings: from step 4, the decoder's two finest "
                     "levels)",
         "pnp": "`pnp` (its published settings: features 0.8, q and k 0.5; its own 999-step "
                "DDIM inversion)",
         "reconstruction": "source branch (the inversion's reconstruction)",
         "photo": "the source photo itself (unswapped, for scale)"}
KEYS = ("background_psnr", "layout_iou", "identity", "colour", "texture")


def contexts(name: str, count: int = CONTEXTS, seed: int = CONTEXT_SEED) -> list[str]:
    """`count` backgrounds in the caption's words, away from the concept's paints."""
    base = concepts.CONCEPTS[name][1]
    rng = np.random.default_rng([seed, sorted(concepts.CONCEPTS).index(name)])
    out = []
    for _ in range(count):
        bg, pattern, second = scenes.ground(rng, (base.colour, base.second, base.outline))
        out.append(scenes.backdrop(scenes.Scene((), bg, pattern, second=second)))
    return out


def sample_identity(pipe: Pipeline, subject: str, backgrounds: list[str], m: toyswap.Measure,
                    steps: int = toyswap.STEPS, guidance: float = toyswap.GUIDANCE) -> float:
    """Mean identity of samples of "a photo of <subject> on <background>" (one generator,
    seeded 0, draws their noise)."""
    prompts = [f"a photo of {subject} on {bg}" for bg in backgrounds]
    images = pipe(prompts, steps=steps, guidance=guidance, seed=0)
    return float(np.mean([identity.score(m.encoder, a, metrics.border_region(a), m.reference)
                          for a in map(np.asarray, images)]))


def dreambooth_check(tuned: Pipeline, base: Pipeline, name: str, m: toyswap.Measure) -> dict:
    word = concepts.CONCEPTS[name][0]
    kind = scenes.noun(concepts.CONCEPTS[name][1])
    bgs = contexts(name)
    return {"tuned": sample_identity(tuned, f"sks {word}", bgs, m),
            "untuned": sample_identity(base, f"sks {word}", bgs, m),
            "class word": sample_identity(tuned, f"{scenes.article(word)} {word}", bgs, m),
            "in words": sample_identity(base, f"{scenes.article(kind)} {kind}", bgs, m)}


def mean(rows: list[dict[str, float]]) -> dict[str, float]:
    out = {}
    for k in KEYS:
        values = [min(r[k], PSNR_CAP) if k == "background_psnr" else r[k] for r in rows]
        out[k] = float(np.mean(values))
    return out


def verdict(a: dict, b: dict) -> dict[str, int]:
    """+1, 0, -1: swap a better, tied, worse than b, on identity, background and overall."""
    def cmp(x: float, y: float, tie: float) -> int:
        return 0 if abs(x - y) <= tie else (1 if x > y else -1)

    ident = cmp(a["identity"], b["identity"], IDENTITY_TIE)
    bg = cmp(min(a["background_psnr"], PSNR_CAP), min(b["background_psnr"], PSNR_CAP), PSNR_TIE)
    wins = (ident == 1) + (bg == 1) - (ident == -1) - (bg == -1)
    return {"identity": ident, "background": bg, "overall": int(np.sign(wins))}


def evaluate(weights: Path, count: int, names: list[str], cache: Path, pictures: Path,
             progress: bool = True) -> dict:
    """{"swaps": {method: {concept: [scores per scene]}}, "dreambooth": {concept: {...}}}; the
    outputs go to pictures/<concept>.png, a row per scene: photo, source branch, the methods."""
    base = toyswap.toy_pipeline(weights)
    srcs = [toyswap.source(i) for i in range(count)]
    result: dict = {"swaps": {m: {} for m in ROWS}, "dreambooth": {}}
    for name in names:
        started = time.time()
        model = toyswap.concept_model(name, weights, cache, quiet=not progress)
        pipe = toyswap.toy_pipeline(model)
        m = toyswap.measure(name, weights)
        invs = [toyswap.invert_source(pipe, s) for s in srcs]
        words = [toyswap.target_prompt(s, name)[1] for s in srcs]
        images = toyswap.swaps(pipe, srcs, invs, words)
        images["paper"] = toyswap.swaps(pipe, srcs, invs, words, ("photoswap",),
                                        base=toyswap.PAPER)["photoswap"]
        images["reconstruction"] = images.pop("source")
        images["photo"] = [s.image for s in srcs]
        for row in ROWS:
            result["swaps"][row][name] = [toyswap.score(a, s, m)
                                          for a, s in zip(images[row], srcs)]
        cells = [[Image.fromarray(a) for a in (s.image, images["reconstruction"][i],
                                               *(images[r][i] for r in METHODS))]
                 for i, s in enumerate(srcs)]
        pictures.mkdir(parents=True, exist_ok=True)
        save_image(grid(cells), pictures / f"{name}.png")
        result["dreambooth"][name] = dreambooth_check(pipe, base, name, m)
        if progress:
            print(f"{name}: {time.time() - started:.0f} s", file=sys.stderr)
    return result


def pairwise(result: dict, other: str) -> dict[str, tuple[float, float, float]]:
    """{criterion: (% better, % tied, % worse)} of photoswap against `other`, over every swap."""
    votes = [verdict(a, b) for name in result["swaps"]["photoswap"]
             for a, b in zip(result["swaps"]["photoswap"][name], result["swaps"][other][name])]
    return {k: tuple(100 * float(np.mean([v[k] == s for v in votes])) for s in (1, 0, -1))
            for k in ("identity", "background", "overall")}


def demo(result: dict) -> tuple[str, int, float]:
    """make swap's default, by a rule fixed before any result was seen: the swap whose photoswap
    identity is the median of the benchmark's (the lower one of an even count), as (concept,
    scene, identity)."""
    swaps = sorted((r["identity"], name, i) for name, per in result["swaps"]["photoswap"].items()
                   for i, r in enumerate(per))
    ident, name, i = swaps[(len(swaps) - 1) // 2]
    return name, i, ident


def table(result: dict, command: str, weights: Path, count: int, seconds: float) -> str:
    """EVAL.md: the swap table (means over scenes x concepts), the pairwise table, then
    DreamBooth's acceptance."""
    lines = ["# Swap benchmark on the toy world", "",
             f"Made by `{command}` with the weights in `{weights}`, {count} held-out scenes x "
             f"{len(result['dreambooth'])} concepts, {toyswap.STEPS} DDIM steps, guidance "
             f"{toyswap.GUIDANCE}, null-text inversion with each concept's DreamBooth'd model, "
             f"in {seconds / 60:.1f} minutes on {torch.get_num_threads()} CPU thread(s). "
             "How each number is computed: toy/evaluate.py, toy/identity.py, toy/metrics.py.", "",
             "| method | background PSNR (dB) | layout IoU | identity | colour | texture |",
             "|---|---|---|---|---|---|"]
    for m in ROWS:
        v = mean([r for per in result["swaps"][m].values() for r in per])
        lines.append(f"| {NAMES.get(m, f'`{m}`')} | {v['background_psnr']:.2f} | "
                     f"{v['layout_iou']:.3f} | {v['identity']:.3f} | {v['colour']:.3f} | "
                     f"{v['texture']:.3f} |")
    lines += ["", f"Background PSNR is capped at {PSNR_CAP:.0f} dB before averaging (the "
              "unswapped photo's background is exact: infinite).", "",
              f"Pairwise, over every swap (ties: identity within {IDENTITY_TIE}, background "
              f"within {PSNR_TIE} dB; overall: the method that wins more of the two):", "",
              "| photoswap against | criterion | better | tied | worse | better or equal |",
              "|---|---|---|---|---|---|"]
    for other in (m for m in METHODS if m != "photoswap"):
        for k, (b, t, w) in pairwise(result, other).items():
            lines.append(f"| `{other}` | {k} | {b:.1f}% | {t:.1f}% | {w:.1f}% | {b + t:.1f}% |")
    lines += ["", f"DreamBooth acceptance: mean identity of samples in {CONTEXTS} new contexts "
              "(same seeds):", "",
              "| concept | DreamBooth'd, sks | untuned, sks | DreamBooth'd, class word | "
              "untuned, in words |", "|---|---|---|---|---|"]
    for name, d in result["dreambooth"].items():
        lines.append(f"| {name} | {d['tuned']:.3f} | {d['untuned']:.3f} | "
                     f"{d['class word']:.3f} | {d['in words']:.3f} |")
    name, scene, ident = demo(result)
    lines += ["", f"`make swap`'s default (toy/settings.py DEMO), by a rule fixed beforehand: the "
              f"median swap by photoswap's identity, {name} into held-out scene {scene} "
              f"(identity {ident:.3f})."]
    return "\n".join(lines) + "\n"
