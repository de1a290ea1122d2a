"""`make swap` on the toy world: the whole method, offline, on a CPU, measured against exact masks.

The parts `python -m toy swap` (toy/__main__.py, whose --help describes the steps) and the
benchmark (toy/evaluate.py) run: the DreamBooth'd concept model, cached (concept_model); the
held-out sources (source); their null-text inversion (invert_source); the methods' swaps (swaps);
the scores against the exact render (measure, score).
"""

import hashlib
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from photoswap import pnp
from photoswap.settings import METHODS, PRESETS, PnPSettings, Settings, method_settings
from photoswap.swap import Pair, replace_words, run
from sd.config import InversionSettings, preset
from sd.errors import UsageError
from sd.files import atomic_write
from sd.images import to_pil
from sd.inversion import Inversion, invert
from sd.pipeline import Pipeline
from sd.weights import detect_preset
from toy import concepts, identity, metrics, scenes
from toy.settings import DEMO, DREAMBOOTH, TWO  # noqa: F401 (DEMO: make swap's default)
from train.settings import DreamBoothSettings

STEPS, GUIDANCE = 50, 7.5  # the paper's sampling settings; inversion at the same
SETTINGS = PRESETS["toy"]  # photoswap/settings.py says why and how it was chosen
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


def source(index: int, two: float = TWO) -> Source:
    """Held-out scene `index` (toy/scenes.py), one or two subjects."""
    scene = scenes.test_scene(index, two=two)
    image, masks, _ = scenes.render(scene)
    kept = replace(scene, subjects=scene.subjects[1:])
    return Source(index, image, masks[0], scenes.render(kept)[0], scenes.caption(scene),
                  scenes.noun(scene.subjects[0]))


def digest(weights: Path) -> str:
    """sha256 of every file of a model folder but its notes (*.md: the model card changes with
    its prose), a few MB for the toy model: the cache key."""
    h = hashlib.sha256()
    for f in sorted(p for p in Path(weights).rglob("*") if p.is_file() and p.suffix != ".md"):
        h.update(str(f.relative_to(weights)).encode() + f.read_bytes())
    return h.hexdigest()[:16]


def concept_model(name: str, weights: Path, root: Path = Path("out/toy/concepts"),
                  quiet: bool = True, recipe: dict | None = None) -> Path:
    """The DreamBooth'd model folder of a concept, trained on first use and cached in
    root/NAME-BASE, BASE a digest of the base model's files, so that another base model never
    evicts this one's (retrained when the recipe or the concept's reference images change)."""
    base = digest(weights)
    folder = root / f"{name}-{base[:8]}"
    pictures = hashlib.sha256(b"".join(im.tobytes() for im, _ in concepts.references(name)))
    d = DREAMBOOTH if recipe is None else recipe  # the recipe: DreamBoothSettings' fields;
    # "captions": "world" captions each image in the world's words (concepts.caption,
    # concepts.class_captions) instead of one prompt per folder
    world = d.get("captions") == "world"
    if "num_class_images" in d:  # prior preservation: the class images, shared by concepts
        word = concepts.CONCEPTS[name][0]  # of one class word and base model
        prompts = (concepts.class_captions(word, d["num_class_images"]) if world else
                   f"a photo of {scenes.article(word)} {word}")
        d = {"class_prompt": prompts, "class_dir":
             str(root / f"class-{word}{'-world' if world else ''}-{base[:8]}"), **d}
    recipe = {"concept": name, "base": base, "references": pictures.hexdigest()[:16], **d}
    stamp = folder / "recipe.json"
    if (folder / "model" / "MODEL").is_file() and stamp.is_file():
        if json.loads(stamp.read_text()) == recipe:
            return folder / "model"
    from train import dreambooth  # noqa: PLC0415 (only when training)

    refs = folder / "references"
    concepts.write(name, refs, captions=world)
    d = {k: v for k, v in d.items() if k != "captions"}
    dreambooth.train(DreamBoothSettings(instance_dir=refs, instance_prompt=concepts.prompt(name),
                                        weights=weights, out=folder, checkpoint_every=0, keep=1,
                                        quiet=quiet, **d))
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
    toy_pipeline(weights)  # a WeightsError says what does not fit


def toy_pipeline(weights: Path) -> Pipeline:
    return Pipeline.load(preset("toy"), weights, "cpu", torch.float32)


def target_prompt(src: Source, concept: str) -> tuple[str, str]:
    """(target prompt, concept words): "a photo of a sks star on a black striped background"."""
    words = f"sks {concepts.CONCEPTS[concept][0]}"
    return replace_words(src.caption, [src.subject], [words]), words


def invert_source(pipe: Pipeline, src: Source, steps: int = STEPS, guidance: float = GUIDANCE,
                  progress: bool = False) -> Inversion:
    latent = pipe.encode(Image.fromarray(src.image))
    return invert(pipe, latent, src.caption, InversionSettings(steps, guidance), progress)


def swaps(pipe: Pipeline, srcs: list[Source], invs: list[Inversion], words: list[str],
          methods: tuple[str, ...] = tuple(METHODS), steps: int = STEPS, guidance: float = GUIDANCE,
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
        settings = method_settings(method, base)
        batch = pairs
        if isinstance(settings, PnPSettings):  # PnP replays its own inversion of the photo
            trajectories = [pnp.inversion(pipe, pipe.encode(Image.fromarray(src.image)), steps)
                            for src in srcs]
            batch = [replace(p, x_T=tr[0], uncond=None, trajectory=tr)
                     for p, tr in zip(pairs, trajectories)]
        latents, _ = run(pipe, batch, settings, steps, guidance)
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
