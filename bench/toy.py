"""The toy model's figures for its model card (weights/toy/README.md), on held-out scenes.

    python -m bench.toy                      # weights/toy: adherence and inversion
    python -m bench.toy --weights DIR --samples 96 --scenes 16 --guidance 7.5

Adherence (toy.judge.adherence): one held-out single-subject caption per sample ("a photo of
a purple star with white dots on a blue background", toy/scenes.py's test split), read by the
judge (weights/toy/judge.safetensors); the share of samples whose shape, whose colour and whose
texture is the caption's. Chance is 1/6 for shape, 1/8 for colour and 2/5 for texture.

Inversion: held-out scenes (one subject), and scenes of the second renderer (toy/outside.py),
encoded with the VAE, inverted with the scene's caption, then redrawn by guided DDIM and
decoded: PSNR against the scene. "ddim" redraws plain DDIM
inversion's x_T with the empty prompt as the unconditional context; "null-text" with the
optimised per-step contexts (sd/inversion.py). "vae" is the reconstruction's ceiling: the
scene encoded and decoded, no diffusion.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

from sd.config import TOY, InversionSettings


def held_out(count: int) -> list[tuple]:
    """The first `count` held-out one-subject scenes: (image uint8 [64, 64, 3], caption)."""
    from toy import scenes

    shown = [scenes.test_scene(i, two=0.0) for i in range(count)]
    return [(scenes.render(s)[0], scenes.caption(s)) for s in shown]


def inversion(pipe, pictures: list[tuple], steps: int, guidance: float) -> dict | None:
    """PSNR of the pictures (image, caption) reconstructed by `pipe` (an sd Pipeline): mean, min
    and max per way ("vae", "ddim", "null-text"); None without pictures."""
    import torch
    from PIL import Image

    from sd.images import psnr
    from sd.inversion import ddim_inversion, invert, reconstruct

    if not pictures:
        return None
    rows = {"vae": [], "ddim": [], "null-text": []}
    for image, prompt in pictures:
        target = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
        latent = pipe.encode(Image.fromarray(image))
        rows["vae"].append(psnr(pipe.decode(latent), target).item())
        cond = pipe.encode_prompt(prompt)
        x_T = ddim_inversion(pipe, latent, cond, steps, False)[-1]
        redrawn = pipe(prompt, steps=steps, guidance=guidance, latents=x_T, output="latent")
        rows["ddim"].append(psnr(pipe.decode(redrawn), target).item())
        inv = invert(pipe, latent, prompt, InversionSettings(steps, guidance))
        rows["null-text"].append(psnr(pipe.decode(reconstruct(pipe, inv)), target).item())
    return {k: {"mean": statistics.mean(v), "min": min(v), "max": max(v)} for k, v in rows.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.toy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", type=Path, default=Path("weights/toy"))
    p.add_argument("--judge", type=Path, default=Path("weights/toy/judge.safetensors"))
    p.add_argument("--samples", type=int, default=96,
                   help="adherence samples (default 96; 0: no adherence)")
    p.add_argument("--scenes", type=int, default=16,
                   help="inverted scenes (default 16; 0: none)")
    p.add_argument("--outside", type=int, default=16, help="inverted scenes of the second "
                   "renderer, toy/outside.py (default 16; 0: none)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    p.add_argument("--guidance", type=float, nargs="+", default=[7.5, 5.0],
                   help="CFG scales for adherence; the first also for inversion")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    for name in ("samples", "scenes", "outside", "steps", "threads"):
        if getattr(a, name) < (1 if name in ("steps", "threads") else 0):
            p.error(f"--{name}: give {'1' if name in ('steps', 'threads') else '0'} or more")
    import torch

    from sd.pipeline import Pipeline
    from toy import judge as judgelib
    from toy import outside

    torch.set_num_threads(a.threads)
    pipe = Pipeline.load(TOY, a.weights, torch.device("cpu"), torch.float32)
    judge = judgelib.load(a.judge)
    start = time.perf_counter()
    out = {"weights": str(a.weights), "steps": a.steps, "samples": a.samples, "adherence": [
        {"guidance": g, **judgelib.adherence(pipe, judge, a.samples, a.steps, g)[0]}
        for g in a.guidance if a.samples]}
    if a.scenes:
        out["inversion"] = inversion(pipe, held_out(a.scenes), a.steps, a.guidance[0])
    if a.outside:
        out["inversion outside"] = inversion(pipe, [outside.scene(i) for i in range(a.outside)],
                                             a.steps, a.guidance[0])
    out["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
