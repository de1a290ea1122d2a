"""sd/ddim.py against diffusers' DDIMScheduler, DDIMInverseScheduler and DDPMScheduler."""

import math

import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler, DDPMScheduler

from sd import ddim
from sd.config import ScheduleConfig

PRED = {"epsilon": "epsilon", "v": "v_prediction"}
SHAPE = (2, 4, 8, 8)


def reference(prediction: str, cls=DDIMScheduler):
    # scheduler/scheduler_config.json of stabilityai/stable-diffusion-2-1{,-base}
    return cls(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
               clip_sample=False, set_alpha_to_one=False, steps_offset=1,
               prediction_type=PRED[prediction], timestep_spacing="leading")


def fixed(seed: int) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


F = fixed(1)


def model(x: torch.Tensor, t) -> torch.Tensor:
    """A stand-in UNet: depends on both x and t, so errors in either show."""
    return 0.1 * x + math.sin(int(t)) * F


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("steps", [1, 7, 20, 50, 999])
def test_timesteps(steps):
    cfg = ScheduleConfig()
    ref = reference("epsilon")
    ref.set_timesteps(steps)
    ours = ddim.timesteps(steps, cfg)
    assert ours.dtype == torch.int64
    assert torch.equal(ours, ref.timesteps)
    # previous() is diffusers' prev_timestep, and each step lands on the next timestep
    prevs = [ddim.previous(t, steps, cfg) for t in ours.tolist()]
    assert prevs[:-1] == ours[1:].tolist() and prevs[-1] <= 0  # 0 at 999 steps: alpha ac[0] too


def test_timesteps_50_explicit_and_invalid():
    cfg = ScheduleConfig()
    ts = ddim.timesteps(50, cfg)
    assert (ts[0], ts[1], ts[-1], ddim.previous(1, 50, cfg)) == (981, 961, 1, -19)
    for bad in (0, -3, 1001):
        with pytest.raises(ValueError):
            ddim.timesteps(bad, cfg)
    # diffusers yields t=1000 here (then IndexErrors inside step()); we refuse it up front
    ref = reference("epsilon")
    ref.set_timesteps(1000)
    assert ref.timesteps[0] == 1000
    with pytest.raises(ValueError):
        ddim.timesteps(1000, cfg)


def test_alphas_cumprod_exact():
    ac = ddim.alphas_cumprod(ScheduleConfig())
    ref = reference("epsilon")
    assert ac.dtype == torch.float32 and ac.shape == (1000,)
    assert torch.equal(ac, ref.alphas_cumprod)
    assert torch.equal(ddim.alpha(ac, -19), ref.final_alpha_cumprod)
    assert torch.equal(ddim.alpha(ac, 981), ac[981])


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
@pytest.mark.parametrize("steps", [20, 50])
@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_sampling_matches_diffusers(prediction, steps, eta):
    cfg = ScheduleConfig(prediction=prediction)
    ac = ddim.alphas_cumprod(cfg)
    ref = reference(prediction)
    ref.set_timesteps(steps)
    g_ref, g_ours = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    x_ref = x = fixed(0)
    first, worst = None, 0.0
    for t in ddim.timesteps(steps, cfg).tolist():
        x_ref = ref.step(model(x_ref, t), t, x_ref, eta=eta, generator=g_ref).prev_sample
        t_prev = ddim.previous(t, steps, cfg)
        x = ddim.step(model(x, t), x, t, t_prev, ac, prediction, eta=eta, generator=g_ours)
        first = maxdiff(x, x_ref) if first is None else first
        worst = max(worst, maxdiff(x, x_ref) / max(1.0, x_ref.abs().max().item()))
    print(f"\n[ddim {prediction} {steps} steps eta={eta}] one step max|diff| {first:.3e}, "
          f"final max|diff| {maxdiff(x, x_ref):.3e} (max|x| {x_ref.abs().max():.3g}), "
          f"worst relative {worst:.3e}")
    assert first <= 1e-6 and worst <= 1e-6
    assert x.dtype == torch.float32 and x.shape == SHAPE


def test_fp16_step_matches_diffusers():
    # diffusers keeps float32 0-dim alphas and lets type promotion give the sample dtype; so do we
    ac = ddim.alphas_cumprod(ScheduleConfig())
    for prediction in ("epsilon", "v"):
        ref = reference(prediction)
        ref.set_timesteps(50)
        x, out = fixed(0).half(), fixed(2).half()
        for t in (981, 501, 1):
            r = ref.step(out, t, x).prev_sample
            o = ddim.step(out, x, t, t - 20, ac, prediction)
            print(f"\n[fp16 {prediction} t={t}] max|diff| {maxdiff(o, r):.3e}")
            assert o.dtype == torch.float16 and torch.equal(o, r)


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
@pytest.mark.parametrize("a", [0.9991, 0.5, 0.0047, torch.tensor(0.3)])
def test_to_eps_to_x0_roundtrip(prediction, a):
    x0, eps = fixed(3), fixed(4)
    af = float(a)
    x = af**0.5 * x0 + (1 - af) ** 0.5 * eps
    out = eps if prediction == "epsilon" else af**0.5 * eps - (1 - af) ** 0.5 * x0
    e, z = ddim.to_eps(out, x, a, prediction), ddim.to_x0(out, x, a, prediction)
    assert maxdiff(e, eps) < 1e-5 and maxdiff(z, x0) < 1e-4  # 1/sqrt(0.0047) ~ 15x amplification
    assert maxdiff(af**0.5 * z + (1 - af) ** 0.5 * e, x) < 1e-5


def out_for(prediction, eps, x, a):
    """The model output whose implied eps at noise level a is `eps`."""
    return eps if prediction == "epsilon" else (eps - (1 - a) ** 0.5 * x) / a**0.5


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
@pytest.mark.parametrize("t,t_next", [(-19, 1), (481, 501), (961, 981)])
def test_inverse_step_then_step_returns_x(prediction, t, t_next):
    ac = ddim.alphas_cumprod(ScheduleConfig())
    x, eps = fixed(5), fixed(6)
    out = out_for(prediction, eps, x, ddim.alpha(ac, t))
    up = ddim.inverse_step(out, x, t, t_next, ac, prediction)
    out = out_for(prediction, eps, up, ddim.alpha(ac, t_next))
    back = ddim.step(out, up, t_next, t, ac, prediction)
    print(f"\n[inverse {prediction} {t}->{t_next}->{t}] max|diff| {maxdiff(back, x):.3e}")
    assert maxdiff(back, x) < 1e-5


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
@pytest.mark.parametrize("steps", [20, 50])
def test_inversion_matches_diffusers(prediction, steps):
    """DDIMInverseScheduler matches our conventions once it too gets set_alpha_to_one=False. Its
    step(out, timestep, x) takes the TARGET timestep: it goes timestep - ratio -> timestep (from
    initial_alpha_cumprod = ac[0] on the first step, timestep 1), and its pipelines call the UNet
    at that target timestep while the latent is still at the source level; we pass t_next too."""
    cfg = ScheduleConfig(prediction=prediction)
    ac = ddim.alphas_cumprod(cfg)
    ref = reference(prediction, DDIMInverseScheduler)
    ref.set_timesteps(steps)
    ts = ddim.timesteps(steps, cfg).flip(0)
    assert torch.equal(ts, ref.timesteps)
    x_ref = x = fixed(0)
    for t_next in ts.tolist():
        x_ref = ref.step(model(x_ref, t_next), t_next, x_ref).prev_sample
        t = ddim.previous(t_next, steps, cfg)
        x = ddim.inverse_step(model(x, t_next), x, t, t_next, ac, prediction)
    print(f"\n[inversion {prediction} {steps} steps] final max|diff| {maxdiff(x, x_ref):.3e}")
    assert maxdiff(x, x_ref) <= 1e-6 * max(1.0, x_ref.abs().max().item())


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_full_inversion_reconstructs(prediction):
    """Invert a clean latent over sampling's timesteps reversed (-19 -> 1 -> ... -> 981), then
    sample back with the same per-timestep eps: exact up to float32 rounding. For "v" the model
    output is derived from that eps at each step's source level, because a fixed v does not
    invert (DDIM is exact in the (x0, eps) parameterisation; v's meaning depends on a)."""
    cfg, steps = ScheduleConfig(prediction=prediction), 50
    ac = ddim.alphas_cumprod(cfg)
    ts = ddim.timesteps(steps, cfg)
    eps = {t: math.cos(t) * fixed(8) for t in ts.tolist()}  # independent of x

    def roundtrip(out_fn):
        x = x0 = fixed(9)
        for t_next in ts.flip(0).tolist():
            t = ddim.previous(t_next, steps, cfg)
            out = out_fn(eps[t_next], x, ddim.alpha(ac, t))
            x = ddim.inverse_step(out, x, t, t_next, ac, prediction)
        for t in ts.tolist():
            out = out_fn(eps[t], x, ddim.alpha(ac, t))
            x = ddim.step(out, x, t, ddim.previous(t, steps, cfg), ac, prediction)
        return maxdiff(x, x0)

    err = roundtrip(lambda e, x, a: out_for(prediction, e, x, a))
    print(f"\n[invert+sample {prediction}] max|diff| {err:.3e}")
    assert err < 3e-5  # rounding grows ~1/sqrt(ac[981]) = 15x on the way up
    if prediction == "v":  # the caveat: holding v (not eps) fixed per timestep does not come back
        err = roundtrip(lambda e, x, a: e)
        print(f"[invert+sample with fixed v instead] max|diff| {err:.3e}")
        assert err > 1e-2


def test_ddpm_training_helpers_match_diffusers():
    ac = ddim.alphas_cumprod(ScheduleConfig())
    ref = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                        beta_schedule="scaled_linear")
    assert torch.equal(ac, ref.alphas_cumprod)
    for dtype in (torch.float32, torch.float16):
        x0, noise = fixed(10).to(dtype), fixed(11).to(dtype)
        for ts in (torch.tensor([0, 999]), torch.tensor([500, 17])):
            a, b = ddim.add_noise(x0, noise, ts, ac), ref.add_noise(x0, noise, ts)
            v, w = ddim.velocity(x0, noise, ts, ac), ref.get_velocity(x0, noise, ts)
            print(f"\n[training {dtype} t={ts.tolist()}] add_noise max|diff| {maxdiff(a, b):.3e}, "
                  f"velocity max|diff| {maxdiff(v, w):.3e}")
            assert a.dtype == dtype and torch.equal(a, b) and torch.equal(v, w)
    # a python int timestep broadcasts over the whole batch
    x0, noise = fixed(10), fixed(11)
    assert torch.equal(ddim.add_noise(x0, noise, 500, ac),
                       ddim.add_noise(x0, noise, torch.tensor([500, 500]), ac))
