"""DreamBooth (Ruiz et al. 2023, arXiv:2208.12242): fine-tune SD 2.1 on a few images of a subject
bound to a rare token ("a photo of sks dog"), optionally with prior preservation.

The method follows diffusers' examples/dreambooth/train_dreambooth.py: frozen VAE, latents from a
posterior sample, uniform timesteps, MSE to eps (or v), prior loss weighted by --prior-weight.
What is DreamBooth's own is here (which parameters learn, the class images, the loss with its
prior term, the exported model folder); the loop is train/loop.py, the settings
train/settings.py (DreamBoothSettings), the command line `python -m train dreambooth`.
"""

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from sd.files import atomic_write
from sd.images import save_image
from sd.pipeline import Pipeline
from sd.weights import FILES
from train import checkpoints
from train.checkpoints import atomic_folder, save_weights
from train.dataset import IMAGE_SUFFIXES, ImageFolder, draw, examples
from train.loop import (
    Denoiser,
    Run,
    Settings,
    begin,
    denoising_loss,
    finish,
    fit,
    trainer_pipeline,
    validate,
)
from train.settings import DreamBoothSettings


def class_images(pipe: Pipeline, prompts: list[str], folder: Path, count: int, side: int,
                 run: Run, precision: str) -> None:
    """Fill `folder` up to `count` images; class-K.png is drawn from seed K and prompt K mod
    len(prompts), which is saved beside it as class-K.txt (its caption)."""
    folder.mkdir(parents=True, exist_ok=True)
    have = sum(f.suffix.lower() in IMAGE_SUFFIXES for f in folder.iterdir())
    names, k = [], 0
    while len(names) < count - have:
        if not (folder / f"class-{k:05d}.png").exists():
            names.append(f"class-{k:05d}.png")
        k += 1
    chunks = [names[i : i + 4] for i in range(0, len(names), 4)]
    for chunk in tqdm(chunks, desc="class images", disable=run.quiet):
        seeds = [int(n[6:11]) for n in chunk]
        texts = [prompts[s % len(prompts)] for s in seeds]
        latents = torch.cat([pipe.noise(1, side, side, s) for s in seeds])
        with run.autocast(precision):
            images = pipe(texts, latents=latents)
        for image, name, text in zip(images, chunk, texts):
            with atomic_write(folder / f"{name[:-4]}.txt") as tmp:  # before its image: the
                tmp.write_text(text + "\n")  # image is what says "done"
            save_image(image, folder / name)  # atomic: a killed run never leaves half a PNG


@dataclass
class Result:
    losses: list[float]  # mean loss of each step run here, on this rank's examples
    pipe: Pipeline  # with the trained weights


def prior_images(args: DreamBoothSettings, pipe: Pipeline, run, side: int) -> ImageFolder:
    """The class images of prior preservation: generated into --class-dir where missing (by the
    main process; the others wait), then read."""
    if run.main:
        class_images(pipe, args.class_prompts, args.class_dir, args.num_class_images, side, run,
                     args.precision)
    run.barrier()
    classes = ImageFolder(args.class_dir, side, limit=args.num_class_images)
    for warning in classes.warnings:
        run.say(f"warning: {warning}")
    return classes


def train(args: DreamBoothSettings) -> Result:
    """DreamBooth with these settings (checked first: a UsageError for what cannot work)."""
    args.check()
    run, cfg, side = begin(args)
    instances = ImageFolder(args.instance_dir, side)
    for warning in instances.warnings:
        run.say(f"warning: {warning}")
    names = ["unet"] + (["text_encoder"] if args.train_text_encoder else [])
    if args.resume:  # before anything loads: is it a checkpoint of this kind of run?
        checkpoints.expect(checkpoints.find(args.out, args.resume),
                           [f"{FILES[n]}.safetensors" for n in names], " and ".join(names))
    pipe = trainer_pipeline(args, run, cfg)
    m = pipe.models
    classes = prior_images(args, pipe, run, side) if args.class_prompt else None
    trained: dict[str, nn.Module] = {n: getattr(m, n) for n in names}
    for module in trained.values():
        module.train().requires_grad_(True)
    m.unet.set_checkpointing(args.checkpointing)
    model = Denoiser(m.unet, trained.get("text_encoder"))

    # Rows are [instance x b, class x b], each with its image's caption or the folder's prompt;
    # a frozen encoder encodes each distinct prompt once.
    parts, b = (2 if classes else 1), args.batch_size
    frozen: dict[str, torch.Tensor] = {}

    def text(prompts: list[str]) -> torch.Tensor:
        if args.train_text_encoder:
            return pipe.tokenizer(prompts).to(run.device)  # encoded in the Denoiser, with grad
        with torch.no_grad():
            for p in set(prompts) - frozen.keys():
                frozen[p] = m.text_encoder(pipe.tokenizer([p]).to(run.device))[0]
        return torch.stack([frozen[p] for p in prompts])

    def prompts(folder: ImageFolder, index: list[int], default: str) -> list[str]:
        return [folder.captions[i % len(folder)] or default for i in index]

    n = max(len(instances), len(classes) if classes else 0)  # as diffusers' DreamBoothDataset
    latent = (cfg.unet.in_channels, side // cfg.vae.factor, side // cfg.vae.factor)

    def loss(model: nn.Module, gen: torch.Generator, micro: int) -> torch.Tensor:
        d = draw(gen, micro, b, run, parts, latent, cfg.schedule.train_steps)
        index = examples(n, args.seed, d.positions)
        x = [instances.batch(index, d.u[0], side, args.center_crop, args.flip)]
        words = prompts(instances, index, args.instance_prompt)
        if classes:
            x.append(classes.batch(index, d.u[1], side, args.center_crop, args.flip))
            words += prompts(classes, index, args.class_prompts[0])
        rows = denoising_loss(model, m.vae, cfg, pipe.ac, torch.cat(x).to(run.device),
                              text(words), d)
        if classes:  # prior preservation, Ruiz et al. eq. 2
            return rows[:b].mean() + args.prior_weight * rows[b:].mean()
        return rows.mean()

    prompt = args.validation_prompt or args.instance_prompt
    losses = fit(run, Settings.of(args), model, [p for p in model.parameters() if p.requires_grad],
                 loss, write=lambda folder: save_weights(folder, cfg, **trained),
                 load=lambda folder: checkpoints.load_modules(folder, **trained),
                 preview=lambda file: validate(pipe, prompt, file, args.validation_steps),
                 desc="dreambooth")

    for module in trained.values():
        module.eval().requires_grad_(False)
    m.unet.set_checkpointing(False)
    if run.main:
        export(args.out / "model", pipe)
    if not args.quiet:
        run.say(f"wrote {args.out / 'model'}")
    finish(run)
    return Result(losses, pipe)


def export(folder: Path, pipe: Pipeline) -> None:
    """All three components (the frozen ones copied) + MODEL: a folder every loader takes."""
    m, cfg = pipe.models, pipe.cfg
    with atomic_folder(folder) as tmp:
        save_weights(tmp, cfg, unet=m.unet, text_encoder=m.text_encoder, vae=m.vae)
        # the marker weights/fetch.py writes: sd.weights.detect_preset reads the variant from it
        (tmp / "MODEL").write_text(f"# written by train/dreambooth.py\npreset={cfg.name}\n"
                                   f"prediction={cfg.schedule.prediction}\n"
                                   f"resolution={cfg.resolution}\n")
