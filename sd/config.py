"""Frozen configs for every SD 2.1 component, with named presets; and the settings of the
inference-time methods of sd/ (inversion). Torch-free: the command lines read defaults here.

Each preset mirrors the config.json shipped with the official weights (copies live in
tests/data/): text_encoder/config.json, vae/config.json, unet/config.json and
scheduler/scheduler_config.json of stabilityai/stable-diffusion-2-1{,-base} and
runwayml/stable-diffusion-v1-5. SD 1.x differs from 2.x only in configuration: TextConfig's
activation and pad_id, UNetConfig's heads, context_dim and linear_projection.
"""

from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class TextConfig:
    """OpenCLIP ViT-H/14 text tower as SD 2.x uses it (transformers CLIPTextConfig); SD 1.x's
    OpenAI CLIP ViT-L/14 is the same network at other sizes, with quick-GELU."""

    vocab_size: int = 49408
    width: int = 1024
    layers: int = 23  # OpenCLIP has 24; SD 2.x takes the penultimate layer's output
    heads: int = 16
    mlp_width: int = 4096
    max_len: int = 77
    pad_id: int = 0  # SD 2.x pads with id 0 ("!"); SD 1.x pads with 49407 (end of text)
    activation: str = "gelu"  # exact GELU; OpenAI CLIP (SD 1.x): "quick_gelu", x*sigmoid(1.702x)


@dataclass(frozen=True)
class VAEConfig:
    """AutoencoderKL (diffusers vae/config.json); the same for every SD 1.x/2.x model."""

    channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    image_channels: int = 3
    latent_channels: int = 4
    groups: int = 32
    scaling: float = 0.18215  # latent std of the training set, from the LDM paper's configs

    @property
    def factor(self) -> int:
        """Image side / latent side: every level but the last halves it (8 for SD)."""
        return 2 ** (len(self.channels) - 1)


@dataclass(frozen=True)
class UNetConfig:
    """UNet2DConditionModel (diffusers unet/config.json)."""

    channels: tuple[int, ...] = (320, 640, 1280, 1280)
    attention: tuple[bool, ...] = (True, True, True, False)  # CrossAttn{Down,Up}Block2D or not
    # diffusers calls this `attention_head_dim`, but SD 2.x configs store head COUNTS in it.
    heads: tuple[int, ...] = (5, 10, 20, 20)
    layers_per_block: int = 2
    in_channels: int = 4
    out_channels: int = 4
    context_dim: int = 1024
    groups: int = 32
    # True for SD 2.1 (768-v): fp16 scores overflow in the reference's explicit path. Our explicit
    # path always computes scores and softmax in fp32 and SDPA accumulates in fp32, so both
    # values run the same code; the flag is kept so a config states what upstream states.
    upcast_attention: bool = False
    # SD 2.x projects the tokens into and out of each transformer with linear layers; SD 1.x
    # projects the feature map with 1x1 convolutions: the same map, stored as [C, C, 1, 1].
    linear_projection: bool = True


@dataclass(frozen=True)
class ScheduleConfig:
    """DDIMScheduler as SD 2.1 ships it (scheduler/scheduler_config.json)."""

    train_steps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    prediction: str = "epsilon"  # "epsilon" (2.1-base) or "v" (2.1, 768)
    steps_offset: int = 1  # "leading" spacing shifted by one: 50 steps -> 981, 961, ..., 1

    def __post_init__(self):
        assert self.prediction in ("epsilon", "v"), f"unknown prediction {self.prediction!r}"


@dataclass(frozen=True)
class ModelConfig:
    name: str
    text: TextConfig = field(default_factory=TextConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    resolution: int = 512  # the image side the model was trained at

    @property
    def version(self) -> str:
        """"1.x" or "2.x": the text tower and UNet projections it has (toy and tiny: 2.x)."""
        return "2.x" if self.unet.linear_projection else "1.x"


# stabilityai/stable-diffusion-2-1-base: 512 px, epsilon prediction.
SD21_BASE = ModelConfig(name="sd2.1-base")

# stabilityai/stable-diffusion-2-1: 768 px, v-prediction, upcast_attention true.
SD21 = ModelConfig(
    name="sd2.1",
    unet=UNetConfig(upcast_attention=True),
    schedule=ScheduleConfig(prediction="v"),
    resolution=768,
)

# Tiny random model for CPU tests: every structural feature of SD 2.1 (several levels, a level
# without attention, per-level head counts, skip bookkeeping, the real tokenizer) at toy widths.
TINY = ModelConfig(
    name="tiny",
    text=TextConfig(width=32, layers=2, heads=4, mlp_width=64),
    vae=VAEConfig(channels=(16, 16, 32, 32), layers_per_block=1, groups=8),
    unet=UNetConfig(
        channels=(32, 64, 64),
        attention=(True, True, False),
        heads=(2, 4, 4),
        layers_per_block=2,
        context_dim=32,
        groups=8,
    ),
    resolution=64,
)

# The toy world's model (toy/pretrain.py trains it on toy/scenes.py; weights/toy/README.md):
# SD 2.1-base's modules, tokenizer and schedule at widths sized to train on two CPU cores in a
# few hours (the measured stage times are in the model card). The VAE has one downsampling
# fewer (factor 4: 64 px -> 16x16x8).
TOY = ModelConfig(
    name="toy",
    text=TextConfig(width=64, layers=4, heads=4, mlp_width=256),
    # 8 latent channels, not SD's 4, for the textures and two-colour backgrounds of the toy
    # world's second version (weights/toy/README.md, "Sizes"). scaling: 1 / std of the sampled
    # latents of 2,048 training scenes through the trained VAE (measured 1.0716 by
    # toy/pretrain.py), the role 0.18215 plays for SD. A folder's vae/config.json overrides it
    # (sd.weights.with_scaling), so a retrained model brings its own.
    vae=VAEConfig(channels=(16, 32, 64), layers_per_block=1, groups=8, latent_channels=8,
                  scaling=1.0716),
    unet=UNetConfig(
        channels=(32, 64, 64),
        in_channels=8,
        out_channels=8,
        attention=(True, True, False),
        heads=(2, 4, 4),
        layers_per_block=1,
        context_dim=64,
        groups=8,
    ),
    resolution=64,
)

# runwayml/stable-diffusion-v1-5, 512 px, epsilon: OpenAI CLIP ViT-L/14's text tower, all 12
# layers (SD 1.x conditions on the last), 8 heads per attention at every level (not 64-wide
# heads), 1x1-convolution projections, 768-wide context; VAE and schedule as SD 2.1-base.
SD15 = ModelConfig(
    name="sd1.5",
    text=TextConfig(width=768, layers=12, heads=12, mlp_width=3072, pad_id=49407,
                    activation="quick_gelu"),
    unet=UNetConfig(heads=(8, 8, 8, 8), context_dim=768, linear_projection=False),
)
SD14 = replace(SD15, name="sd1.4")  # CompVis/stable-diffusion-v1-4: the same network

# TINY with SD 1.x's differences, for the CPU tests of the 1.x code paths.
TINY_SD1 = replace(TINY, name="sd1.5-tiny",
                   text=replace(TINY.text, pad_id=49407, activation="quick_gelu"),
                   unet=replace(TINY.unet, heads=(2, 2, 2), linear_projection=False))

PRESETS: dict[str, ModelConfig] = {c.name: c for c in (SD21_BASE, SD21, SD15, SD14, TINY,
                                                         TINY_SD1, TOY)}
RANDOM = ("tiny", "sd1.5-tiny")  # presets that run on random weights when given no --weights


def preset(name: str, prediction: str | None = None) -> ModelConfig:
    """The named preset, optionally with its prediction type overridden ("epsilon" or "v")."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    cfg = PRESETS[name]
    if prediction is not None:
        cfg = replace(cfg, schedule=replace(cfg.schedule, prediction=prediction))
    return cfg


DTYPE_NAMES = ("fp32", "fp16", "bf16")  # sd.pipeline.DTYPES' keys, listed by the CLIs


@dataclass(frozen=True)
class InversionSettings:
    """How sd/inversion.py inverts a photo; null-text inversion's defaults are the notebook's."""

    steps: int = 50  # DDIM steps; null-text inversion takes at most MAX_INVERSION_STEPS
    guidance: float = 7.5  # the CFG scale the inversion will be sampled with
    fast: bool = False  # negative-prompt inversion (Miyake et al.): nothing optimised
    inner_steps: int = 10  # Adam iterations per step, at most
    lr: float = 1e-2  # Adam's, decayed as lr * (1 - i / 100) over steps i
    epsilon: float = 1e-5  # an iteration stops once the loss is under epsilon + i * 2e-5


MAX_INVERSION_STEPS = 100  # lr * (1 - i/100) is negative past it
