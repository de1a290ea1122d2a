"""Textual inversion (Gal et al. 2022, arXiv:2208.01618): learn the embedding of a NEW token
("<my-dog>") from a few images; every weight of the model stays as it was.

Only the new rows learn. While training, the token table is a NewRows module: the original rows
are a frozen buffer and the added rows their own parameter, so the optimizer never sees the old
rows. They stay bitwise unchanged without masking or restoring (diffusers' example trains the
whole table and copies the old rows back after every step), AdamW's weight decay touches only the
new rows, and a checkpoint's optimizer state is [1, width] instead of [49409, width].

Defaults follow diffusers' examples/textual_inversion/textual_inversion.py: 3000 steps, batch 1,
AdamW with weight decay 1e-2, its prompt templates (first eight), lr 5e-4 NOT scaled by the batch
(diffusers' README command scales 5e-4 by gradient accumulation 4, i.e. trains at 2e-3).
"""

import argparse
import os
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from sd.pipeline import Pipeline
from sd.weights import WeightsError, read
from train.data import (Denoiser, ImageFolder, UsageError, add_arguments, denoising_loss, draw,
                        examples, find_checkpoint, finish, load_pipeline, lr_at, optimizer_step,
                        restore, save_checkpoint, start, training_state, validate)

# diffusers textual_inversion.py imagenet_templates_small / imagenet_style_templates_small
TEMPLATES = {
    "object": ["a photo of a {}", "a rendering of a {}", "a cropped photo of the {}",
               "the photo of a {}", "a photo of a clean {}", "a photo of a dirty {}",
               "a dark photo of the {}", "a photo of my {}"],
    "style": ["a painting in the style of {}", "a rendering in the style of {}",
              "a cropped painting in the style of {}", "the painting in the style of {}",
              "a clean painting in the style of {}", "a dirty painting in the style of {}",
              "a dark painting in the style of {}", "a picture in the style of {}"],
}
FILE = "learned_embeds.safetensors"

EPILOG = """examples:
  python -m train.textual_inversion photos/my-dog --token "<my-dog>" --init-word dog \\
      --weights weights/sd2.1-base -o out/my-dog-ti
  # then, in Python (python -m sd has no option for learned tokens yet):
  #   pipe = Pipeline.load(preset("sd2.1-base"), "weights/sd2.1-base")
  #   pipe.add_concepts("out/my-dog-ti/learned_embeds.safetensors")
  #   pipe("a photo of <my-dog> on the beach")[0].save("dog.png")

  # try the code on a CPU without weights (random tiny model):
  python -m train.textual_inversion photos/my-dog --token "<my-dog>" --model tiny --steps 20

Output, in -o: learned_embeds.safetensors ({token: vector}, loaded by
sd.pipeline.Pipeline.add_concepts), checkpoint-N/ (the vector and state.pt; `latest` names the
newest, --resume latest continues bit for bit), validation-N.png with --validate-every N.
Multi-GPU: torchrun --nproc_per_node N -m train.textual_inversion ... (as train.dreambooth)."""


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m train.textual_inversion", description=__doc__,
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p, lr=5e-4, steps=3000, checkpoint_every=500, out="out/textual-inversion")
    p.add_argument("--token", required=True, help='the new word, e.g. "<my-dog>"; it must not '
                   "be in CLIP's vocabulary already")
    p.add_argument("--init-word", help='start from this one-token word\'s embedding, e.g. "dog" '
                   "(default: random, with the table's standard deviation)")
    p.add_argument("--what", choices=list(TEMPLATES), default="object",
                   help="prompt templates: an object (a photo of a TOKEN) or a style (object)")
    return p.parse_args(argv)


class NewRows(nn.Module):
    """A token table whose first n rows are a frozen buffer and whose added rows learn."""

    def __init__(self, table: nn.Embedding, n: int):
        super().__init__()
        self.register_buffer("old", table.weight.detach()[:n], persistent=False)
        self.new = nn.Parameter(table.weight.detach()[n:].clone())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        n = len(self.old)
        old = F.embedding(ids.clamp(max=n - 1), self.old)
        new = F.embedding((ids - n).clamp(min=0), self.new)
        return torch.where((ids >= n)[..., None], new, old)

    def merged(self) -> nn.Embedding:
        """A plain nn.Embedding again (what sd.clip.TextEncoder holds)."""
        weight = torch.cat([self.old, self.new.detach()])
        return nn.Embedding.from_pretrained(weight, freeze=True)


def initial_vector(pipe: Pipeline, word: str | None, seed: int) -> torch.Tensor:
    table = pipe.models.text_encoder.embeddings.token_embedding.weight
    if word is None:
        g = torch.Generator().manual_seed(seed)
        return torch.randn(table.shape[1], generator=g).to(table) * table.std()
    ids = pipe.tokenizer.encode(word)
    if len(ids) != 1:
        raise UsageError(f"--init-word {word!r} is {len(ids)} tokens; pick a word that is one "
                         "token, such as dog, cat, toy or painting")
    return table[ids[0]].clone()


@dataclass
class Result:
    losses: list[float]
    pipe: Pipeline  # with the token added and learned
    vectors: dict[str, torch.Tensor]  # {token: [width]}, as saved


def train(args: argparse.Namespace) -> Result:
    run = start(args.device, args.quiet)
    pipe = load_pipeline(args.model, args.weights, run.device, args.seed)
    cfg, m, out = pipe.cfg, pipe.models, args.out
    side = args.resolution or cfg.resolution
    if side % cfg.vae.factor:
        raise UsageError(f"--resolution must be a multiple of {cfg.vae.factor}, got {side}")
    vector = initial_vector(pipe, args.init_word, args.seed)
    emb = m.text_encoder.embeddings
    n = emb.token_embedding.weight.shape[0]  # rows before the new token
    try:
        pipe.add_concepts({args.token: vector})
    except ValueError as e:
        raise UsageError(f"--token {args.token!r} cannot be added ({e}); pick a new word that "
                         'CLIP does not know, such as "<my-dog>"') from e
    rows = emb.token_embedding = NewRows(emb.token_embedding, n)
    images = ImageFolder(args.instance_dir, side)
    for warning in images.warnings:
        run.say(f"warning: {warning}")
    m.unet.set_checkpointing(args.checkpointing)
    model = Denoiser(m.unet, m.text_encoder)
    opt = torch.optim.AdamW([rows.new], lr=args.lr, weight_decay=1e-2)  # diffusers' defaults
    scaler = torch.amp.GradScaler(run.device.type, enabled=args.precision == "fp16")
    gen = torch.Generator().manual_seed(args.seed)
    first = 0
    if args.resume:
        folder = find_checkpoint(out, args.resume)
        with torch.no_grad():
            rows.new.copy_(read(folder / FILE)[args.token][None])
        first = restore(folder, opt, scaler, gen)
        run.say(f"resumed from {folder} at step {first}")
    ddp = run.wrap(model)

    templates = TEMPLATES[args.what]
    latent = (cfg.unet.in_channels, side // cfg.vae.factor, side // cfg.vae.factor)
    losses = []
    bar = tqdm(range(first, args.steps), initial=first, total=args.steps,
               desc="textual inversion", disable=args.quiet or not run.main)
    for step in bar:
        total = 0.0
        for a in range(args.grad_accum):
            d = draw(gen, step * args.grad_accum + a, args.batch_size, run, 1, latent,
                     cfg.schedule.train_steps)
            x = images.batch(examples(len(images), args.seed, d.positions), d.u[0], side,
                             args.center_crop, args.flip)
            prompts = [templates[int(p * len(templates))].format(args.token) for p in d.pick]
            ids = pipe.tokenizer(prompts).to(run.device)
            with run.accumulating(ddp, a < args.grad_accum - 1):
                with run.autocast(args.precision):
                    loss = denoising_loss(ddp, m.vae, cfg, pipe.ac, x.to(run.device), ids,
                                          d).mean()
                scaler.scale(loss / args.grad_accum).backward()
            total += loss.item() / args.grad_accum
        optimizer_step(opt, scaler, [rows.new], args.max_grad_norm,
                       lr_at(args.lr, step, args.warmup_steps))
        losses.append(total)
        bar.set_postfix(loss=f"{total:.4f}")
        done = step + 1
        keep = done == args.steps or (args.checkpoint_every and done % args.checkpoint_every == 0)
        look = args.validate_every and done % args.validate_every == 0
        if run.main and keep:
            vectors = {args.token: rows.new.detach()[0].cpu()}
            save_checkpoint(out, done, lambda folder: save_file(vectors, folder / FILE),
                            training_state(done, opt, scaler, gen))
        if run.main and look:
            prompt = args.validation_prompt or f"a photo of {args.token}"
            validate(pipe, prompt, out / f"validation-{done}.png", args.validation_steps, run,
                     args.precision)
        if keep or look:
            run.barrier()  # the other ranks wait for rank 0's checkpoint or validation

    emb.token_embedding = rows.merged()
    m.unet.set_checkpointing(False)
    vectors = {args.token: rows.new.detach()[0].cpu().contiguous()}
    out.mkdir(parents=True, exist_ok=True)
    if run.main:  # written beside, then renamed: an interrupted run never leaves half a file
        save_file(vectors, out / (FILE + ".tmp"))
        os.replace(out / (FILE + ".tmp"), out / FILE)
    if not args.quiet:
        run.say(f"wrote {out / FILE}")
    finish(run)
    return Result(losses, pipe, vectors)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        train(args)
    except (UsageError, WeightsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
