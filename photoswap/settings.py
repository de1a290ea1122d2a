"""Every knob of a swap, and the methods and presets built from them. Torch-free: the command
line lists presets and methods from here before torch loads; photoswap/control.py runs them.

A swap's window is a fraction of the steps from the start (or explicit step indices), its layers
the attention sites it edits, its half the CFG rows it edits (sd/attention.py `Site`).
"""

from dataclasses import dataclass, field, replace

Window = float | tuple[int, ...]  # a fraction of the steps from the start, or explicit step indices


# How the official code turns a window's fraction f of T steps into the first step after it:
# the self-map window and the blend's start int(f * T); the cross-map window int(f * (T + 1))
# (prompt-to-prompt's alpha table, which Photoswap uses, has T + 1 rows); the phi window
# `step <= int(f * 50)`, whose 50 we read as T, so int(f * T) + 1.
ENDS = {"f*T": lambda f, steps: int(f * steps),
        "f*(T+1)": lambda f, steps: int(f * (steps + 1)),
        "f*T+1": lambda f, steps: int(f * steps) + 1}


def end(fraction: float, steps: int, rule: str = "f*T") -> int:
    """The first step after a window of `fraction` of the steps (ENDS[rule]): 0.2 of 50 steps by
    "f*T" ends at step 10; 0.29 of 100 at 28, as 0.29 * 100 is 28.999999999999996 for the
    official code too."""
    return ENDS[rule](fraction, steps)


def active(window: Window, step: int, steps: int, rule: str = "f*T") -> bool:
    """Whether `step` (0-based) is inside the window: a fraction covers steps below
    end(f, T, rule), explicit step indices themselves."""
    if isinstance(window, (int, float)) and not isinstance(window, bool):
        return step < end(window, steps, rule)
    return step in window


@dataclass(frozen=True)
class Layers:
    """Which attention sites a swap edits: places ("down", "mid", "up") and a range of levels
    (level l attends over (latent side >> l)^2 tokens, so the rule scales with resolution)."""

    places: tuple[str, ...] = ("down", "mid", "up")
    min_level: int = 0
    max_level: int = 99

    def __call__(self, site) -> bool:  # an sd.attention.Site
        return site.place in self.places and self.min_level <= site.level <= self.max_level


@dataclass(frozen=True)
class Swap:
    window: Window = 0.0
    layers: Layers = field(default_factory=Layers)
    half: str = "cond"  # CFG half whose target rows are edited: "cond", "uncond" or "both"
    rule: str = "f*T"  # how a fraction becomes steps (ENDS): the official code's, per swap

    def __post_init__(self):
        if self.half not in ("cond", "uncond", "both"):
            raise ValueError(f"unknown CFG half {self.half!r}: give cond, uncond or both")
        if self.rule not in ENDS:
            raise ValueError(f"unknown window rule {self.rule!r}: give one of {', '.join(ENDS)}")
        if isinstance(self.window, (int, float)) and not 0 <= self.window <= 1:
            raise ValueError(f"window {self.window} is outside [0, 1]: windows are fractions of "
                             "the steps (or a tuple of step indices)")


@dataclass(frozen=True)
class Settings:
    """Every knob of a swap. Defaults: the paper's preset (see PRESETS)."""

    # phi: every self-attention layer, both CFG halves (official utils.py overwrites q, k, v of
    # rows 1 and 3 of the batch [uncond src, uncond tgt, cond src, cond tgt]) while
    # step <= int(f * 50), 50 whatever the step count: here T.
    phi: Swap = Swap(0.2, Layers(), "both", "f*T+1")
    # M: layers with at most a quarter of the latent's tokens (official: <= 32^2 at 512 px, i.e.
    # level >= 1), conditional half (official AttentionControlEdit edits attn[h // 2:] only).
    m: Swap = Swap(0.5, Layers(min_level=1), "cond")
    # A: every cross-attention layer, conditional half, with P2P's refine mapping.
    a: Swap = Swap(0.4, Layers(), "cond", "f*(T+1)")
    # Local blend (official LocalBlend): from step end(blend_start, T) on, the target latent
    # keeps the source latent outside the union of both subjects' masks; None turns it off. The
    # masks come from the subject words' cross maps at one level (official: the down and up
    # blocks' 16x16 maps at 512 px, level 2; the mid block is level 3 there; on a small model
    # whose mid block sits at the blend level, its maps count too), summed over steps, as the A
    # swap left them: the official code stores a view of the map that the swap then overwrites
    # in place, so a target word aligned to a source token reads the source's map.
    blend_start: float | None = 0.2
    blend_threshold: float = 0.3  # official th=(.3, .3)
    blend_level: int = 2  # official: the 16x16 maps of a 64x64 latent (level 2)

    def __post_init__(self):
        if self.blend_start is not None and not 0 <= self.blend_start <= 1:
            raise ValueError(f"blend start {self.blend_start} is outside [0, 1]: it is a fraction "
                             "of the steps")
        if not 0 <= self.blend_threshold <= 1:
            raise ValueError(f"blend threshold {self.blend_threshold} is outside [0, 1]")


PRESETS: dict[str, Settings] = {
    # Paper (Gu et al. 2023, implementation details): 50 steps, lambda_A = 20, lambda_M = 25,
    # lambda_phi = 10; local blend as the official code (the paper does not mention it).
    "paper": Settings(),
    # Official notebook (real-image-swap.ipynb): cross 0.6, self-output 0.8, self-map 0.0. Its
    # code sets M's window to M + phi (swapping_class.py), steps below int(0.8 T); phi, in the
    # same layers and through step int(0.8 T), overrides it there: M never acts. Here a window
    # is its own fraction (M 0 is off), which is the same whatever phi is.
    "official": Settings(phi=Swap(0.8, Layers(), "both", "f*T+1"),
                         m=Swap(0.0, Layers(min_level=1)),
                         a=Swap(0.6, Layers(), "cond", "f*(T+1)")),
    # The toy model (sd.config.TOY, 16x16 latents): the official preset with A over every step,
    # local blend from its 8x8 maps (its quarter-side maps are the mid block's 4x4, and a 3x3
    # max-pool of those covers the whole latent) at threshold 0.5. A small latent forms its
    # layout late, so A must last. Chosen on held-out scenes apart from EVAL.md's by
    # `python -m bench.swap_presets`; the README's `make swap` section gives the sweep.
    "toy": Settings(phi=Swap(0.8, Layers(), "both", "f*T+1"),
                    m=Swap(0.0, Layers(min_level=1)),
                    a=Swap(1.0, Layers(), "cond", "f*(T+1)"), blend_threshold=0.5, blend_level=1),
}


def p2p(settings: Settings) -> Settings:
    """prompt-to-prompt's refine edit on the same code: A and self-map injection, no phi. Its
    notebook refines with cross_replace_steps 0.8, self_replace_steps 0.4, injects self maps in
    layers of at most 16^2 tokens at 512 px (level >= 2 here, at any size) and blends from the
    first step (its LocalBlend has no start); the blend's level and threshold are the preset's."""
    return Settings(phi=Swap(0.0), m=Swap(0.4, Layers(min_level=2), "cond"),
                    a=Swap(0.8, Layers(), "cond", "f*(T+1)"), blend_start=0.0,
                    blend_threshold=settings.blend_threshold, blend_level=settings.blend_level)


def no_swap(settings: Settings) -> Settings:
    """The target prompt from the same x_T, nothing taken from the source (and no blend)."""
    del settings  # same signature as p2p: a baseline is a function of the preset
    return Settings(phi=Swap(0.0), m=Swap(0.0), a=Swap(0.0), blend_start=None)


@dataclass(frozen=True)
class MasaCtrlSettings:
    """MasaCtrl's mutual self-attention (Cao et al. 2023; photoswap/masactrl.py), its published
    defaults: from step 4 of 50 (STEP = 4) in the decoder's self-attention at its two finest
    levels (official LAYER = 10 of SD's 16 transformer blocks: up_blocks.2 and .3, levels 1 and
    0), both CFG halves, no local blend."""

    start_step: int = 4  # the first step (0-based) that edits
    layers: Layers = Layers(places=("up",), max_level=1)


@dataclass(frozen=True)
class PnPSettings:
    """Plug-and-Play (Tumanyan et al. 2023; photoswap/pnp.py), its published defaults
    (MichalGeyer/pnp-diffusers: config_pnp.yaml, pnp_utils.py, preprocess.py). Layers are named
    by level so that they carry over to other UNets: on SD, level 2 of the decoder is up_blocks.1,
    and these rules pick exactly the official modules."""

    features: float = 0.8  # pnp_f_t: the residual features while step < int(0.8 T)
    attention: float = 0.5  # pnp_attn_t: self-attention q and k while step < int(0.5 T)
    feature_level: int = 2  # the decoder's block at level 2 (SD: up_blocks.1) ...
    feature_index: int = 1  # ... its second resnet (up_blocks.1.resnets.1: decoder layer 4)
    # Self-attention of the decoder at levels <= 2 but the first one at level 2 (SD: decoder
    # layers 4 to 11; up_blocks.1.attentions.0 is left alone).
    attention_level: int = 2
    inversion_steps: int = 999  # the DDIM inversion (empty prompt) whose latents the source replays

    def __post_init__(self):
        for name in ("features", "attention"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"PnP's {name} fraction {getattr(self, name)} is outside [0, 1]")


# How each method is named on the command line, with its source (python -m photoswap --help).
METHODS = {
    "photoswap": "Photoswap (Gu et al. 2023): the preset's phi, M and A swaps and local blend",
    "p2p": "prompt-to-prompt's refine edit (Hertz et al. 2022): A and self maps, no phi",
    "none": "the target prompt from the same noise, nothing taken from the source",
    "masactrl": "MasaCtrl (Cao et al. 2023): target queries read the source's self-attention "
                "keys and values in the decoder from step 4",
    "pnp": "Plug-and-Play (Tumanyan et al. 2023): the source's decoder features (the first 0.8 "
           "of the steps) and self-attention q, k (0.5), the source replaying its DDIM inversion",
}


def method_settings(method: str, base: Settings) -> Settings | MasaCtrlSettings | PnPSettings:
    """A method's settings from a preset: photoswap is the preset, the baselines derive from it;
    MasaCtrl and PnP have their own (the preset's blend does not apply to them)."""
    if method == "masactrl":
        return MasaCtrlSettings()
    if method == "pnp":
        return PnPSettings()
    return {"photoswap": base, "p2p": p2p(base), "none": no_swap(base)}[method]


def settings_for(method: str, preset: str = "paper", phi: float | None = None,
                 m: float | None = None, a: float | None = None,
                 blend_start: float | None | bool = True
                 ) -> Settings | MasaCtrlSettings | PnPSettings:
    """The preset, turned into a baseline by `method`, with windows overridden where given;
    blend_start False turns local blend off, True keeps the preset's."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: give one of {', '.join(METHODS)}")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}: give one of {', '.join(PRESETS)}")
    s = method_settings(method, PRESETS[preset])
    if not isinstance(s, Settings):
        if any(w is not None for w in (phi, m, a)) or blend_start not in (True, None):
            raise ValueError(f"{method} has no phi, M or A window and no local blend: give "
                             "those with --method photoswap or p2p")
        return s
    for name, window in (("phi", phi), ("m", m), ("a", a)):
        if window is not None:
            s = replace(s, **{name: replace(getattr(s, name), window=window)})
    if blend_start is False:
        s = replace(s, blend_start=None)
    elif blend_start is not True and blend_start is not None:
        s = replace(s, blend_start=blend_start)
    return s
