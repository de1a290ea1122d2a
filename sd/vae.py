"""AutoencoderKL (diffusers layout): images [-1, 1] <-> latents, smaller per side by
2^(levels - 1) (8x for SD, 4x for the toy model).

Raw `encode`/`decode` work on unscaled latents as diffusers' AutoencoderKL does; the pipeline
multiplies by `VAEConfig.scaling` (0.18215) so that the UNet sees unit-variance latents.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from sd.attention import Attention
from sd.blocks import Downsample, GroupNorm, ResBlock, Upsample
from sd.config import VAEConfig

EPS = 1e-6  # every GroupNorm of the VAE (LDM's Normalize)


class MidAttention(Attention):
    """Single-head self-attention over all pixels, with a GroupNorm in front and a residual."""

    def __init__(self, channels: int, groups: int):
        super().__init__(channels, heads=1, bias=True)
        self.group_norm = GroupNorm(groups, channels, eps=EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        y = super().forward(rearrange(self.group_norm(x), "b c h w -> b (h w) c"))
        return x + rearrange(y, "b (h w) c -> b c h w", h=h, w=w)


class Stage(nn.Module):
    """A level (resnets, then a downsampler or upsampler but on the last) or the mid block
    (resnet, attention, resnet)."""

    def __init__(self, c_in: int, c_out: int, count: int, groups: int, attention: bool = False):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResBlock(c_in if j == 0 else c_out, c_out, groups, None, EPS) for j in range(count)])
        if attention:
            self.attentions = nn.ModuleList([MidAttention(c_out, groups)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, resnet in enumerate(self.resnets):
            x = resnet(x)
            if i == 0 and hasattr(self, "attentions"):
                x = self.attentions[0](x)
        for resample in getattr(self, "downsamplers", []) or getattr(self, "upsamplers", []):
            x = resample(x)
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch = cfg.channels
        self.conv_in = nn.Conv2d(cfg.image_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList()
        for i, c in enumerate(ch):
            stage = Stage(ch[max(i - 1, 0)], c, cfg.layers_per_block, cfg.groups)
            if i < len(ch) - 1:
                stage.downsamplers = nn.ModuleList([Downsample(c, asymmetric=True)])
            self.down_blocks.append(stage)
        self.mid_block = Stage(ch[-1], ch[-1], 2, cfg.groups, attention=True)
        self.conv_norm_out = GroupNorm(cfg.groups, ch[-1], eps=EPS)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)  # mean, logvar

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for stage in self.down_blocks:
            x = stage(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch = tuple(reversed(cfg.channels))
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = Stage(ch[0], ch[0], 2, cfg.groups, attention=True)
        self.up_blocks = nn.ModuleList()
        for i, c in enumerate(ch):
            stage = Stage(ch[max(i - 1, 0)], c, cfg.layers_per_block + 1, cfg.groups)
            if i < len(ch) - 1:
                stage.upsamplers = nn.ModuleList([Upsample(c)])
            self.up_blocks.append(stage)
        self.conv_norm_out = GroupNorm(cfg.groups, ch[-1], eps=EPS)
        self.conv_out = nn.Conv2d(ch[-1], cfg.image_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for stage in self.up_blocks:
            x = stage(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


@dataclass
class Posterior:
    """The encoder's diagonal Gaussian over (unscaled) latents."""

    mean: torch.Tensor
    std: torch.Tensor

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device,
                            dtype=self.mean.dtype)
        return self.mean + self.std * noise


class VAE(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        z2 = 2 * cfg.latent_channels
        self.quant_conv = nn.Conv2d(z2, z2, 1)
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)

    def encode(self, x: torch.Tensor) -> Posterior:
        """Images [B, 3, H, W] in [-1, 1] -> posterior over unscaled latents [B, 4, H/8, W/8]."""
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        logvar = logvar.clamp(-30.0, 20.0)  # as LDM's DiagonalGaussianDistribution
        return Posterior(mean, torch.exp(0.5 * logvar))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latents -> images in (about) [-1, 1]."""
        return self.decoder(self.post_quant_conv(z))
