"""GPU benchmark: 50-step text-to-image and the UNet alone, ours vs diffusers, fp16.

    python -m bench.generate             # both configs, batch 1 and 2, UNet alone; ~10 min
    python -m bench.generate --write     # also rewrite the GPU section of BENCHMARKS.md
    python -m bench.generate --configs sd2.1-base --batches 1 --skip-unet   # one row

Generation: sd2.1-base (512 px, epsilon) and sd2.1 (768 px, v-prediction), fp16, 50 DDIM steps,
guidance 7.5, batch 1 and 2, from prompt to PIL images (VAE decode included). Ours is
sd.pipeline.Pipeline over sd.weights.build(cfg, "cuda", fp16) (random weights); theirs is
diffusers' StableDiffusionPipeline over the same weights (a copy of our state dicts), with no
safety checker, a DDIMScheduler configured as SD 2.1 ships it, and transformers' CLIPTokenizer
built from our vocabulary file (pad "!"). Both start from the same latents. Per row: one
warm-up run of each (output="latent", compared: max abs diff of the final latents), one VAE
decode of each, then 3 pairs alternating which side goes first; the median seconds of each side
and the median per-pair ratio ours/diffusers. Peak memory is torch.cuda.max_memory_allocated
during a timed run, minus what was allocated before it (both pipelines' weights stay resident
so that runs can alternate), plus the pipeline's own weights: what one pipeline alone would
need. Every timed call is bracketed by torch.cuda.synchronize().

UNet alone: batch 2 (one prompt under classifier-free guidance), 64x64 latents with the
sd2.1-base UNet and 96x96 with the sd2.1 UNet, 20 alternating pairs of ~10 calls each.
"""

import argparse
import gc
import sys
import tempfile
import time
from dataclasses import replace

from bench import common
from sd import cli
from sd.config import preset

PROMPTS = ["a photo of an astronaut riding a horse on mars",
           "a watercolor painting of a lighthouse on a cliff at dawn"]
UNET_SIDES = {"sd2.1-base": 64, "sd2.1": 96}
# Where and in what dtype to run, set by main (torch loads there): CUDA fp16 for real; `--smoke`
# runs the plumbing on the CPU in fp32 with the tiny config and a few steps (a check of this
# script, not a benchmark).
DEVICE = DTYPE = None  # a torch.device, a torch.dtype


def log(msg: str) -> None:
    print(msg, flush=True)


def sync() -> None:
    if DEVICE.type == "cuda":
        import torch

        torch.cuda.synchronize()


def scheduler(cfg):
    """DDIMScheduler exactly as stabilityai/stable-diffusion-2-1{,-base} ship it."""
    from diffusers import DDIMScheduler

    s = cfg.schedule
    return DDIMScheduler(num_train_timesteps=s.train_steps, beta_start=s.beta_start,
                         beta_end=s.beta_end, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=s.steps_offset,
                         timestep_spacing="leading",
                         prediction_type="v_prediction" if s.prediction == "v" else "epsilon")


def build(cfg, tmp: str):
    """(our Pipeline, diffusers' StableDiffusionPipeline) on DEVICE in DTYPE, the same weights."""
    import torch
    from diffusers import StableDiffusionPipeline

    from sd.pipeline import Pipeline
    from sd.weights import build as build_models

    dev, dt = DEVICE, DTYPE
    torch.manual_seed(0)
    with torch.device(dev):  # random init on the GPU: seconds, not a minute of CPU
        models = build_models(cfg, dev, dt)
    for m in (models.text_encoder, models.vae, models.unet):
        m.eval().requires_grad_(False)
    ours = Pipeline(models, cfg, tokenizer=None)
    theirs = StableDiffusionPipeline(
        vae=common.reference_vae(cfg, models.vae.state_dict(), dev, dt),
        text_encoder=common.reference_text(cfg, models.text_encoder.state_dict(), dev, dt),
        tokenizer=common.clip_tokenizer(tmp, cfg.text.max_len),
        unet=common.reference_unet(cfg, models.unet.state_dict(), dev, dt),
        scheduler=scheduler(cfg), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    theirs.set_progress_bar_config(disable=True)
    return ours, theirs


def weight_bytes(*modules) -> int:
    return sum(t.numel() * t.element_size() for m in modules
               for t in [*m.parameters(), *m.buffers()])


def generation(cfg, ours, theirs, batch: int, steps: int, repeats: int) -> dict:
    import torch

    side = cfg.resolution
    prompts = (PROMPTS * batch)[:batch]
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(batch, cfg.unet.in_channels, side // 8, side // 8, generator=g)
    latents = latents.to(DEVICE, DTYPE)

    def run_ours(output="pil"):
        return ours(prompts, steps=steps, guidance=7.5, latents=latents.clone(), height=side,
                    width=side, output=output)

    def run_theirs(output="pil"):
        out = theirs(prompt=prompts, height=side, width=side, num_inference_steps=steps,
                     guidance_scale=7.5, latents=latents.clone(), output_type=output)
        return out.images

    log(f"\n== {cfg.name} text-to-image {side} px, batch {batch}, {steps} steps, {DTYPE}")
    with torch.inference_mode():
        diff = warm_up(ours, theirs, run_ours, run_theirs, steps)
        res, peaks = timed_pairs(ours, theirs, run_ours, run_theirs, repeats)
    out = res.summary()
    pred = "v" if cfg.schedule.prediction == "v" else "epsilon"
    dt = str(DTYPE).removeprefix("torch.").replace("float16", "fp16").replace("float32", "fp32")
    out.update(name=f"text-to-image, {cfg.name} ({pred}), {side} px, {steps} DDIM steps, {dt}, "
               f"batch {batch}",
               peak_ours=max(peaks["a"]), peak_theirs=max(peaks["b"]), diff=diff)
    log(f"  ours {out['ours']:.2f} s, diffusers {out['theirs']:.2f} s, ratio {out['ratio']:.3f}; "
        f"peak {out['peak_ours'] / 2**30:.2f} / {out['peak_theirs'] / 2**30:.2f} GiB")
    return out


def warm_up(ours, theirs, run_ours, run_theirs, steps: int) -> float:
    """One untimed run of each (latent output, then a VAE decode): the final latents' max abs
    difference."""
    t0 = time.perf_counter()
    a = run_ours("latent")
    sync()
    t_a = time.perf_counter() - t0
    t0 = time.perf_counter()
    b = run_theirs("latent")
    sync()
    t_b = time.perf_counter() - t0
    diff = (a.float() - b.float()).abs().max().item()
    log(f"  warm-up (latent output): ours {t_a:.2f} s, theirs {t_b:.2f} s; final latents max "
        f"abs diff {diff:.3g} (of {b.float().abs().max().item():.3g}; {DTYPE} over {steps} "
        "steps, random weights)")
    ours.decode(a)  # warm the VAE decode path too
    theirs.vae.decode(b / theirs.vae.config.scaling_factor)
    del a, b
    sync()
    return diff


def timed_pairs(ours, theirs, run_ours, run_theirs, repeats: int):
    """`repeats` pairs of timed runs, alternating which goes first: (Pairwise, peak bytes per
    side: the weights plus what a run allocates on the GPU)."""
    import torch

    own = {"a": weight_bytes(ours.models.unet, ours.models.vae, ours.models.text_encoder),
           "b": weight_bytes(theirs.unet, theirs.vae, theirs.text_encoder)}
    peaks = {"a": [], "b": []}
    res = common.Pairwise(threshold=2.0)
    for i in range(repeats):
        order = [("a", run_ours), ("b", run_theirs)]
        if i % 2:
            order.reverse()
        got = {}
        for key, fn in order:
            gc.collect()
            cuda = DEVICE.type == "cuda"
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            sync()
            base = torch.cuda.memory_allocated() if cuda else 0
            t0 = time.perf_counter()
            fn()
            sync()
            got[key] = time.perf_counter() - t0
            peak = torch.cuda.max_memory_allocated() - base if cuda else 0
            peaks[key].append(peak + own[key])
        res.a.append(got["a"])
        res.b.append(got["b"])
        res.others.append(0.0)
        log(f"    pair {i + 1} ({'ours' if order[0][0] == 'a' else 'theirs'} first): ours "
            f"{got['a']:.2f} s, theirs {got['b']:.2f} s, ratio {got['a'] / got['b']:.3f}")
    return res, peaks


def unet_alone(cfg, ours, theirs, side: int, batch: int, repeats: int) -> dict:
    import torch

    unet, ref = ours.models.unet, theirs.unet
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, cfg.unet.in_channels, side, side, generator=g).to(DEVICE, DTYPE)
    ctx = torch.randn(batch, cfg.text.max_len, cfg.unet.context_dim, generator=g)
    ctx = ctx.to(DEVICE, DTYPE)
    t = torch.tensor([999, 500] * batch, device=DEVICE)[:batch]

    def f_ours():
        return unet(x, t, ctx)

    def f_theirs():
        return ref(x, t, ctx).sample

    log(f"\n== {cfg.name} UNet alone, {DTYPE}, {batch} x 4 x {side} x {side}")
    with torch.inference_mode():
        a, b = f_ours(), f_theirs()
        diff = (a.float() - b.float()).abs().max().item()
        for _ in range(3):
            f_ours(), f_theirs()
        sync()
        t_one = common.time_call(f_ours, 3, sync)[0]
        inner = max(1, min(50, int(0.3 / max(t_one, 1e-4))))
        log(f"  max abs diff {diff:.3g} (of {b.float().abs().max().item():.3g}); "
            f"{inner} calls per sample")
        res = common.alternate(f_ours, f_theirs, repeats, inner, sync=sync, log=None, extra=0,
                               threshold=2.0)
    out = res.summary()
    dt = str(DTYPE).removeprefix("torch.").replace("float16", "fp16").replace("float32", "fp32")
    out.update(name=f"UNet forward ({cfg.name}), {dt}, {batch} x 4 x {side} x {side}",
               peak_ours=None, peak_theirs=None, diff=diff, inner=inner)
    log(f"  ours {common.fmt_s(out['ours'])}, diffusers {common.fmt_s(out['theirs'])}, median "
        f"ratio {out['ratio']:.3f} (min {out['ratio_min']:.3f}, max {out['ratio_max']:.3f})")
    return out


def table(rows: list[dict]) -> str:
    lines = [("| benchmark | ours | diffusers | ours/diffusers median ratio (min-max) | "
             "peak memory ours / diffusers | pairs | max abs diff |"),
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        mem = ("-" if r["peak_ours"] is None else
               f"{r['peak_ours'] / 2**30:.2f} / {r['peak_theirs'] / 2**30:.2f} GiB")
        pairs = f"{r['pairs']}" + (f" x {r['inner']} calls" if r.get("inner", 1) > 1 else "")
        lines.append(f"| {r['name']} | {common.fmt_s(r['ours'])} | {common.fmt_s(r['theirs'])} | "
                     f"**{r['ratio']:.3f}** ({r['ratio_min']:.3f}-{r['ratio_max']:.3f}) | {mem} | "
                     f"{pairs} | {r['diff']:.2g} |")
    return "\n".join(lines)


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", default="sd2.1-base,sd2.1")
    p.add_argument("--batches", default="1,2")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=3, help="timed pairs per generation row")
    p.add_argument("--unet-repeats", type=int, default=20, help="timed pairs for the UNet alone")
    p.add_argument("--skip-unet", action="store_true")
    p.add_argument("--skip-generate", action="store_true")
    p.add_argument("--write", action="store_true", help="rewrite the GPU section of --out")
    p.add_argument("--out", default=str(common.ROOT / "BENCHMARKS.md"))
    p.add_argument("--smoke", action="store_true",
                   help="check this script on the CPU: tiny config, fp32, 3 steps, 1 pair")
    return p.parse_args(argv)


def measure(cfgs: list, args: argparse.Namespace) -> list[dict]:
    """The rows: per config, the UNet alone and text-to-image at each batch size."""
    import torch

    rows = []
    for cfg in cfgs:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            ours, theirs = build(cfg, tmp)
            log(f"\n[{cfg.name}: built both pipelines in {time.perf_counter() - t0:.1f} s]")
            if not args.skip_unet:
                side = UNET_SIDES.get(cfg.name, cfg.resolution // 8)
                rows.append(unet_alone(cfg, ours, theirs, side, 2, args.unet_repeats))
            if not args.skip_generate:
                for b in (int(v) for v in args.batches.split(",")):
                    rows.append(generation(cfg, ours, theirs, b, args.steps, args.repeats))
            del ours, theirs
            gc.collect()
            if DEVICE.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    args = parse(argv)
    global DEVICE, DTYPE
    import torch

    DEVICE, DTYPE = torch.device("cuda"), torch.float16
    if args.smoke:
        DEVICE, DTYPE = torch.device("cpu"), torch.float32
        # one thread: on a busy 2-core machine, 2 OpenMP threads make tiny models 100x slower
        torch.set_num_threads(1)
        args.configs, args.steps, args.repeats, args.unet_repeats = "tiny", 3, 1, 2
        args.write = False
    elif not torch.cuda.is_available():
        print("no CUDA device: GPU benchmarks not run")
        return 0
    from diffusers.utils import logging as dlogging

    dlogging.set_verbosity_error()
    start = time.perf_counter()
    if DEVICE.type == "cuda":
        device = f"{torch.cuda.get_device_name()}, CUDA {torch.version.cuda}, {common.versions()}"
    else:
        device = f"CPU smoke test, {common.versions()}"
    log(device)
    cfgs = [common.config(name) for name in args.configs.split(",")]
    if args.smoke:  # both prediction types
        cfgs.append(replace(preset("tiny", "v"), name="tiny-v"))
    rows = measure(cfgs, args)
    elapsed = time.perf_counter() - start
    md = table(rows)
    log("\n" + md + f"\n\n(total {elapsed / 60:.1f} min)")
    if args.write:
        cmd = "python -m bench.generate" + "".join(
            f" {a}" for a in (argv if argv is not None else sys.argv[1:]) if a != "--write")
        body = (f"Measured {common.today()} on {device}. Command: `{cmd}`, "
                f"{elapsed / 60:.1f} min in all. Peak memory: what one pipeline alone needs "
                "(its weights plus the peak of allocations during the run).\n\n" + md + "\n")
        common.replace_section(common.Path(args.out), "gpu-results", body)
        log(f"wrote the GPU section of {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
