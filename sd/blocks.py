"""What the UNet and the VAE share, as in LDM and diffusers: fp32 GroupNorm, resnet, resampling."""

import torch
import torch.nn.functional as F
from torch import nn


class GroupNorm(nn.GroupNorm):
    """GroupNorm computed in fp32 at least (as LDM's GroupNorm32): fp16 variance over 64x64x40
    values loses precision; fp64 stays fp64."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wide = torch.promote_types(x.dtype, torch.float32)
        w = None if self.weight is None else self.weight.to(wide)
        b = None if self.bias is None else self.bias.to(wide)
        return F.group_norm(x.to(wide), self.num_groups, w, b, self.eps).to(x.dtype)


class ResBlock(nn.Module):
    """ResnetBlock2D: GroupNorm-SiLU-conv twice, the time embedding added in between."""

    def __init__(self, c_in: int, c_out: int, groups: int, emb_dim: int | None, eps: float):
        super().__init__()
        self.norm1 = GroupNorm(groups, c_in, eps=eps)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        if emb_dim is not None:
            self.time_emb_proj = nn.Linear(emb_dim, c_out)
        self.norm2 = GroupNorm(groups, c_out, eps=eps)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        if c_in != c_out:
            self.conv_shortcut = nn.Conv2d(c_in, c_out, 1)
        self.site = None  # the UNet names its resnets (sd.attention.Site, kind "resnet")

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None,
                features=None) -> torch.Tensor:
        """`features(h)`, if given, reads or replaces the residual branch's output h [B, C, H, W]
        before the skip is added (the UNet passes its control's `features` here)."""
        h = self.conv1(F.silu(self.norm1(x)))
        if emb is not None:
            h = h + self.time_emb_proj(F.silu(emb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        if features is not None:
            h = features(h)
        skip = self.conv_shortcut(x) if hasattr(self, "conv_shortcut") else x
        return skip + h


class Downsample(nn.Module):
    """Stride-2 3x3 conv. The VAE pads (0, 1, 0, 1) asymmetrically; the UNet pads 1 all round."""

    def __init__(self, channels: int, asymmetric: bool = False):
        super().__init__()
        self.asymmetric = asymmetric
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0 if asymmetric else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)) if self.asymmetric else x)


class Upsample(nn.Module):
    """Nearest-neighbour resize (to `size` if given, else 2x) then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if size is None:
            size = (x.shape[-2] * 2, x.shape[-1] * 2)
        return self.conv(F.interpolate(x, size=size, mode="nearest"))
