"""Text-to-image with classifier-free guidance and DDIM, plus image <-> latent helpers.

Batch layout under classifier-free guidance, the one place it is defined: the UNet sees
[uncond x n, cond x n] for n prompts, and `ctrl.prompts = n` tells controls so (with guidance 1
the unconditional half is skipped and the batch is [cond x n]: the last n rows are always the
conditional ones). Guidance combines out = out_uncond + g * (out_cond - out_uncond)
(Ho & Salimans 2022), as diffusers' StableDiffusionPipeline does.
"""

import math
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from sd import ddim
from sd.attention import Control
from sd.config import DTYPE_NAMES, ModelConfig
from sd.images import load_image, to_pil
from sd.tokenizer import Tokenizer
from sd.weights import Models, build, load, read, with_scaling

DTYPES = dict(zip(DTYPE_NAMES, (torch.float32, torch.float16, torch.bfloat16)))


def default_device_dtype() -> tuple[torch.device, torch.dtype]:
    """CUDA in fp16 (GroupNorm and explicit attention maps still run in fp32), else CPU fp32."""
    cuda = torch.cuda.is_available()
    return (torch.device("cuda"), torch.float16) if cuda else (torch.device("cpu"), torch.float32)


def rows(batch: int, prompts: int, half: str = "both", group: int = 0,
         groups: int = 1) -> list[int]:
    """Rows of the batch (layout above) in `half` ("uncond", "cond", "both") holding group `group`
    of `groups` equal runs of prompts (groups=2: sources then targets, paired row by row).
    Indexing with this list makes a copy: x[rows(...)] = y and += y write back, but an in-place
    method on it (x[rows(...)].add_(y), x[rows(...)][..., j] = y) edits the copy and is lost;
    `grouped` gives a view to edit in place."""
    size, cond = prompts // groups, batch - prompts  # cond == 0: guidance 1, no uncond half
    starts = {"uncond": [0] if cond else [], "cond": [cond], "both": sorted({0, cond})}[half]
    return [s + group * size + i for s in starts for i in range(size)]


def grouped(x: torch.Tensor, prompts: int, groups: int = 1) -> torch.Tensor:
    """A view of a batch in the layout above as [halves, groups, prompts // groups, ...]: halves
    is 2 under guidance ([uncond, cond]), 1 without; so grouped(attn, n, 2)[-1, 1] is the
    conditional half's targets, and editing it in place edits `x`."""
    return x.unflatten(0, (x.shape[0] // prompts, groups, prompts // groups))


def pick_device(name: str | None) -> torch.device:
    """--device: None gives cuda if present; an unusable name is a ValueError saying why."""
    here = {"cpu": 1, "cuda": torch.cuda.device_count(), "mps": torch.backends.mps.is_available()}
    try:
        device = torch.device(name) if name else default_device_dtype()[0]
    except RuntimeError:  # a type PyTorch does not know, such as "gpu"
        device = torch.device("meta")
    if (device.index or 0) >= here.get(device.type, 0):
        have = " or ".join(t for t, n in here.items() if n)
        raise ValueError(f"--device {name}: this machine has no such device; use {have}")
    return device


def check_guidance(guidance: float) -> float:
    """A ValueError unless the CFG scale is a finite number (0: the unconditional model; 1: the
    prompt alone; the CLIs' --guidance says the same)."""
    if not isinstance(guidance, (int, float)) or not math.isfinite(guidance):
        raise ValueError(f"guidance {guidance}: give a finite number (0: the unconditional "
                         "model alone; 1: the prompt without guidance; 7.5: the default)")
    return guidance


def concept_rows(vectors: dict[str, torch.Tensor], width: int) -> torch.Tensor:
    """Learned tokens' vectors as rows [n, width]; a ValueError for a wrong width or NaN."""
    for token, v in vectors.items():  # diffusers' files hold [1, width] per token
        found = v.shape[-1] if v.dim() else 1
        if found != width or v.numel() != width:
            sd1 = " (an SD 1.x embedding: SD 1.x is 768 wide)" if found == 768 else ""
            raise ValueError(f"learned token {token!r} is {list(v.shape)}{sd1}; this model takes "
                             f"one vector of {width}: use one trained for this model")
        if not v.isfinite().all():
            raise ValueError(f"learned token {token!r} holds NaN or infinite values: retrain it")
    return torch.cat([v.reshape(1, width) for v in vectors.values()])


class Pipeline:
    def __init__(self, models: Models, cfg: ModelConfig, tokenizer: Tokenizer | None = None):
        self.models, self.cfg = models, cfg
        self.tokenizer = tokenizer or Tokenizer(cfg.text.max_len, cfg.text.pad_id)
        self.ac = ddim.alphas_cumprod(cfg.schedule)

    @classmethod
    def load(cls, cfg: ModelConfig, weights: str | Path | None, device=None, dtype=None):
        """From weights in either layout; `weights=None` gives random weights (tests, demos)."""
        d, t = default_device_dtype()
        device, dtype = device or d, dtype or t
        if weights is not None:
            cfg = with_scaling(cfg, weights)
        models = build(cfg, device, dtype) if weights is None else load(weights, cfg, device, dtype)
        for m in (models.text_encoder, models.vae, models.unet):
            m.eval().requires_grad_(False)
        return cls(models, cfg)

    def add_concepts(self, file_or_vectors: "str | Path | dict[str, torch.Tensor]") -> list[int]:
        """Teach the tokenizer and text encoder learned tokens (a textual inversion file)."""
        vectors = file_or_vectors if isinstance(file_or_vectors, dict) else read(file_or_vectors)
        learned = concept_rows(vectors, self.cfg.text.width)
        ids = self.tokenizer.add_tokens(list(vectors))
        self.models.text_encoder.add_tokens(learned)
        return ids

    @property
    def device(self) -> torch.device:
        return self.models.unet.conv_in.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.models.unet.conv_in.weight.dtype

    @torch.no_grad()
    def encode_prompt(self, prompts: str | list[str]) -> torch.Tensor:
        """Prompts -> text context [B, 77, width]."""
        ids = self.tokenizer(prompts).to(self.device)
        return self.models.text_encoder(ids)

    def noise(self, n: int, height: int, width: int, seed: int | torch.Generator = 0):
        """x_T drawn on the CPU in fp32, so a seed gives the same image on any device."""
        f = self.cfg.vae.factor
        if height % f or width % f:
            raise ValueError(f"height and width must be multiples of {f}, got {height}x{width}")
        g = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)
        x = torch.randn(n, self.cfg.unet.in_channels, height // f, width // f, generator=g)
        return x.to(self.device, self.dtype)

    def guided(self, x, t, cond, uncond, guidance: float, ctrl: Control | None):
        """One guided model evaluation, as epsilon or v (whatever the model predicts)."""
        if guidance == 1.0:  # the unconditional half cancels out: save half the work
            return self.models.unet(x, t, cond, ctrl)
        out = self.models.unet(torch.cat([x, x]), t, torch.cat([uncond, cond]), ctrl)
        out_uncond, out_cond = out.chunk(2)
        return out_uncond + guidance * (out_cond - out_uncond)

    @torch.no_grad()
    def sample(self, x: torch.Tensor, cond: torch.Tensor, uncond, steps: int = 50,
               guidance: float = 7.5, ctrl: Control | None = None, eta: float = 0.0,
               generator: torch.Generator | None = None, progress: bool = False,
               callback: Callable[[int, int, torch.Tensor], torch.Tensor] | None = None):
        """Run DDIM from x_T. `uncond`: one context, or one per step (null-text); one row serves
        all prompts. `callback(step, t, x)` returns the latents to go on from (as k-diffusion)."""
        check_guidance(guidance)
        if ctrl is not None:
            ctrl.prompts, ctrl.steps = x.shape[0], steps
        ts = ddim.timesteps(steps, self.cfg.schedule)
        pred = self.cfg.schedule.prediction
        for i, t in enumerate(tqdm(ts.tolist(), disable=not progress, desc="sampling")):
            if ctrl is not None:
                ctrl.step, ctrl.t = i, t
            u = uncond[i] if isinstance(uncond, (list, tuple)) else uncond
            out = self.guided(x, t, cond, u.expand(len(cond), -1, -1), guidance, ctrl)
            t_prev = ddim.previous(t, steps, self.cfg.schedule)
            x = ddim.step(out, x, t, t_prev, self.ac, pred, eta, generator).to(x.dtype)
            if callback is not None:
                x = callback(i, t, x)
        return x

    def __call__(self, prompts: str | list[str], negative: str | list[str] = "", steps: int = 50,
                 guidance: float = 7.5, seed: int | torch.Generator = 0,
                 latents: torch.Tensor | None = None, height: int | None = None,
                 width: int | None = None, ctrl: Control | None = None, eta: float = 0.0,
                 uncond: torch.Tensor | list[torch.Tensor] | None = None, output: str = "pil",
                 progress: bool = False, callback=None):
        """Text-to-image: PIL images (output="pil") or final latents (output="latent"). `uncond`
        replaces the negative prompt's context: one tensor, or one per step (null-text's)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        negative = [negative] * len(prompts) if isinstance(negative, str) else list(negative)
        if len(negative) != len(prompts):
            raise ValueError(f"{len(negative)} negative prompts for {len(prompts)} prompts")
        g = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)
        if latents is None:  # the same generator then draws the eta > 0 noise, as diffusers does
            side = self.cfg.resolution
            latents = self.noise(len(prompts), height or side, width or side, g)
        cond = self.encode_prompt(prompts).to(self.dtype)
        if uncond is None:
            uncond = self.encode_prompt(negative).to(self.dtype)
        x = self.sample(latents.to(self.device, self.dtype), cond, uncond, steps, guidance, ctrl,
                        eta, g, progress, callback)
        return x if output == "latent" else to_pil(self.decode(x))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in [0, 1], [B, 3, H, W]."""
        images = self.models.vae.decode(latents / self.cfg.vae.scaling)
        return (images / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def encode(self, image: "Image.Image | str | Path", height: int | None = None,
               width: int | None = None) -> torch.Tensor:
        """An image -> scaled latents [1, 4, H/8, W/8]: the posterior mean."""
        x = load_image(image, height or self.cfg.resolution, width or self.cfg.resolution)
        posterior = self.models.vae.encode(x.to(self.device, self.dtype) * 2 - 1)
        return posterior.mean * self.cfg.vae.scaling
