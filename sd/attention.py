"""The one attention kernel, the sites that name attention layers, and the control interface.

Every attention layer in this package (UNet self and cross, CLIP causal self, VAE mid-block)
computes its output with `attention()`. UNet layers additionally hand their heads-split
(q, k, v) to a control object when one is passed to `UNet.forward(..., ctrl=...)`:

    out = ctrl(q, k, v, site)          # q: [B, H, Nq, D], k/v: [B, H, Nk, D] -> [B, H, Nq, D]

A control may call the fused kernel, compute the explicit map with `attention_map()` and read or
replace it, or return any other output. With `ctrl=None` the fused kernel runs and nothing else
happens (training, torch.compile).

The UNet's residual blocks are sites too (kind "resnet"): their residual branch's output, before
the skip is added, passes through the control's `features`:

    h = ctrl.features(h, site)         # h: [B, C, H, W] -> [B, C, H, W]; the base returns h
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v with PyTorch's fused kernels (flash / memory-efficient / math)."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def wide(x: torch.Tensor) -> torch.Tensor:
    """x in fp32 at least: half types are upcast, fp64 stays fp64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def attention_map(q: torch.Tensor, k: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """The explicit map softmax(q k^T / sqrt(d)) in fp32 (or fp64), differentiable: [..., Nq, Nk].

    Scores are formed in fp32 because SD 2.1 (768-v) overflows fp16 in q k^T; upstream guards the
    same spot with `upcast_attention`.
    """
    scores = (wide(q) @ wide(k).transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if causal:
        n, m = scores.shape[-2:]
        mask = torch.ones(n, m, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
    return scores.softmax(dim=-1)


def apply_map(attn: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """attn @ v, in fp32 (or fp64), returned in v's dtype (the explicit counterpart of
    `attention`)."""
    return (attn @ wide(v)).to(v.dtype)


@dataclass(frozen=True)
class Site:
    """Where an attention layer sits in the UNet, fixed at construction.

    `name` is the layer's state-dict prefix, e.g. "up_blocks.1.attentions.0.transformer_blocks.0
    .attn2": the string a researcher sees in the checkpoint. `level` counts halvings of the latent
    side, so the layer attends over (latent_h >> level) * (latent_w >> level) queries.
    """

    name: str
    kind: str  # "self" or "cross" (attention), or "resnet" (a residual block)
    place: str  # "down", "mid" or "up"
    level: int

    def shape(self, latent_hw: tuple[int, int]) -> tuple[int, int]:
        """(h, w) of the queries: each downsampler maps a side n to ceil(n / 2)."""
        return tuple(-(-n // 2**self.level) for n in latent_hw)


class Control:
    """Base control: plain fused attention. Subclass and override `__call__` to edit attention.

    `step` (index into the sampling schedule, 0 first), `steps` and `t` (the diffusion timestep)
    are set by the sampler before each UNet call, so a control never counts calls to know where it
    is. `prompts` is the number of prompts; under classifier-free guidance the pipeline lays the
    batch out as [uncond x prompts, cond x prompts] (`sd.pipeline.rows` picks rows from it).
    """

    def __init__(self) -> None:
        self.step = 0
        self.steps = 0
        self.t = 0
        self.prompts = 1

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, site: Site):
        return attention(q, k, v)

    def features(self, h: torch.Tensor, site: Site) -> torch.Tensor:
        """A residual block's branch output [B, C, H, W] (site.kind "resnet"): unchanged."""
        return h


class Attention(nn.Module):
    """Multi-head attention with diffusers' parameter names (to_q, to_k, to_v, to_out.0). The UNet
    sets `site` at construction; the VAE's mid-block variant has biases on q, k, v."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, bias: bool = False):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=bias)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=bias)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])  # .0 in the checkpoint; .1 was dropout
        self.site: Site | None = None

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                ctrl: Control | None = None) -> torch.Tensor:
        context = x if context is None else context
        split = "b n (h d) -> b h n d"
        q = rearrange(self.to_q(x), split, h=self.heads)
        k = rearrange(self.to_k(context), split, h=self.heads)
        v = rearrange(self.to_v(context), split, h=self.heads)
        out = attention(q, k, v) if ctrl is None else ctrl(q, k, v, self.site)
        return self.to_out[0](rearrange(out, "b h n d -> b n (h d)"))
