"""MasaCtrl's mutual self-attention (Cao et al. 2023, arXiv:2304.08465) on sd's control interface.

From step `start_step` on, in the decoder's self-attention layers, each target row's queries
read its source row's keys and values: the target keeps the source's content (appearance,
texture) while its own prompt and queries lay it out. Cross-attention is untouched, and so is
every layer before the start. Both CFG halves are edited, each target row reading the source row
of its own half, as the official MutualSelfAttentionControl does (TencentARC/MasaCtrl,
masactrl/masactrl.py: `attn_batch(qu, ku[:num_heads], vu[:num_heads], ...)`, the same for the
conditional half). Its layers are counted there as transformer blocks in call order, 10 to 15 of
SD's 16: the decoder's blocks at the two finest levels (`MasaCtrlSettings.layers`).
"""

import torch

from photoswap.settings import MasaCtrlSettings
from sd.attention import Control, Site, attention
from sd.pipeline import rows


class MasaCtrl(Control):
    """Edits the target rows of [sources, targets] batches (photoswap/swap.py `run`)."""

    callback = None  # nothing to do between steps (no local blend)

    def __init__(self, settings: MasaCtrlSettings):
        super().__init__()
        self.settings = settings

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, site: Site):
        s = self.settings
        if site.kind == "cross" or self.step < s.start_step or not s.layers(site):
            return attention(q, k, v)
        b = q.shape[0]
        src, tgt = rows(b, self.prompts, "both", 0, 2), rows(b, self.prompts, "both", 1, 2)
        out = q.new_empty(*q.shape[:3], v.shape[-1])
        out[src] = attention(q[src], k[src], v[src])  # the source as it is
        out[tgt] = attention(q[tgt], k[src], v[src])  # softmax(q_t k_s^T) v_s
        return out
