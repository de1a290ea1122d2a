"""Text-to-image parity with diffusers' StableDiffusionPipeline, determinism, image helpers."""

import inspect
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import assert_parity, reference_text, reference_unet, reference_vae
from PIL import Image

from sd import ddim
from sd.attention import Control
from sd.config import TINY
from sd.images import load_image
from sd.pipeline import Pipeline

PROMPTS = ["a photo of a red circle on a blue striped background", "an astronaut, riding a horse"]
NEGATIVE = "blurry, low quality"
# 20 guided steps of a random model (latents reach 57) amplify rounding. Run alone these tests
# give 0 here; after other tests in the same process (other memory alignment, so other vector
# remainders) the final latents differ by up to 5.3e-6 relative and the images by 1.3e-5, on the
# default, AVX2 and AVX-512 kernels alike (one measured CPU: 2.9e-6 for the latents). A UNet resnet
# eps 1e-5 -> 1e-6 moves the latents by the same 3.7e-6 (epsilon) to 9.0e-6 (eta): no portable
# bound here can tell that bug from rounding, so test_modules.py's
# test_norm_eps_at_small_variance catches it. 1e-4 is 7x the worst seen (the images; the old
# bound was 1e-4 absolute on them too) and 20x for the latents; the bugs these tests catch (CFG
# halves, guidance, timesteps, the VAE scaling) give 1e-3 and more.
PIPELINE_TOL = 1e-4


def reference_pipeline(cfg, models, tokenizer):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    s = cfg.schedule
    scheduler = DDIMScheduler(
        num_train_timesteps=s.train_steps, beta_start=s.beta_start, beta_end=s.beta_end,
        beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
        steps_offset=s.steps_offset, timestep_spacing="leading",
        prediction_type={"epsilon": "epsilon", "v": "v_prediction"}[s.prediction])
    pipe = StableDiffusionPipeline(
        vae=reference_vae(cfg, models.vae.state_dict()),
        text_encoder=reference_text(cfg, models.text_encoder.state_dict()),
        tokenizer=tokenizer, unet=reference_unet(cfg, models.unet.state_dict()),
        scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    # diffusers' own default (0.18215, LDM's configs), not ours: a wrong scaling must show.
    pipe.vae.config.scaling_factor = inspect.signature(type(pipe.vae)).parameters[
        "scaling_factor"].default
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_pipeline_parity(tiny, hf_tokenizer, prediction):
    cfg = replace(TINY, schedule=replace(TINY.schedule, prediction=prediction))
    ours = Pipeline(tiny, cfg)
    theirs = reference_pipeline(cfg, tiny, hf_tokenizer)
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    kwargs = dict(num_inference_steps=20, guidance_scale=7.5, negative_prompt=[NEGATIVE] * 2,
                  latents=x_T.clone())
    ref_latents = theirs(PROMPTS, output_type="latent", **kwargs).images
    ref_images = theirs(PROMPTS, output_type="np", **kwargs).images
    latents = ours(PROMPTS, NEGATIVE, steps=20, guidance=7.5, latents=x_T, output="latent")
    images = ours.decode(latents).permute(0, 2, 3, 1).numpy()
    assert_parity(f"pipeline {prediction} latents", latents, ref_latents, PIPELINE_TOL)
    assert_parity(f"pipeline {prediction} images", torch.from_numpy(images),
                  torch.from_numpy(ref_images), PIPELINE_TOL)


def test_pipeline_parity_with_eta(tiny, hf_tokenizer):
    ours, theirs = Pipeline(tiny, TINY), reference_pipeline(TINY, tiny, hf_tokenizer)
    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    ref = theirs(PROMPTS[:1], num_inference_steps=10, eta=0.7, latents=x_T.clone(),
                 generator=torch.Generator().manual_seed(5), output_type="latent").images
    latents = ours(PROMPTS[:1], steps=10, eta=0.7, latents=x_T, seed=5, output="latent")
    assert_parity("pipeline eta 0.7 latents", latents, ref, PIPELINE_TOL)


def test_same_seed_same_image(tiny):
    pipe = Pipeline(tiny, TINY)
    a = pipe(PROMPTS, steps=5, seed=123, height=64, width=96)
    b = pipe(PROMPTS, steps=5, seed=123, height=64, width=96)
    assert a[0].size == (96, 64)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))
    c = pipe(PROMPTS, steps=5, seed=124, height=64, width=96)
    assert not np.array_equal(np.asarray(a[0]), np.asarray(c[0]))


class Recorder(Control):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __call__(self, q, k, v, site):
        self.calls.append((self.step, self.t, self.prompts, site.name, q.shape[0]))
        return super().__call__(q, k, v, site)


def test_control_is_told_step_and_layout(tiny):
    pipe, rec = Pipeline(tiny, TINY), Recorder()
    pipe(PROMPTS, steps=4, ctrl=rec, output="latent")
    ts = ddim.timesteps(4, TINY.schedule).tolist()
    per_call = len(tiny.unet.sites)
    assert len(rec.calls) == 4 * per_call
    for i, t in enumerate(ts):
        chunk = rec.calls[i * per_call:(i + 1) * per_call]
        assert {c[:3] for c in chunk} == {(i, t, 2)}
        assert [c[3] for c in chunk] == [s.name for s in tiny.unet.sites]
        assert {c[4] for c in chunk} == {4}  # [uncond x 2, cond x 2]


def test_guidance_one_skips_the_unconditional_half(tiny):
    pipe, rec = Pipeline(tiny, TINY), Recorder()
    pipe(PROMPTS[:1], steps=2, guidance=1.0, ctrl=rec, output="latent")
    assert {c[4] for c in rec.calls} == {1}


def test_load_image_modes_and_orientation(tmp_path):
    img = Image.new("RGB", (200, 100), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 100, 100))  # left half blue
    exif = img.getexif()
    exif[0x0112] = 6  # EXIF orientation: rotate 90 degrees clockwise for display
    img.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    x = load_image(tmp_path / "rot.jpg", 64, 64)
    assert x.shape == (1, 3, 64, 64)
    # Displayed upright, the blue half is on top.
    assert x[0, 2, :16].mean() > 0.8 and x[0, 0, -16:].mean() > 0.8
    for mode in ("RGBA", "P", "L", "CMYK", "I;16"):
        assert load_image(Image.new(mode, (70, 90)), 64, 128).shape == (1, 3, 64, 128)
    with pytest.raises(ValueError, match="multiple of 64"):
        load_image(img, 100, 64)
    (tmp_path / "not.png").write_text("hello")
    with pytest.raises(ValueError, match="cannot be read as an image"):
        load_image(tmp_path / "not.png", 64, 64)


def test_encode_decode_shapes(tiny):
    pipe = Pipeline(tiny, TINY)
    z = pipe.encode(Image.new("RGB", (300, 200), (10, 200, 30)), 64, 128)
    assert z.shape == (1, 4, 8, 16)
    assert pipe.decode(z).shape == (1, 3, 64, 128)
    with pytest.raises(ValueError, match="multiples of 8"):
        pipe("x", height=60, steps=1)
