"""The swap control: Photoswap's three attention swaps and local blend on sd's control interface.

Photoswap (Gu et al. 2023, arXiv:2305.18286, Algorithm 1): a source and a target branch start
from the same x_T; at step i the target branch takes from the source

    phi  the self-attention output        while i < lambda_phi
    M    the self-attention map           while i < lambda_M
    A    the cross-attention map          while i < lambda_A  (prompt-to-prompt's refine mapping)

and runs freely afterwards. Each swap has its own window, layers and CFG half (`Swap`). Batch
layout: the prompts are [sources..., targets...], source i paired with target i, so the UNet sees
[uncond sources, uncond targets, cond sources, cond targets] (`sd.pipeline.rows`).

Two implementations, one flag. Fused (default): no attention map is built except the subject
tokens' cross maps for local blend at one low resolution; M is the fused kernel on
(q_src, k_src, v_tgt) and A is two fused calls (align.value_mixer). Explicit: fp32 maps
edited as the official code (eric-ai-lab/photoswap, swapping_class.py and utils.py) edits them.
"""

import torch
import torch.nn.functional as F

from photoswap.align import value_mixer
from photoswap.settings import Settings, Swap, active, end
from sd.attention import Control, Site, apply_map, attention, attention_map
from sd.pipeline import rows


class PhotoSwap(Control):
    """Edits the target rows of [sources, targets] batches; also the sampler's callback (blend).

    mappers: per pair, (mapper [77], alphas [77]) from `align.refinement`. subjects: per pair,
    (source token positions, target token positions) for local blend. user_mask: [pairs or 1,
    1, h, w] in [0, 1], any size: changes are kept only inside it, at every step.
    """

    def __init__(self, settings: Settings, mappers: list[tuple[torch.Tensor, torch.Tensor]],
                 subjects: list[tuple[list[int], list[int]]] | None = None,
                 user_mask: torch.Tensor | None = None, explicit: bool = False):
        super().__init__()
        self.settings, self.explicit, self.user_mask = settings, explicit, user_mask
        self.mixers = torch.stack([value_mixer(m, a) for m, a in mappers])  # [pairs, 77, 77]
        self.keep = torch.stack([1 - a for _, a in mappers])  # [pairs, 77]: target's own share
        self.mapper = torch.stack([m for m, _ in mappers])
        self.alphas = torch.stack([a for _, a in mappers])
        self.subjects = subjects
        self._moved: dict = {}  # (name, device, dtype) -> tensor: one copy per device, not per call
        self.blend_maps: torch.Tensor | None = None  # [prompts, h, w], summed over layers, steps

    @property
    def pairs(self) -> int:
        return self.prompts // 2

    def _rows(self, batch: int, half: str) -> tuple[list[int], list[int]]:
        """(source rows, target rows) of a half, paired position by position."""
        return rows(batch, self.prompts, half, 0, 2), rows(batch, self.prompts, half, 1, 2)

    def _on_device(self, name: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (name, device, dtype)
        if key not in self._moved:
            self._moved[key] = getattr(self, name).to(device, dtype)
        return self._moved[key]

    def _on(self, swap: Swap, site: Site) -> bool:
        return swap.layers(site) and active(swap.window, self.step, self.steps, swap.rule)

    def __call__(self, q, k, v, site):
        s, b = self.settings, q.shape[0]
        if site.kind == "cross":
            if self._collecting(site):
                self._collect(q, k, site)
            if not self._on(s.a, site):
                return attention(q, k, v)
            return self._cross(q, k, v, *self._rows(b, s.a.half))
        phi = self._rows(b, s.phi.half) if self._on(s.phi, site) else ([], [])
        m = self._rows(b, s.m.half) if self._on(s.m, site) else ([], [])
        if not phi[0] and not m[0]:
            return attention(q, k, v)
        return self._self(q, k, v, phi, m)

    def _self(self, q, k, v, phi, m):
        """phi: target rows output the source rows' output; M: target rows use the source's map.
        Where both apply phi wins (its output already carries the source's map)."""
        m_pairs = [(src, tgt) for src, tgt in zip(*m) if tgt not in phi[1]]
        m_src, m_tgt = [p[0] for p in m_pairs], [p[1] for p in m_pairs]
        if self.explicit:  # official: the map is replaced; for phi q, k, v are overwritten
            attn = attention_map(q, k)
            attn[m_tgt] = attn[m_src]
            attn[phi[1]] = attn[phi[0]]
            v = v.clone()
            v[phi[1]] = v[phi[0]]
            return apply_map(attn, v)
        edited = set(phi[1]) | set(m_tgt)
        own = [r for r in range(q.shape[0]) if r not in edited]
        out = q.new_empty(*q.shape[:3], v.shape[-1])
        out[own] = attention(q[own], k[own], v[own])
        if m_tgt:  # softmax(q_s k_s^T) v_t without the map
            out[m_tgt] = attention(q[m_src], k[m_src], v[m_tgt])
        out[phi[1]] = out[phi[0]]  # source rows are never edited, so they are in `own`
        return out

    def _pair_of(self, tgt: list[int], batch: int) -> list[int]:
        """Pair index of each target row (rows count pairs from 0 in each CFG half)."""
        first = rows(batch, self.prompts, "both", 1, 2)
        return [first.index(r) % self.pairs for r in tgt]

    def _refine(self, source: torch.Tensor, target: torch.Tensor, pair: list[int]) -> torch.Tensor:
        """Explicit maps [T, H, N, 77] of the target rows after the A swap: column j is
        alpha_j * source[..., mapper_j] + (1 - alpha_j) * target[..., j]."""
        mapper = self._on_device("mapper", source.device, torch.long)[pair]
        alphas = self._on_device("alphas", source.device, source.dtype)[pair][:, None, None]
        taken = torch.gather(source, 3, mapper[:, None, None].expand_as(source))
        return taken * alphas + target * (1 - alphas)

    def _cross(self, q, k, v, src, tgt):
        """A'[:, j] = alpha_j A_src[:, mapper_j] + (1 - alpha_j) A_tgt[:, j] on target rows."""
        pair = self._pair_of(tgt, q.shape[0])
        if self.explicit:
            attn = attention_map(q, k)  # [B, H, N, 77] fp32
            attn[tgt] = self._refine(attn[src], attn[tgt], pair)
            return apply_map(attn, v)
        out = attention(q, k, v)
        mixer = self._on_device("mixers", v.device, v.dtype)[pair]  # [T, 77, 77]
        mixed = torch.einsum("tsj,thjd->thsd", mixer, v[tgt])  # V'_s = sum_j W_sj v_t,j
        out[tgt] = attention(q[src], k[src], mixed)
        keep = self._on_device("keep", v.device, v.dtype)[pair]
        if keep.any():  # tokens new in the target keep (part of) their own map
            out[tgt] += attention(q[tgt], k[tgt], keep[:, None, :, None] * v[tgt])
        return out

    # Local blend -------------------------------------------------------------------------------

    def _collecting(self, site: Site) -> bool:
        return (self.settings.blend_start is not None and self.subjects is not None
                and site.level == self.settings.blend_level)

    def _collect(self, q, k, site):
        """Add the subject words' cross maps (conditional rows, as the A swap leaves them) to the
        running total."""
        cond = rows(q.shape[0], self.prompts, "cond")
        attn = attention_map(q[cond], k[cond])  # [prompts, H, N, 77], N small
        a = self.settings.a
        if a.half != "uncond" and self._on(a, site):  # the official store sees the edited maps
            pair = list(range(self.pairs))
            attn = torch.cat([attn[: self.pairs], self._refine(attn[: self.pairs],
                                                               attn[self.pairs :], pair)])
        attn = attn.mean(1)
        picks = [s for s, _ in self.subjects] + [t for _, t in self.subjects]
        maps = torch.stack([attn[r][:, idx].sum(-1) for r, idx in enumerate(picks)])
        self.blend_maps = maps if self.blend_maps is None else self.blend_maps + maps

    def mask(self, x: torch.Tensor, step: int) -> torch.Tensor | None:
        """[pairs, 1, h, w] float mask of where the target may differ from the source at `step`,
        or None for anywhere."""
        s, mask = self.settings, None
        if (s.blend_start is not None and self.blend_maps is not None
                and step >= end(s.blend_start, self.steps)):
            level = Site("blend", "cross", "any", s.blend_level)
            maps = self.blend_maps.reshape(-1, 1, *level.shape(tuple(x.shape[2:])))
            # Official LocalBlend.get_mask: 3x3 max-pool, resize (nearest) to the latent,
            # divide by the maximum, threshold, union of the source's and the target's masks.
            maps = F.max_pool2d(maps, 3, 1, padding=1)
            maps = F.interpolate(maps, size=x.shape[2:])
            maps = maps / maps.amax((2, 3), keepdim=True).clamp_min(1e-12)
            words = maps.gt(s.blend_threshold)
            mask = (words[: self.pairs] | words[self.pairs :]).float()
        if self.user_mask is not None:
            user = F.interpolate(self.user_mask.float().to(x.device), size=x.shape[2:],
                                 mode="bilinear", antialias=True)
            mask = user if mask is None else mask * user
        return mask

    def callback(self, step: int, t: int, x: torch.Tensor) -> torch.Tensor:
        """sd's per-step callback: outside the mask the target latent is the source latent."""
        mask = self.mask(x, step)
        if mask is None:
            return x
        src, tgt = x[: self.pairs], x[self.pairs :]
        x = x.clone()
        x[self.pairs :] = src + mask.to(x.dtype) * (tgt - src)
        return x
