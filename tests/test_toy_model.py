"""The committed toy model (weights/toy) behaves as its model card says: diffusers reads it as we
do, null-text inversion redraws a held-out scene and plain DDIM inversion does not, DreamBooth
teaches it a concept. Skipped, saying so, where weights/toy has no UNet.

Margins are set from figures measured on this machine (in the comments), wide enough for other
CPUs' kernels: these are behaviours, not parity checks.
"""

from pathlib import Path

import pytest
import torch
from conftest import assert_parity
from PIL import Image

from sd.config import TOY, InversionSettings
from sd.images import psnr
from sd.inversion import ddim_inversion, invert, reconstruct
from sd.pipeline import Pipeline
from toy import scenes

WEIGHTS = Path(__file__).resolve().parent.parent / "weights" / "toy"
# DreamBooth amplifies rounding: its samples' identity moves by up to 0.19 between CPU kernels
# (ATEN_CPU_CAPABILITY default vs AVX-512 here). So the test takes striped-heart, the concept
# EVAL.md finds DreamBooth teaching most clearly, over 12 contexts: "sks heart" 0.266 / 0.325
# DreamBooth'd (AVX-512 / default kernels), -0.053 / -0.053 untuned, "a heart" -0.091 / -0.012
# DreamBooth'd. (dotted-star, the weakest concept, over 6 contexts: 0.141 / -0.047 DreamBooth'd
# against 0.021 untuned.) Without prior preservation the class word drifts to the concept:
# dotted-star's "sks star" and "a star" scored 0.208 and 0.120 (300 steps at 1e-3), 0.114 and
# 0.147 (the first recipe, 150 at 5e-4); tests/mutants.py checks the class bound catches it.
DREAMBOOTH_GAIN, CLASS_GAIN = 0.05, 0.15
pytestmark = pytest.mark.skipif(not (WEIGHTS / "unet").is_dir(),
                                reason="weights/toy has no unet/ (make toy trains it)")


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return Pipeline.load(TOY, WEIGHTS, torch.device("cpu"), torch.float32)


def test_diffusers_reads_the_committed_model_as_we_do(pipe):
    from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: PLC0415
    from transformers import CLIPTextModel  # noqa: PLC0415

    kw = {"variant": "fp16", "torch_dtype": torch.float32}
    unet = UNet2DConditionModel.from_pretrained(WEIGHTS, subfolder="unet", **kw).eval()
    vae = AutoencoderKL.from_pretrained(WEIGHTS, subfolder="vae", **kw).eval()
    text = CLIPTextModel.from_pretrained(WEIGHTS, subfolder="text_encoder", **kw).eval()
    g = torch.Generator().manual_seed(0)
    ids = pipe.tokenizer(["a photo of a red circle on a blue striped background"])
    x, t = torch.randn(2, TOY.vae.latent_channels, 16, 16, generator=g), torch.tensor([10, 900])
    with torch.no_grad():
        ours_ctx = pipe.models.text_encoder(ids)
        ref_ctx = text(ids).last_hidden_state  # SD 2.x's penultimate layer is configured away
        assert_parity("text encoder", ours_ctx, ref_ctx, 1e-5)
        ctx = ours_ctx.expand(2, -1, -1)
        assert_parity("unet", pipe.models.unet(x, t, ctx), unet(x, t, ctx).sample, 1e-5)
        assert_parity("vae decoder", pipe.models.vae.decode(x), vae.decode(x).sample, 1e-5)


def test_null_text_inversion_redraws_a_held_out_scene(pipe):
    scene = scenes.test_scene(0, two=0.0)
    image, _, _ = scenes.render(scene)
    truth = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    caption, latent = scenes.caption(scene), pipe.encode(Image.fromarray(image))
    x_T = ddim_inversion(pipe, latent, pipe.encode_prompt(caption), 50, False)[-1]
    redrawn = pipe(caption, steps=50, guidance=7.5, latents=x_T, output="latent")
    ddim = psnr(pipe.decode(redrawn), truth).item()
    inv = invert(pipe, latent, caption, InversionSettings(50, 7.5))
    null = psnr(pipe.decode(reconstruct(pipe, inv)), truth).item()
    print(f"held-out scene 0 at guidance 7.5: null-text {null:.2f} dB, DDIM inversion {ddim:.2f}")
    assert null >= 28 and null > ddim + 5


def test_dreambooth_teaches_a_concept(pipe, tmp_path):
    """DreamBooth with prior preservation (toy/settings.py DREAMBOOTH) binds the concept to
    "sks <class>": its samples score above the untuned model's with the same words and above
    its own with the class word alone (EVAL.md's acceptance table, over 24 contexts)."""
    from toy import swap as toy  # noqa: PLC0415
    from toy.evaluate import contexts, sample_identity  # noqa: PLC0415

    name = "striped-heart"
    tuned = toy.toy_pipeline(toy.concept_model(name, WEIGHTS, root=tmp_path))
    m = toy.measure(name, WEIGHTS)
    backgrounds = contexts(name, 12)
    sks, untuned, cls = (sample_identity(p, words, backgrounds, m) for p, words in
                         ((tuned, "sks heart"), (pipe, "sks heart"), (tuned, "a heart")))
    print(f"identity over 12 contexts: 'sks heart' DreamBooth'd {sks:.3f}, untuned "
          f"{untuned:.3f}; 'a heart' DreamBooth'd {cls:.3f}")
    assert sks > untuned + DREAMBOOTH_GAIN and sks > cls + CLASS_GAIN
