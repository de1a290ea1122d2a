"""The CLIP text tower as SD uses it, with transformers' CLIPTextModel names.

SD 2.x: OpenCLIP ViT-H/14. It conditions on the output of the 23rd of OpenCLIP's 24 blocks
("penultimate"), passed through the final LayerNorm; the diffusers text encoder stores exactly
those 23 blocks. SD 1.x: OpenAI CLIP ViT-L/14, all 12 blocks and the final LayerNorm.
Pre-LN blocks, causal mask, no padding mask (so the pad id matters); exact-erf GELU in ViT-H,
quick-GELU in OpenAI's ViT-L.
"""

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from sd.attention import attention
from sd.config import TextConfig


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (rearrange(p(x), "b n (h d) -> b h n d", h=self.heads)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(rearrange(attention(q, k, v, causal=True), "b h n d -> b n (h d)"))


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's sigmoid approximation of GELU, with which ViT-L (SD 1.x) was trained."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"gelu": F.gelu, "quick_gelu": quick_gelu}  # TextConfig.activation


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int, activation: str):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        self.act = ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Layer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.self_attn = SelfAttention(cfg.width, cfg.heads)
        self.layer_norm1 = nn.LayerNorm(cfg.width)
        self.mlp = MLP(cfg.width, cfg.mlp_width, cfg.activation)
        self.layer_norm2 = nn.LayerNorm(cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class TextEncoder(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = nn.Module()
        self.embeddings.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.embeddings.position_embedding = nn.Embedding(cfg.max_len, cfg.width)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList([Layer(cfg) for _ in range(cfg.layers)])
        self.final_layer_norm = nn.LayerNorm(cfg.width)

    def add_tokens(self, vectors: torch.Tensor) -> None:
        """Append rows [n, width] to the token embedding (ids len(vocab)...; textual inversion).
        Pipeline.add_concepts checks the rows first (sd.pipeline.concept_rows)."""
        w = self.embeddings.token_embedding.weight
        new = nn.Embedding(w.shape[0] + len(vectors), w.shape[1], device=w.device, dtype=w.dtype)
        with torch.no_grad():
            new.weight.copy_(torch.cat([w, vectors.to(w)]))
        new.weight.requires_grad_(w.requires_grad)
        self.embeddings.token_embedding = new

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids [B, 77] -> per-token context [B, 77, width] for the UNet's cross-attention."""
        x = self.embeddings.token_embedding(ids)
        x = x + self.embeddings.position_embedding.weight[: ids.shape[1]]
        for layer in self.encoder.layers:
            x = layer(x)
        return self.final_layer_norm(x)
