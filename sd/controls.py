"""The controls that ship with sd, and how to run several at once.

A control edits attention (sd/attention.py: `ctrl(q, k, v, site)` returns the output); an
`Observer` only reads it. Observers can run beside one editing control with `Combined`, so a
recorder never has to subclass what it records:

    heat = HeatMap(tokens, latent_hw)
    pipe(prompts, ctrl=Combined(swap, heat))   # swap edits; heat reads the unedited q and k

- `StoreMaps`: attention maps per step and site;
- `HeatMap`: DAAM's cross-attention heat maps of chosen tokens (Tang et al. 2023).
"""

import torch
import torch.nn.functional as F

from sd.attention import Control, Site, apply_map, attention, attention_map


class Observer(Control):
    """Reads attention and changes nothing. Subclasses implement `observe(q, k, v, site)`, which
    may return the explicit map it formed (then the output is that map times v, saving the fused
    call) or None (then the fused kernel gives the output)."""

    def observe(self, q, k, v, site: Site) -> torch.Tensor | None:
        raise NotImplementedError

    def __call__(self, q, k, v, site):
        attn = self.observe(q, k, v, site)
        return attention(q, k, v) if attn is None else apply_map(attn, v)


class Combined(Control):
    """One editing control and observers beside it: each observer sees every call's (q, k, v)
    before the edit, the edit gives the output. The sampler's step, t, steps and prompts reach
    all of them; anything else (a callback, results) is read from the control it belongs to."""

    SHARED = ("step", "t", "steps", "prompts")

    def __init__(self, edit: Control, *observers: Observer):
        self.__dict__["parts"] = (edit, *observers)
        super().__init__()

    def __setattr__(self, name, value):
        if name in self.SHARED:
            for part in self.parts:
                setattr(part, name, value)
        object.__setattr__(self, name, value)

    def __getattr__(self, name):  # only called for what this object lacks: the edit's things
        return getattr(self.parts[0], name)

    def __call__(self, q, k, v, site):
        for observer in self.parts[1:]:
            observer.observe(q, k, v, site)
        return self.parts[0](q, k, v, site)

    def features(self, h, site):
        return self.parts[0].features(h, site)


class StoreMaps(Observer):
    """Records attention maps per step and site while leaving outputs unchanged.

    maps[step][site.name] is [B, H, Nq, Nk] (or [B, Nq, Nk] with `head_mean`), fp32. `keep`
    chooses which sites to record (default: cross-attention only; self maps at 64x64 latents are
    4096^2 per head). Unrecorded sites run the fused kernel.
    """

    def __init__(self, keep=lambda site: site.kind == "cross", head_mean: bool = True,
                 device: str | torch.device | None = "cpu") -> None:
        super().__init__()
        self.keep, self.head_mean, self.device = keep, head_mean, device
        self.maps: dict[int, dict[str, torch.Tensor]] = {}

    def observe(self, q, k, v, site):
        if not self.keep(site):
            return None
        attn = attention_map(q, k)
        stored = attn.mean(1) if self.head_mean else attn
        self.maps.setdefault(self.step, {})[site.name] = stored.detach().to(self.device)
        return attn


class HeatMap(Observer):
    """Cross-attention heat maps of chosen token positions, as DAAM defines them (Tang et al. 2023,
    sec. 3; the daam package's trace.py): per down/up cross layer, the conditional rows' map
    averaged over heads and upsampled bicubically to the latent size (clamped at 0, since bicubic
    overshoots); layers averaged, steps summed. The mid block is left out, as in DAAM. Maps are
    accumulated on the fly: memory stays at [prompts, tokens, h, w]."""

    def __init__(self, tokens: list[int], latent_hw: tuple[int, int]):
        super().__init__()
        self.tokens, self.hw, self.sites = tokens, latent_hw, set()
        self.total: torch.Tensor | None = None  # summed over layers and steps

    def observe(self, q, k, v, site):
        if site.kind != "cross" or site.place == "mid":
            return None
        attn = attention_map(q, k)  # [B, heads, h*w, 77]
        cond = attn[-self.prompts:].mean(1)[..., self.tokens]  # [prompts, h*w, tokens]
        maps = cond.transpose(1, 2).reshape(self.prompts, len(self.tokens), *site.shape(self.hw))
        maps = F.interpolate(maps, size=self.hw, mode="bicubic").clamp_min(0)
        self.total = maps if self.total is None else self.total + maps
        self.sites.add(site.name)
        return attn

    def maps(self, spans: list[int] | None = None) -> torch.Tensor:
        """[prompts, words, h, w]: the layer mean summed over steps; `spans` (tokens per word, in
        `tokens`' order) makes a word of several tokens the mean of its tokens (DAAM)."""
        m = self.total.float() / len(self.sites)
        return torch.stack([w.mean(1) for w in m.split(spans, 1)], 1) if spans else m

    def normalised(self, spans: list[int] | None = None) -> torch.Tensor:
        """`maps(spans)` scaled to [0, 1] per map."""
        m = self.maps(spans)
        lo, hi = m.amin((-2, -1), keepdim=True), m.amax((-2, -1), keepdim=True)
        return (m - lo) / (hi - lo).clamp_min(1e-8)

    def masks(self, spans: list[int] | None = None, threshold: float = 0.4) -> torch.Tensor:
        """Where the normalised map reaches `threshold`: DAAM's segmentation (its tau = 0.4)."""
        return self.normalised(spans) >= threshold
