"""DDIM sampling and inversion as pure functions (Song et al. 2021, "Denoising Diffusion Implicit
Models", https://arxiv.org/abs/2010.02502), numerically matching diffusers' DDIMScheduler as SD 2.1
ships it: scaled_linear betas, "leading" spacing with steps_offset 1, set_alpha_to_one False,
no clipping or thresholding. The schedule is a tensor; nothing here holds state.

Names -> DDIM paper symbols (the paper's alpha_t is DDPM's cumulative alpha-bar_t):
    ac[t], a    alpha_t          alphas_cumprod; x_t = sqrt(a) x_0 + sqrt(1-a) eps (eq. 4)
    x           x_t              the current latent
    out         UNet output      eps_theta(x_t) ("epsilon") or v = sqrt(a) eps - sqrt(1-a) x_0 ("v")
    eps, x0     eps_theta(x_t), f_theta(x_t)   predicted noise / "predicted x_0" (eqs. 9, 12)
    t, t_prev   tau_i, tau_{i-1} a sampling step goes t -> t_prev = t - train_steps // steps
    sigma       sigma_t(eta)     eq. 16; eta = 0 is deterministic DDIM, eta = 1 is DDPM-like
Coefficients stay float32 0-dim tensors (as diffusers' are) and type promotion makes every result
the dtype of x, so fp16 latents get float32-accurate scalars, exactly as in diffusers.
"""

import torch

from sd.config import ScheduleConfig


def alphas_cumprod(cfg: ScheduleConfig) -> torch.Tensor:
    """float32 [train_steps]; LDM's "scaled_linear" betas are linear in sqrt(beta)."""
    root = torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, cfg.train_steps,
                          dtype=torch.float32)
    return torch.cumprod(1.0 - root**2, dim=0)


def timesteps(steps: int, cfg: ScheduleConfig) -> torch.Tensor:
    """int64 descending, "leading" spacing: 50 steps -> 981, 961, ..., 1."""
    if not 1 <= steps <= cfg.train_steps:
        raise ValueError(f"steps must be in [1, {cfg.train_steps}], got {steps}")
    ratio = cfg.train_steps // steps
    ts = torch.arange(steps - 1, -1, -1, dtype=torch.int64) * ratio + cfg.steps_offset
    # steps=1000: diffusers returns t=1000 here, then IndexErrors in step(); refuse up front.
    if ts[0] >= cfg.train_steps:
        raise ValueError(f"{steps} steps start at t={int(ts[0])}, past the schedule's end")
    return ts


def previous(t: int, steps: int, cfg: ScheduleConfig) -> int:
    """Where a sampling step from t lands; <= 0 after the last one (1 -> -19 at 50 steps)."""
    return int(t) - cfg.train_steps // steps


def alpha(ac: torch.Tensor, t: int) -> torch.Tensor:
    """ac[t]; below zero (past the last step) ac[0], since SD 2.1 sets set_alpha_to_one False."""
    return ac[int(t)] if t >= 0 else ac[0]


def _scalar(a) -> torch.Tensor:  # python floats become float32, like the schedule
    return a if isinstance(a, torch.Tensor) else torch.tensor(a, dtype=torch.float32)


def to_eps(out: torch.Tensor, x: torch.Tensor, a, prediction: str) -> torch.Tensor:
    """Model output at noise level a -> predicted noise eps_theta(x_t)."""
    if prediction == "epsilon":
        return out
    if prediction == "v":  # v = sqrt(a) eps - sqrt(1-a) x0 and x = sqrt(a) x0 + sqrt(1-a) eps
        a = _scalar(a)
        return a**0.5 * out + (1 - a) ** 0.5 * x
    raise ValueError(f"unknown prediction {prediction!r}")


def to_x0(out: torch.Tensor, x: torch.Tensor, a, prediction: str) -> torch.Tensor:
    """Model output at noise level a -> "predicted x_0" f_theta(x_t) (eq. 9)."""
    a = _scalar(a)
    if prediction == "epsilon":
        return (x - (1 - a) ** 0.5 * out) / a**0.5
    if prediction == "v":
        return a**0.5 * x - (1 - a) ** 0.5 * out
    raise ValueError(f"unknown prediction {prediction!r}")


def step(out: torch.Tensor, x: torch.Tensor, t: int, t_prev: int, ac: torch.Tensor,
         prediction: str, eta: float = 0.0,
         generator: torch.Generator | None = None) -> torch.Tensor:
    """One DDIM step x_t -> x_{t_prev} (eq. 12), given the model output at (x_t, t)."""
    # 1. Noise levels; t_prev < 0 is the final step, which lands on ac[0] (not 1) as in SD 2.1.
    a_t, a_prev = alpha(ac, t), alpha(ac, t_prev)
    # 2. Predicted x_0 and eps at t: eq. 12 is written in these, whatever the UNet outputs.
    x0, eps = to_x0(out, x, a_t, prediction), to_eps(out, x, a_t, prediction)
    # 3. sigma_t(eta), eq. 16. Only computed for eta > 0: for t_prev > t (inversion runs through
    #    here) the variance is negative, and 0 * sqrt(negative) would still be NaN.
    sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5 if eta > 0 else 0.0
    # 4. "Direction pointing to x_t" (eq. 12's 2nd term): the noise share sigma's fresh noise
    #    does not take, so x_{t_prev} keeps total variance 1 - a_prev.
    direction = (1 - a_prev - sigma**2) ** 0.5 * eps
    # 5. x_{t_prev} without the random term (eq. 12's first two terms).
    x_prev = a_prev**0.5 * x0 + direction
    # 6. eq. 12's third term sigma_t * eps_t, drawn as diffusers' randn_tensor draws it: on the
    #    generator's device (a CPU generator gives the same noise for any x device), then moved.
    if eta > 0:
        device = generator.device if generator is not None else x.device
        noise = torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype)
        x_prev = x_prev + sigma * noise.to(x.device)
    return x_prev


def inverse_step(out: torch.Tensor, x: torch.Tensor, t: int, t_next: int, ac: torch.Tensor,
                 prediction: str) -> torch.Tensor:
    """DDIM inversion x_t -> x_{t_next}, t_next > t: eq. 12 with eta = 0 run towards noise.

    The exact update would need eps_theta(x_{t_next}); like null-text inversion and diffusers'
    DDIMInverseScheduler we use the output the caller got at x_t (by their convention from the
    UNet called with timestep t_next, the only valid one on the first step). `out` is read at
    x's own level a_t. The first step starts from the clean latent at t = previous(timesteps[-1])
    <= 0, i.e. ac[0], where sampling ends, so inverting over timesteps(...).flip(0) visits exactly
    sampling's levels reversed. Exact inverse of step() for a fixed eps; not for a fixed v.
    """
    return step(out, x, t, t_next, ac, prediction, eta=0.0)


def _at(ac: torch.Tensor, t, x: torch.Tensor) -> torch.Tensor:
    """ac[t] in x's dtype and device, shaped [B, 1, ..., 1] to broadcast (as DDPMScheduler)."""
    a = ac.to(device=x.device, dtype=x.dtype)[torch.as_tensor(t, device=x.device)].flatten()
    return a.view(-1, *([1] * (x.dim() - 1)))


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t, ac: torch.Tensor) -> torch.Tensor:
    """Forward process q(x_t | x_0) (eq. 4) for a LongTensor [B] (or int) of timesteps."""
    a = _at(ac, t, x0)
    return a**0.5 * x0 + (1 - a) ** 0.5 * noise


def velocity(x0: torch.Tensor, noise: torch.Tensor, t, ac: torch.Tensor) -> torch.Tensor:
    """v-prediction training target sqrt(a) eps - sqrt(1-a) x_0 for timesteps t [B] (or int)."""
    a = _at(ac, t, x0)
    return a**0.5 * noise - (1 - a) ** 0.5 * x0
