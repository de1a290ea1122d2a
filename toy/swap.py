"""`make swap` on the toy world: the whole method, offline, on a CPU, measured against exact masks.

    python -m toy.swap --weights weights/toy              # the default concept and scene
    python -m toy.swap --concept striped-heart --scene 3 -o out/toy/swap

Steps: DreamBooth the concept (toy/concepts.py: 5 reference images, "a photo of sks <class>") into
out/toy/concepts/<name>-<base digest>/model, cached with the recipe and a digest of the reference
images; draw held-out scene --scene (toy/scenes.py's test split; a quarter of them hold two
subjects, the first is swapped); null-text invert it with the concept model (as the official code
does); swap its subject ("a black star" -> "a sks star") with `photoswap` (the toy preset of
photoswap/control.py), `p2p` and `none` from the inversion; score each output: background PSNR
against the scene rendered without the subject, layout IoU against the subject's exact mask,
identity with the concept's references (toy/identity.py), and colour and texture statistics
(toy/metrics.py). Writes images, grid.png (source | photoswap | p2p | none, then the references)
and metrics.json to -o, and prints the scores. The default concept and scene are the benchmark's
median swap (EVAL.md says how it is chosen).
"""

import argparse
import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from photoswap.control import PRESETS, Settings
from photoswap.swap import METHODS, Pair, method_settings, replace_words, run
from photoswap.visual import label
from sd import cli
from sd.cli import UsageError
from sd.config import TOY, preset
from sd.files import atomic_write
from sd.images import grid, save_image, to_pil
from sd.pipeline import Pipeline
from sd.weights import detect_preset
from toy import concepts, identity, metrics, scenes
from train.inversion import Inversion, invert

# DreamBooth on the toy model (how it was chosen: weights/toy/README.md, "DreamBooth and the swap").
DREAMBOOTH = {"steps": 150, "lr": 5e-4, "batch_size": 4, "train_text_encoder": True, "seed": 0}
STEPS, GUIDANCE = 50, 7.5  # the paper's sampling settings; inversion at the same
SETTINGS = PRESETS["toy"]  # photoswap/control.py says why and how it was chosen
# The paper's windows (phi 0.2, M 0.5, A 0.4) with the toy's local blend, reported beside it.
PAPER = replace(SETTINGS, phi=PRESETS["paper"].phi, m=PRESETS["paper"].m, a=PRESETS["paper"].a)


@dataclass
class Source:
    """A held-out scene: what the swap starts from and what scores it. Its first subject is the
    one swapped; a second subject, if any, belongs to what the swap must keep."""

    index: int
    image: np.ndarray  # uint8 [64, 64, 3]
    mask: np.ndarray  # bool [64, 64], the swapped subject
    background: np.ndarray  # uint8 [64, 64, 3], the scene rendered without the swapped subject
    caption: str
    subject: str  # "red circle": the words the concept replaces


TWO = 0.25  # the share of two-subject scenes among the benchmark's sources
# make swap's default: the benchmark's median swap by photoswap's identity (toy/evaluate.py demo)
DEMO = ("dotted-star", 8)


def source(index: int, two: float = TWO) -> Source:
    """Held-out scene `index` (toy/scenes.py), one or two subjects."""
    scene = scenes.test_scene(index, two=two)
    image, masks, _ = scenes.render(scene)
    kept = replace(scene, subjects=scene.subjects[1:])
    return Source(index, image, masks[0], scenes.render(kept)[0], scenes.caption(scene),
                  scenes.noun(scene.subjects[0]))


def digest(weights: Path) -> str:
    """sha256 of every file of a model folder (a few MB for the toy model): the cache key."""
    h = hashlib.sha256()
    for f in sorted(p for p in Path(weights).rglob("*") if p.is_file()):
        h.update(str(f.relative_to(weights)).encode() + f.read_bytes())
    return h.hexdigest()[:16]


def concept_model(name: str, weights: Path, root: Path = Path("out/toy/concepts"),
                  quiet: bool = True) -> Path:
    """The DreamBooth'd model folder of a concept, trained on first use and cached in
    root/NAME-BASE, BASE a digest of the base model's files, so that another base model never
    evicts this one's (retrained when the recipe or the concept's reference images change)."""
    base = digest(weights)
    folder = root / f"{name}-{base[:8]}"
    pictures = hashlib.sha256(b"".join(im.tobytes() for im, _ in concepts.references(name)))
    recipe = {"concept": name, "base": base, "references": pictures.hexdigest()[:16],
              **DREAMBOOTH}
    stamp = folder / "recipe.json"
    if (folder / "model" / "MODEL").is_file() and stamp.is_file():
        if json.loads(stamp.read_text()) == recipe:
            return folder / "model"
    from train import dreambooth, finetune  # noqa: PLC0415 (only when training)

    refs = folder / "references"
    concepts.write(name, refs)
    d = DREAMBOOTH
    argv = [str(refs), "--instance-prompt", concepts.prompt(name), "--weights", str(weights),
            "--steps", str(d["steps"]), "--lr", str(d["lr"]), "--batch-size", str(d["batch_size"]),
            "--seed", str(d["seed"]), "--checkpoint-every", "0", "--keep", "1", "-o", str(folder)]
    argv += ["--train-text-encoder"] * d["train_text_encoder"] + ["-q"] * quiet
    finetune.train(dreambooth.parse(argv))
    with atomic_write(stamp) as tmp:  # written last: a killed run retrains
        tmp.write_text(json.dumps(recipe, indent=2) + "\n")
    return folder / "model"


def check_model(weights: Path) -> None:
    """A UsageError (or WeightsError) unless `weights` is a toy model that loads; checked before
    any DreamBooth, so a wrong folder never costs a training run or a cached concept."""
    if not (weights / "unet").is_dir():
        raise UsageError(f"no toy model at {weights} (no unet/ there): give --weights a folder "
                         "with unet/, vae/ and text_encoder/ (weights/toy; make toy retrains it)")
    name, _ = detect_preset(weights)
    if name != "toy":
        raise UsageError(f"{weights} is not a toy model (its MODEL file does not say preset=toy; "
                         f"read as {name}): the toy swap runs on weights/toy or a copy of it")
    load(weights)  # a WeightsError says what does not fit


def load(weights: Path) -> Pipeline:
    return Pipeline.load(preset("toy"), weights, "cpu", torch.float32)


def target_prompt(src: Source, concept: str) -> tuple[str, str]:
    """(target prompt, concept words): "a photo of a sks star on a black striped background"."""
    words = f"sks {concepts.CONCEPTS[concept][0]}"
    return replace_words(src.caption, [src.subject], [words]), words


def invert_source(pipe: Pipeline, src: Source, steps: int = STEPS, guidance: float = GUIDANCE,
                  progress: bool = False) -> Inversion:
    latent = pipe.encode(Image.fromarray(src.image))
    return invert(pipe, latent, src.caption, steps, guidance, progress=progress)


def swaps(pipe: Pipeline, srcs: list[Source], invs: list[Inversion], words: list[str],
          methods: tuple[str, ...] = METHODS, steps: int = STEPS, guidance: float = GUIDANCE,
          base: Settings = SETTINGS) -> dict[str, list[np.ndarray]]:
    """uint8 images per method (and "source", the inversion's reconstruction), one per source,
    source i's subject replaced by words[i] ("sks star"); a method's sources run as one batch.
    The methods' settings derive from `base` (photoswap/swap.py method_settings)."""
    pairs = []
    for src, inv, w in zip(srcs, invs, words):
        target = replace_words(src.caption, [src.subject], [w])
        pairs.append(Pair(src.caption, target, [src.subject], [w], inv.x_T, inv.uncond))
    out: dict[str, list[np.ndarray]] = {}
    for method in methods:
        latents, _ = run(pipe, pairs, method_settings(method, base), steps, guidance)
        images = [np.asarray(im) for im in to_pil(pipe.decode(latents))]
        out.setdefault("source", images[: len(pairs)])
        out[method] = images[len(pairs) :]
    return out


@dataclass
class Measure:
    """What scores outputs against one concept: the identity encoder and the concept's reference
    embedding (toy/identity.py), and its references' colour and texture statistics."""

    encoder: identity.Encoder
    reference: torch.Tensor
    stats: tuple[np.ndarray, float]


def measure(name: str, weights: Path) -> Measure:
    file = weights / "identity.safetensors"
    if not file.is_file():
        raise UsageError(f"no {file}: the toy model's identity encoder (make toy trains it; git "
                         "checkout weights/toy restores the committed one)")
    encoder = identity.load(file)
    refs = concepts.references(name)
    return Measure(encoder, identity.reference(encoder, refs), metrics.concept_stats(refs))


def score(image: np.ndarray, src: Source, m: Measure) -> dict[str, float]:
    """Background PSNR, layout IoU, identity and the colour/texture statistics of one output
    (toy/metrics.py, toy/identity.py), its subject being where it departs from the scene
    rendered without the swapped subject."""
    region = metrics.subject_region(image, src.background)
    return {"background_psnr": metrics.background_psnr(image, src.background, src.mask),
            "layout_iou": metrics.iou(region, src.mask),
            "identity": identity.score(m.encoder, image, region, m.reference),
            **metrics.fidelity(image, region, m.stats)}


def to_json(obj) -> str:
    """JSON with an infinite PSNR (an exact background) written as null, which JSON can hold."""
    def clean(o):
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items()}
        if isinstance(o, list):
            return [clean(v) for v in o]
        return None if isinstance(o, float) and math.isinf(o) else o

    return json.dumps(clean(obj), indent=1, allow_nan=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m toy.swap", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", type=Path, default=Path("weights/toy"), help="the toy model")
    p.add_argument("--concept", choices=sorted(concepts.CONCEPTS), default=DEMO[0],
                   help=f"the concept to swap in ({DEMO[0]})")
    p.add_argument("--scene", type=int, default=DEMO[1],
                   help=f"held-out scene index ({DEMO[1]}: {source(DEMO[1]).caption[11:]})")
    p.add_argument("--cache", type=Path, default=Path("out/toy/concepts"),
                   help="where DreamBooth'd concepts are kept")
    p.add_argument("-o", "--out", type=Path, default=Path("out/swap"),
                   help="output folder (out/swap)")
    cli.add_threads(p)
    args = p.parse_args(argv)
    if args.scene < 0:
        raise UsageError("--scene: give 0 or more")
    cli.writable(args.out, folder=True)
    check_model(args.weights)
    cli.threads(args.threads, TOY)
    started = time.time()
    model = concept_model(args.concept, args.weights, args.cache, quiet=False)
    trained = time.time()
    pipe = load(model)
    src = source(args.scene)
    inv = invert_source(pipe, src, progress=True)
    inverted = time.time()
    target, words = target_prompt(src, args.concept)
    images = swaps(pipe, [src], [inv], [words])
    refs = concepts.references(args.concept)
    scorer = measure(args.concept, args.weights)
    results = {m: score(images[m][0], src, scorer) for m in METHODS}
    results["reconstruction"] = score(images["source"][0], src, scorer)  # the source branch
    results["photo"] = score(src.image, src, scorer)  # unswapped, for scale
    record = {"concept": args.concept, "scene": args.scene, "source_prompt": src.caption,
              "target_prompt": target, "weights": str(args.weights), "steps": STEPS,
              "guidance": GUIDANCE, "preset": "toy", "dreambooth": DREAMBOOTH, "metrics": results,
              "reconstruction_psnr": metrics.psnr(images["source"][0], src.image),
              "seconds": {"dreambooth": round(trained - started, 1),
                          "inversion": round(inverted - trained, 1),
                          "swaps": round(time.time() - inverted, 1)}}
    pil = {"photo.png": src.image, "reconstruction.png": images["source"][0],
           **{f"{m}.png": images[m][0] for m in METHODS}}
    big = lambda a: Image.fromarray(a).resize((128, 128), Image.Resampling.NEAREST)  # noqa: E731
    top = [label(big(src.image), "source")] + [label(big(images[m][0]), m) for m in METHODS]
    bottom = [label(big(im), f"ref {i}") for i, (im, _) in enumerate(refs[:4])]
    args.out.mkdir(parents=True, exist_ok=True)
    for name, a in pil.items():
        save_image(Image.fromarray(a), args.out / name)
    save_image(grid([top, bottom]), args.out / "grid.png")
    with atomic_write(args.out / "metrics.json") as tmp:
        tmp.write_text(to_json(record))
    print(f"{src.caption!r} -> {target!r}")
    print(f"{'':14s} {'bg PSNR':>8s} {'IoU':>6s} {'identity':>8s} {'colour':>6s} {'texture':>7s}")
    for m in (*METHODS, "reconstruction", "photo"):
        r = results[m]
        print(f"{m:14s} {r['background_psnr']:8.2f} {r['layout_iou']:6.3f} {r['identity']:8.3f} "
              f"{r['colour']:6.3f} {r['texture']:7.3f}")
    print(f"inversion reconstructs the photo at {record['reconstruction_psnr']:.2f} dB; "
          f"seconds {record['seconds']}; wrote {', '.join(pil)}, grid.png, metrics.json to "
          f"{args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
