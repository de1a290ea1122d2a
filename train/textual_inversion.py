"""Textual inversion (Gal et al. 2022, arXiv:2208.01618): learn the embedding of a NEW token
("<my-dog>") from a few images; every weight of the model stays as it was.

Only the new rows learn. While training, the token table is a NewRows module: the original rows
are a frozen buffer and the added rows their own parameter, so the optimizer never sees the old
rows. They stay bitwise unchanged without masking or restoring (diffusers' example trains the
whole table and copies the old rows back after every step), AdamW's weight decay touches only the
new rows, and a checkpoint's optimizer state is [1, width] instead of [49409, width].

What is textual inversion's own is here (the new rows, the prompt templates, the saved vector);
the loop is train/loop.py, the settings train/settings.py (TextualInversionSettings), the command
line `python -m train textual-inversion`. Defaults follow diffusers'
examples/textual_inversion/textual_inversion.py: 3000 steps, batch 1,
AdamW with weight decay 1e-2, its prompt templates (first eight), lr 5e-4 NOT scaled by the batch
(diffusers' README command scales 5e-4 by gradient accumulation 4, i.e. trains at 2e-3).
"""

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from sd.files import atomic_write
from sd.pipeline import Pipeline
from sd.tokenizer import Tokenizer
from sd.weights import read
from train import UsageError, checkpoints
from train.dataset import ImageFolder, draw, examples
from train.loop import (
    Denoiser,
    Settings,
    begin,
    denoising_loss,
    finish,
    fit,
    trainer_pipeline,
    validate,
)
from train.settings import TEMPLATES, TextualInversionSettings

FILE = "learned_embeds.safetensors"


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


def check_words(tokenizer: Tokenizer, token: str, init_word: str | None) -> int | None:
    """Refuse a --token CLIP knows or an --init-word of several tokens; the init word's id."""
    try:
        tokenizer.add_tokens([token])
    except ValueError as e:
        raise UsageError(f"--token {token!r} cannot be added ({e}); pick a new word that CLIP "
                         'does not know, such as "<my-dog>"') from e
    ids = tokenizer.encode(init_word) if init_word is not None else [None]
    if len(ids) != 1:
        raise UsageError(f"--init-word {init_word!r} is {len(ids)} tokens; pick a word that is "
                         "one token, such as dog, cat, toy or painting")
    return ids[0]


def initial_vector(pipe: Pipeline, word_id: int | None, seed: int) -> torch.Tensor:
    """The init word's row of the token table, or random with the table's std (word_id None)."""
    table = pipe.models.text_encoder.embeddings.token_embedding.weight
    if word_id is None:
        g = torch.Generator().manual_seed(seed)
        return torch.randn(table.shape[1], generator=g).to(table) * table.std()
    return table[word_id].clone()


@dataclass
class Result:
    losses: list[float]
    pipe: Pipeline  # with the token added and learned
    vectors: dict[str, torch.Tensor]  # {token: [width]}, as saved


def train(args: TextualInversionSettings) -> Result:
    """Textual inversion with these settings (checked first: a UsageError for what cannot work)."""
    args.check()
    run, cfg, side = begin(args)  # then everything else that can be checked before loading
    word_id = check_words(Tokenizer(cfg.text.max_len, cfg.text.pad_id), args.token, args.init_word)
    images = ImageFolder(args.instance_dir, side)
    for warning in images.warnings:
        run.say(f"warning: {warning}")
    if args.resume:
        folder = checkpoints.find(args.out, args.resume)
        checkpoints.expect(folder, [FILE], f"the token {args.token!r} ({FILE})")
        if args.token not in (learned := read(folder / FILE)):
            raise UsageError(f"--resume {folder}: it learned {', '.join(learned)}, not "
                             f"{args.token!r}: resume with --token {next(iter(learned))}")
    pipe = trainer_pipeline(args, run, cfg)
    m, emb = pipe.models, pipe.models.text_encoder.embeddings
    n = emb.token_embedding.weight.shape[0]  # rows before the new token
    pipe.add_concepts({args.token: initial_vector(pipe, word_id, args.seed)})
    rows = emb.token_embedding = NewRows(emb.token_embedding, n)
    m.unet.set_checkpointing(args.checkpointing)
    templates = TEMPLATES[args.what]
    latent = (cfg.unet.in_channels, side // cfg.vae.factor, side // cfg.vae.factor)

    def loss(model: nn.Module, gen: torch.Generator, micro: int) -> torch.Tensor:
        d = draw(gen, micro, args.batch_size, run, 1, latent, cfg.schedule.train_steps)
        x = images.batch(examples(len(images), args.seed, d.positions), d.u[0], side,
                         args.center_crop, args.flip)
        prompts = [templates[int(p * len(templates))].format(args.token) for p in d.pick]
        ids = pipe.tokenizer(prompts).to(run.device)
        return denoising_loss(model, m.vae, cfg, pipe.ac, x.to(run.device), ids, d).mean()

    def vectors() -> dict[str, torch.Tensor]:
        return {args.token: rows.new.detach()[0].cpu().contiguous()}

    def load_vector(folder: Path) -> None:
        with torch.no_grad():
            rows.new.copy_(read(folder / FILE)[args.token][None])

    prompt = args.validation_prompt or f"a photo of {args.token}"
    losses = fit(run, Settings.of(args), Denoiser(m.unet, m.text_encoder), [rows.new], loss,
                 write=lambda folder: save_file(vectors(), folder / FILE), load=load_vector,
                 preview=lambda file: validate(pipe, prompt, file, args.validation_steps),
                 desc="textual inversion")

    emb.token_embedding = rows.merged()
    m.unet.set_checkpointing(False)
    if run.main:  # an interrupted run never leaves half a file
        with atomic_write(args.out / FILE) as tmp:
            save_file(vectors(), tmp)
    if not args.quiet:
        run.say(f"wrote {args.out / FILE}")
    finish(run)
    return Result(losses, pipe, vectors())
