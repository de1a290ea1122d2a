"""The SD 2.x UNet (diffusers UNet2DConditionModel), every parameter named as its checkpoint key.

Shape of the network, for channels (320, 640, 1280, 1280) and a 64x64 latent:
    conv_in -> down_blocks 0..3 (64, 32, 16, 8 px; attention in the first three) -> mid_block
    -> up_blocks 0..3 (8, 16, 32, 64 px; attention in the last three) -> conv_out
Every resnet and downsampler output is kept as a skip and concatenated, last first, to the
up-block resnet inputs (layers_per_block + 1 resnets per up block).
"""

import math
from functools import partial

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from sd.attention import Attention, Control, Site
from sd.blocks import Downsample, GroupNorm, ResBlock, Upsample
from sd.config import UNetConfig


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding, [cos, sin] order (diffusers flip_sin_to_cos=True, freq_shift=0)."""
    half = dim // 2
    # Built on t's device: a host-to-device copy here would block on every UNet call on CUDA.
    k = torch.arange(half, dtype=torch.float32, device=t.device)
    angles = t.float()[:, None] * torch.exp(-math.log(10000) * k / half)[None]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


class GEGLU(nn.Module):
    """Linear to twice the width; first half is the value, second half the exact-GELU gate."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class TransformerBlock(nn.Module):
    """BasicTransformerBlock: pre-LN self-attention, cross-attention to the text, GEGLU MLP."""

    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, context_dim)
        self.norm3 = nn.LayerNorm(dim)
        # net.1 is a parameterless dropout in the checkpoint's module list; keep the indices.
        self.ff = nn.Module()
        self.ff.net = nn.Sequential(GEGLU(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, context: torch.Tensor,
                ctrl: Control | None = None) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x), ctrl=ctrl)
        x = x + self.attn2(self.norm2(x), context, ctrl=ctrl)
        return x + self.ff.net(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Transformer2DModel: GroupNorm, projection in, transformer block, projection out, plus
    the input. The projections are linear on tokens (SD 2.x `use_linear_projection`) or 1x1
    convolutions on the map (SD 1.x): the same map, applied on either side of the reshape."""

    def __init__(self, dim: int, heads: int, context_dim: int, groups: int, linear: bool = True):
        super().__init__()
        self.linear = linear
        self.norm = GroupNorm(groups, dim, eps=1e-6)  # 1e-6 here, 1e-5 in the resnets (LDM)
        self.proj_in = nn.Linear(dim, dim) if linear else nn.Conv2d(dim, dim, 1)
        self.transformer_blocks = nn.ModuleList([TransformerBlock(dim, heads, context_dim)])
        self.proj_out = nn.Linear(dim, dim) if linear else nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor,
                ctrl: Control | None = None) -> torch.Tensor:
        h, w = x.shape[-2:]
        if self.linear:  # SD 2.x: project the tokens
            y = self.proj_in(rearrange(self.norm(x), "b c h w -> b (h w) c"))
        else:  # SD 1.x: project the map
            y = rearrange(self.proj_in(self.norm(x)), "b c h w -> b (h w) c")
        for block in self.transformer_blocks:
            y = block(y, context, ctrl)
        if self.linear:
            return x + rearrange(self.proj_out(y), "b (h w) c -> b c h w", h=h, w=w)
        return x + self.proj_out(rearrange(y, "b (h w) c -> b c h w", h=h, w=w))


class Block(nn.Module):
    """A down, mid or up block: resnets, each optionally followed by a spatial transformer (the
    mid block: two resnets, one transformer between them). UNet.layer runs one of each."""

    def __init__(self, resnets: list[ResBlock], attentions: list[SpatialTransformer] | None):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        if attentions:
            self.attentions = nn.ModuleList(attentions)


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        self.checkpointing = False
        ch, n, groups = cfg.channels, len(cfg.channels), cfg.groups
        emb_dim = 4 * ch[0]

        def res(c_in, c_out):
            return ResBlock(c_in, c_out, groups, emb_dim, eps=1e-5)

        def attn(level, c, count):
            if not cfg.attention[level]:
                return None
            return [SpatialTransformer(c, cfg.heads[level], cfg.context_dim, groups,
                                       cfg.linear_projection)
                    for _ in range(count)]

        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_embedding = nn.Module()
        self.time_embedding.linear_1 = nn.Linear(ch[0], emb_dim)
        self.time_embedding.linear_2 = nn.Linear(emb_dim, emb_dim)

        skips = [ch[0]]  # channels of every skip tensor, in the order the down path makes them
        self.down_blocks = nn.ModuleList()
        for i, c in enumerate(ch):
            c_prev = ch[max(i - 1, 0)]
            block = Block(
                [res(c_prev if j == 0 else c, c) for j in range(cfg.layers_per_block)],
                attn(i, c, cfg.layers_per_block),
            )
            skips += [c] * cfg.layers_per_block
            if i < n - 1:
                block.downsamplers = nn.ModuleList([Downsample(c)])
                skips.append(c)
            self.down_blocks.append(block)

        self.mid_block = Block([res(ch[-1], ch[-1]), res(ch[-1], ch[-1])],
                               [SpatialTransformer(ch[-1], cfg.heads[-1], cfg.context_dim, groups,
                                                   cfg.linear_projection)])

        self.up_blocks = nn.ModuleList()
        c_prev = ch[-1]
        for i, c in enumerate(reversed(ch)):
            level = n - 1 - i
            count = cfg.layers_per_block + 1
            resnets = [res((c_prev if j == 0 else c) + skips.pop(), c) for j in range(count)]
            block = Block(resnets, attn(level, c, count))
            if level > 0:
                block.upsamplers = nn.ModuleList([Upsample(c)])
            self.up_blocks.append(block)
            c_prev = c
        assert not skips, "every skip connection must be consumed by an up-block resnet"

        self.conv_norm_out = GroupNorm(groups, ch[0], eps=1e-5)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)
        self.name_sites()

    def name_sites(self) -> None:
        """Name every attention layer and residual block after its state-dict prefix, once and
        for all."""
        n = len(self.cfg.channels)
        for name, module in self.named_modules():
            if isinstance(module, (Attention, ResBlock)):
                place = name.split("_")[0]
                index = n - 1 if place == "mid" else int(name.split(".")[1])
                level = {"down": index, "mid": n - 1, "up": n - 1 - index}[place]
                kind = ("resnet" if isinstance(module, ResBlock) else
                        "self" if name.endswith("attn1") else "cross")
                module.site = Site(name, kind, place, level)

    @property
    def sites(self) -> list[Site]:
        """Every attention site, in execution order."""
        return [m.site for m in self.modules() if isinstance(m, Attention)]

    def set_checkpointing(self, on: bool = True) -> None:
        """Recompute each layer's activations in the backward pass (saves memory when training)."""
        self.checkpointing = on

    def layer(self, block: Block, i: int, x: torch.Tensor, emb: torch.Tensor,
              context: torch.Tensor, ctrl: Control | None) -> torch.Tensor:
        """Resnet i of a block, then its transformer i if it has one: where `ctrl` goes in."""
        resnet = block.resnets[i]
        x = resnet(x, emb, None if ctrl is None else partial(ctrl.features, site=resnet.site))
        if hasattr(block, "attentions") and i < len(block.attentions):
            x = block.attentions[i](x, context, ctrl)
        return x

    def forward(self, x: torch.Tensor, t, context: torch.Tensor,
                ctrl: Control | None = None) -> torch.Tensor:
        """Predict noise (or v) for latents x [B, 4, h, w] at timestep(s) t given text context."""
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        emb = timestep_embedding(t, self.cfg.channels[0]).to(x.dtype)
        emb = self.time_embedding.linear_2(F.silu(self.time_embedding.linear_1(emb)))
        layer = self.layer
        if self.checkpointing and torch.is_grad_enabled():
            layer = partial(checkpoint, self.layer, use_reentrant=False)

        x = self.conv_in(x)
        skips = [x]
        for block in self.down_blocks:
            for i in range(len(block.resnets)):
                x = layer(block, i, x, emb, context, ctrl)
                skips.append(x)
            if hasattr(block, "downsamplers"):
                x = block.downsamplers[0](x)
                skips.append(x)

        for i in range(len(self.mid_block.resnets)):  # resnet, transformer, resnet
            x = layer(self.mid_block, i, x, emb, context, ctrl)

        for block in self.up_blocks:
            for i in range(len(block.resnets)):
                x = layer(block, i, torch.cat([x, skips.pop()], dim=1), emb, context, ctrl)
            if hasattr(block, "upsamplers"):
                # Upsample to the next skip's size, so latents of odd sides still line up.
                x = block.upsamplers[0](x, size=skips[-1].shape[-2:])
        return self.conv_out(F.silu(self.conv_norm_out(x)))
