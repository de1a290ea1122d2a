"""The trainers' settings: one dataclass per method, what `python -m train` parses into and what
Python code builds directly, e.g.

    from train import dreambooth
    from train.settings import DreamBoothSettings
    dreambooth.train(DreamBoothSettings(instance_dir=Path("photos/dog"), instance_prompt="a
                     photo of sks dog", weights=Path("weights/sd2.1-base"), steps=400))

Each field is the command line's option of the same name (batch_size is --batch-size). Torch-free:
the command line reads the defaults here before torch loads.
"""

import math
from dataclasses import dataclass, fields
from pathlib import Path

from sd.errors import UsageError
from sd.files import unwritable

# Textual inversion's prompt templates: diffusers' textual_inversion.py
# imagenet_templates_small / imagenet_style_templates_small (the first eight of each).
TEMPLATES = {
    "object": ["a photo of a {}", "a rendering of a {}", "a cropped photo of the {}",
               "the photo of a {}", "a photo of a clean {}", "a photo of a dirty {}",
               "a dark photo of the {}", "a photo of my {}"],
    "style": ["a painting in the style of {}", "a rendering in the style of {}",
              "a cropped painting in the style of {}", "the painting in the style of {}",
              "a clean painting in the style of {}", "a dirty painting in the style of {}",
              "a dark painting in the style of {}", "a picture in the style of {}"],
}


@dataclass(kw_only=True)
class TrainerSettings:
    """What every trainer takes: the images, the model, the optimisation, checkpoints."""

    instance_dir: Path  # a folder of images of the concept
    out: Path  # checkpoints, validation images, the result
    model: str = "auto"  # a preset of sd.config, or "auto": from the weights
    weights: Path | None = None  # default: weights/sd2.1-base, or weights/MODEL
    steps: int
    lr: float  # AdamW's, not scaled by the batch size
    batch_size: int = 1  # images per step and per process
    grad_accum: int = 1  # micro-batches per step
    warmup_steps: int = 0  # linear warmup, then constant
    max_grad_norm: float = 1.0  # 0: no clipping
    resolution: int | None = None  # training image side; default: the model's
    center_crop: bool = False  # else a random square, drawn anew each time an image is used
    flip: bool = False  # random horizontal flips
    precision: str = "fp32"  # autocast dtype over fp32 master weights (fp16 adds a GradScaler)
    checkpointing: bool = False  # gradient checkpointing in the UNet
    checkpoint_every: int = 500  # and at the end; 0: at the end only
    keep: int = 3  # the newest complete checkpoints kept (0: all)
    resume: str | None = None  # "latest" or a checkpoint folder
    validate_every: int = 0  # write validation-N.png every N steps (0: never)
    validation_prompt: str | None = None
    validation_steps: int = 50  # DDIM steps of a validation image
    seed: int = 0  # data order, crops, noise, timesteps
    device: str | None = None  # default: cuda if present
    quiet: bool = False  # no progress bars

    PATHS = ("instance_dir", "out", "weights", "class_dir")

    def __post_init__(self):  # paths may be given as strings (a JSON recipe, a notebook)
        for name in self.PATHS:
            if isinstance(getattr(self, name, None), str):
                setattr(self, name, Path(getattr(self, name)))

    def problems(self) -> list[str]:
        """What cannot work, one message each, named as the command line names it."""
        found = [
            (self.steps < 1, "--steps: give 1 or more"),
            (self.batch_size < 1, "--batch-size: give 1 or more"),
            (self.grad_accum < 1, "--grad-accum: give 1 or more"),
            (not (math.isfinite(self.lr) and self.lr > 0), "--lr: give a positive number"),
            (self.warmup_steps < 0, "--warmup-steps: give 0 or more"),
            (not 0 <= self.max_grad_norm < math.inf,
             "--max-grad-norm: give 0 (no clipping) or more"),
            (self.resolution is not None and self.resolution < 8,
             "--resolution: give a multiple of 8"),
            (self.checkpoint_every < 0, "--checkpoint-every: give 0 (at the end only) or more"),
            (self.keep < 0, "--keep: give 0 (keep all) or more"),
            (self.validate_every < 0, "--validate-every: give 0 (never) or more"),
            (self.validation_steps < 1, "--validation-steps: give 1 or more"),
        ]
        problems = [message for failed, message in found if failed]
        if problem := unwritable(self.out, folder=True):
            problems.append(f"-o: {problem}")
        return problems

    def check(self) -> "TrainerSettings":
        """These settings, or a UsageError naming the first that cannot work."""
        if problems := self.problems():
            raise UsageError(problems[0])
        return self

    @classmethod
    def of(cls, namespace) -> "TrainerSettings":
        """From anything holding the fields as attributes (an argparse.Namespace)."""
        return cls(**{f.name: getattr(namespace, f.name) for f in fields(cls)})


@dataclass(kw_only=True)
class DreamBoothSettings(TrainerSettings):
    """DreamBooth (train/dreambooth.py). The defaults are Photoswap's setting: lr 1e-6, 800
    steps (with train_text_encoder)."""

    out: Path = Path("out/dreambooth")
    steps: int = 800
    lr: float = 1e-6
    instance_prompt: str  # "a photo of sks dog"
    train_text_encoder: bool = False  # fine-tune the text encoder too, at the same lr
    # prior preservation: "a photo of a dog"; several prompts are used in turn (class image K is
    # drawn from prompt K mod their number, which is saved beside it as its caption)
    class_prompt: str | list[str] | None = None
    class_dir: Path | None = None  # where class images are (or get) cached
    num_class_images: int = 100
    prior_weight: float = 1.0  # prior loss weight

    def problems(self) -> list[str]:
        class_dir = self.class_dir and unwritable(self.class_dir, folder=True)
        found = [(self.class_prompt is not None and not all(p.strip() for p in self.class_prompts),
                  "--class-prompt: give a prompt, not an empty one"),
                 (bool(self.class_prompt) and self.class_dir is None,
                  "--class-prompt needs --class-dir, where class images are cached"),
                 (bool(class_dir), f"--class-dir: {class_dir}"),
                 (self.num_class_images < 1, "--num-class-images: give 1 or more"),
                 (not 0 <= self.prior_weight < math.inf, "--prior-weight: give 0 or more")]
        return super().problems() + [message for failed, message in found if failed]

    @property
    def class_prompts(self) -> list[str]:
        """--class-prompt as a list (empty without prior preservation)."""
        p = self.class_prompt
        return [] if p is None else [p] if isinstance(p, str) else list(p)


@dataclass(kw_only=True)
class TextualInversionSettings(TrainerSettings):
    """Textual inversion (train/textual_inversion.py). The defaults are diffusers' example's:
    3000 steps, lr 5e-4 (not scaled by the batch)."""

    out: Path = Path("out/textual-inversion")
    steps: int = 3000
    lr: float = 5e-4
    token: str  # the new word, "<my-dog>"; not in CLIP's vocabulary already
    init_word: str | None = None  # start from this one-token word's embedding (else random)
    what: str = "object"  # a key of TEMPLATES

    def problems(self) -> list[str]:
        found = [(not self.token.strip() or " " in self.token.strip(),
                  '--token: give one new word without spaces, such as "<my-dog>"'),
                 (self.what not in TEMPLATES, f"--what: give one of {', '.join(TEMPLATES)}")]
        return super().problems() + [message for failed, message in found if failed]
