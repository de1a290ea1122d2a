"""What `python -m photoswap` does once its arguments parse: load, swap, draw, write.

Separate from __main__.py so that parsing (and --help) never waits for torch.
"""

import argparse
import json
import sys
import time
from dataclasses import asdict

import torch
from PIL import Image

from photoswap import pnp
from photoswap.align import subject_indices
from photoswap.settings import settings_for
from photoswap.swap import Pair, control, replace_words, run, subjects_of
from photoswap.visual import Recorder, label, layout_rgb, normalise, sweep
from sd import ddim
from sd.attention import Site
from sd.cli import open_pipeline
from sd.config import InversionSettings
from sd.controls import Combined
from sd.files import atomic_write
from sd.images import grid, load_image, open_image, overlay, save_image, to_pil
from sd.inversion import invert
from sd.inversion import load as load_inversion
from sd.pipeline import Pipeline
from sd.tokenizer import Tokenizer
from sd.weights import resolve


def check_concepts(tok: Tokenizer, concepts: list[str], learned: list[str], embeds) -> None:
    """A placeholder such as "<my-dog>" must be one token: one a textual-inversion file adds."""
    for concept in concepts:
        for word in concept.split():
            if word.startswith("<") and word.endswith(">") and len(tok.encode(word)) != 1:
                where = (f"{embeds} defines {', '.join(learned)}" if learned else
                         "pass the textual-inversion file that defines it with --embeds FILE")
                raise ValueError(f"concept token {word!r} is unknown to the tokenizer: {where}")
    if learned and not any(t in c.split() for c in concepts for t in learned):
        raise ValueError(f"the concept {' / '.join(concepts)!r} does not use the token(s) "
                         f"{', '.join(learned)} that {embeds} defines")


def user_mask(path) -> torch.Tensor:
    """Any image -> [1, 1, H, W] in [0, 1] (brightness); resized to the latent by the control."""
    im = open_image(path)
    grey = torch.frombuffer(bytearray(im.convert("L").tobytes()), dtype=torch.uint8)
    return grey.reshape(1, 1, im.height, im.width).float() / 255


def execute(args: argparse.Namespace, learned: list[str]) -> int:
    """Check what needs the config, load, swap, draw, write; returns the exit code."""
    started = time.time()
    cfg, weights, why = resolve(args.model, args.weights)
    target, settings, mask = prepare(args, cfg, learned)
    pipe = open_pipeline(cfg, weights, why, args.device, args.dtype, args.threads, args.height,
                         args.width, 4, args.seed)
    if args.embeds:
        pipe.add_concepts(args.embeds)
    pair, steps, guidance, photo, inverted = source(args, pipe, target)
    ctrl = control(pipe, [pair], settings, args.explicit, mask)
    recorder = Recorder(subjects_of(pipe, [pair]), tuple(pair.x_T.shape[2:]),
                        1 if args.layout else None)
    if args.heatmap or args.layout:  # beside the swap: the branches' own maps
        ctrl = Combined(ctrl, recorder)
    latents, _ = run(pipe, [pair], settings, steps, guidance, args.explicit, mask,
                     args.negative, ctrl, not args.quiet)
    pictures = draw(args, pipe, pair, settings, latents, photo, recorder, steps, guidance, mask)
    record = {"source": args.prompt, "target": target, "subject": args.subject,
              "concept": args.concept, "method": args.method, "preset": args.preset,
              "settings": asdict(settings), "steps": steps, "guidance": guidance,
              "seed": None if inverted else args.seed,
              "image": str(args.image) if args.image else None,
              "inversion": str(args.inversion) if args.inversion else None,
              "inverted": inverted, "mask": str(args.mask) if args.mask else None,
              "explicit": args.explicit, "model": cfg.name,
              "weights": str(weights) if weights else None, "dtype": str(pipe.dtype),
              "size": [args.height or cfg.resolution, args.width or cfg.resolution],
              "seconds": round(time.time() - started, 2)}
    args.out.mkdir(parents=True, exist_ok=True)
    for name, image in pictures.items():
        save_image(image, args.out / name)
    with atomic_write(args.out / "settings.json") as tmp:
        tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"wrote {', '.join(pictures)} and settings.json to {args.out}", file=sys.stderr)
    return 0


def prepare(args: argparse.Namespace, cfg, learned: list[str]):
    """What can be checked once the config is known, before loading: (target prompt, settings,
    user mask or None)."""
    tok = Tokenizer(cfg.text.max_len, cfg.text.pad_id)
    if learned:
        tok.add_tokens(learned)
    check_concepts(tok, args.concept, learned, args.embeds)
    target = args.target or replace_words(args.prompt, args.subject, args.concept)
    subject_indices(tok, args.prompt, args.subject)  # absent words: the error lists the prompt's
    subject_indices(tok, target, args.concept)
    blend = False if args.no_blend else True if args.blend_start is None else args.blend_start
    settings = settings_for(args.method, args.preset, args.phi, args.m, args.a, blend)
    if args.steps is not None:
        ddim.timesteps(args.steps, cfg.schedule)  # a step count the schedule cannot take: now
    return target, settings, user_mask(args.mask) if args.mask else None


def source(args: argparse.Namespace, pipe: Pipeline, target: str):
    """The pair to swap from a saved inversion, a photo inverted now, or a seed's noise:
    (pair, steps, guidance, photo or None, how it was inverted or None)."""
    steps = args.steps or 50
    guidance = 7.5 if args.guidance is None else args.guidance
    h, w = args.height or pipe.cfg.resolution, args.width or pipe.cfg.resolution
    if args.inversion:
        inv = load_inversion(args.inversion, pipe, args.steps)
        if inv.prompt != args.prompt:
            raise ValueError(f"{args.inversion} was inverted with the prompt {inv.prompt!r}: give "
                             "that prompt as the source prompt")
        guidance = inv.guidance if args.guidance is None else args.guidance
        pair = Pair(args.prompt, target, args.subject, args.concept, inv.x_T, inv.uncond)
        return pair, inv.steps, guidance, None, inv.method
    if args.method == "pnp":  # its own inversion: DDIM under the empty prompt, replayed
        photo = to_pil(load_image(args.image, h, w))[0]
        trajectory = pnp.inversion(pipe, pipe.encode(args.image, h, w), steps)
        pair = Pair(args.prompt, target, args.subject, args.concept, trajectory[0],
                    trajectory=trajectory)
        return pair, steps, guidance, photo, "ddim (pnp)"
    if args.image:
        photo = to_pil(load_image(args.image, h, w))[0]
        inv = invert(pipe, pipe.encode(args.image, h, w), args.prompt,
                     InversionSettings(steps, guidance, fast=args.fast), not args.quiet)
        pair = Pair(args.prompt, target, args.subject, args.concept, inv.x_T, inv.uncond)
        return pair, steps, guidance, photo, inv.method
    pair = Pair(args.prompt, target, args.subject, args.concept, pipe.noise(1, h, w, args.seed))
    return pair, steps, guidance, None, None


def draw(args, pipe: Pipeline, pair: Pair, settings, latents, photo, recorder: Recorder,
         steps: int, guidance: float, mask) -> dict:
    """The pictures to write, by file name."""
    source, swapped = to_pil(pipe.decode(latents))
    pictures = {"swap.png": swapped, "source.png": source}
    row = [label(photo, "photo")] if photo else []
    row += [label(source, "source"), label(swapped, f"{args.method}: {', '.join(args.concept)}")]
    pictures["grid.png"] = grid([row])
    if args.heatmap:
        heat = normalise(recorder.heat.float()).cpu()
        pictures["heat.png"] = grid([[label(overlay(source, heat[0]), " ".join(args.subject)),
                                      label(overlay(swapped, heat[1]), " ".join(args.concept))]])
    if args.layout:
        hw = Site("layout", "self", "any", 1).shape(recorder.latent_hw)
        rgb = to_pil(layout_rgb(recorder.layout, hw))
        pictures["layout.png"] = grid([[label(im.resize(source.size, Image.Resampling.NEAREST),
                                              name) for im, name in zip(rgb, ("source", "swap"))]])
    if args.sweep_phi:
        cells = sweep(pipe, pair, settings, args.sweep_phi, args.sweep_a, steps, guidance,
                      args.explicit, mask, not args.quiet)
        pictures["sweep.png"] = grid([[label(to_pil(pipe.decode(z))[0], f"phi {p} A {a}")
                                       for p, a, z in row] for row in cells])
    return pictures
