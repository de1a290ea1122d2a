"""SD 1.x: OpenAI CLIP ViT-L and the 1.x UNet as configuration of the same modules, equal to
transformers and diffusers on random weights written in both real layouts (the diffusers folders
and the original v1-5-pruned-emaonly checkpoint), the version told apart on loading, and every
command running on the tiny 1.x preset.

The 1.x tokenizer's padding (end-of-text, not 0) against transformers' CLIPTokenizer:
tests/test_tokenizer.py test_sd1_padding_matches_transformers.
"""

import csv
import json
from dataclasses import replace

import pytest
import torch
from conftest import (
    DATA,
    assert_parity,
    assert_same,
    randomize,
    reference_text,
    reference_unet,
    reference_vae,
    run_python,
)
from safetensors.torch import save_file

from sd import weights
from sd.clip import TextEncoder
from sd.config import SD14, SD15, TINY, TINY_SD1, ModelConfig, VAEConfig
from sd.pipeline import Pipeline
from sd.unet import UNet
from sd.vae import VAE
from sd.weights import WeightsError
from train.checkpoints import save_weights

TOL = 1e-5  # test_modules.py's bound, for the same reasons
PIPELINE_TOL = 1e-4  # test_pipeline.py's
# SD 1.5's exact structure (4 levels, 2 resnets per block, 12 text layers) at toy widths: every
# key name of the real files exists here, so layout tests use the real inventories.
SD15_NAMES = replace(SD15, name="sd1.5-names",
                     text=replace(SD15.text, width=32, heads=4, mlp_width=64),
                     vae=VAEConfig(channels=(16, 32, 64, 64), groups=8),
                     unet=replace(SD15.unet, channels=(32, 48, 64, 64), heads=(2, 2, 2, 2),
                                  context_dim=32, groups=8))


def shipped(name: str) -> dict:
    return json.loads((DATA / f"sd15_{name}_config.json").read_text())


def random_models(cfg: ModelConfig, seed: int = 0):
    m = weights.build(cfg)
    for i, mod in enumerate((m.text_encoder, m.vae, m.unet)):
        randomize(mod, seed + i).eval()
    return m


def sds_of(models) -> dict[str, dict]:
    return {n: getattr(models, n).state_dict() for n in weights.FILES}


def to_ldm_v1(sds: dict[str, dict]) -> dict[str, torch.Tensor]:
    """An original SD 1.x checkpoint of the given diffusers-named weights: the UNet and VAE by
    the reference mapping (diffusers' converter's names, as for SD 2.1), the text encoder under
    cond_stage_model.transformer. with transformers' names and the 2022 position_ids buffer."""
    ckpt = {}
    for row in csv.DictReader(open(DATA / "sd21_ldm_to_diffusers.tsv"), delimiter="\t"):
        name, _, key = row["diffusers_key"].partition("/")
        if name not in ("unet", "vae"):
            continue
        t = sds[name][key]
        if len(json.loads(row["ldm_shape"])) == 4 and t.ndim == 2:
            t = t[:, :, None, None]  # the VAE's mid attention is a 1x1 conv in LDM
        ckpt[row["ldm_key"]] = t
    for k, v in sds["text_encoder"].items():
        ckpt[f"cond_stage_model.transformer.text_model.{k}"] = v
    ckpt["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    ckpt["betas"], ckpt["alphas_cumprod"] = torch.zeros(1000), torch.ones(1000)
    return ckpt


# The presets say what the shipped files say, and have the real inventories.

def test_presets_mirror_the_shipped_configs():
    unet, text = shipped("unet"), shipped("text_encoder")
    ours = weights.diffusers_config(SD15, "unet")
    for key in ("block_out_channels", "layers_per_block", "cross_attention_dim", "in_channels",
                "out_channels", "down_block_types", "up_block_types", "norm_num_groups",
                "use_linear_projection", "upcast_attention"):
        assert ours[key] == unet[key], key
    assert set(ours["attention_head_dim"]) == {unet["attention_head_dim"]}  # 8 heads everywhere
    assert ours["sample_size"] == unet["sample_size"]
    t = SD15.text
    assert (t.width, t.layers, t.heads, t.mlp_width, t.activation, t.vocab_size, t.max_len) == (
        text["hidden_size"], text["num_hidden_layers"], text["num_attention_heads"],
        text["intermediate_size"], text["hidden_act"], text["vocab_size"],
        text["max_position_embeddings"])
    vae = weights.diffusers_config(SD15, "vae")
    assert all(vae[k] == v for k, v in shipped("vae").items() if not k.startswith("_")
               and k != "act_fn")
    assert SD15.schedule == TINY.schedule and SD15.schedule.prediction == "epsilon"
    assert replace(SD14, name="sd1.5") == SD15 and SD15.version == "1.x" and TINY.version == "2.x"


def test_full_size_keys_and_shapes():
    """Our SD 1.5 modules' keys and shapes equal the reference classes' and the inventory."""
    inventory = json.loads((DATA / "sd15_diffusers_keys.json").read_text())
    with torch.device("meta"):
        pairs = {"unet": (UNet(SD15.unet), reference_unet(SD15)),
                 "vae": (VAE(SD15.vae), reference_vae(SD15)),
                 "text_encoder": (TextEncoder(SD15.text), reference_text(SD15))}
    for name, (ours, ref) in pairs.items():
        mine = {k: list(v.shape) for k, v in ours.state_dict().items()}
        theirs = {k.removeprefix("text_model."): list(v.shape)
                  for k, v in ref.state_dict().items() if not k.endswith("position_ids")}
        listed = {k.split("/", 1)[1].removeprefix("text_model."): v
                  for k, v in inventory.items() if k.startswith(name + "/")}
        assert mine == theirs, f"{name}: keys or shapes differ from the reference"
        assert mine == listed, f"{name}: keys or shapes differ from the inventory"
    millions = {n: sum(v.numel() for v in m.state_dict().values()) / 1e6
                for n, (m, _) in pairs.items()}
    print(f"SD 1.5 parameters (M): {millions}")
    assert abs(millions["unet"] - 859.52) < 0.01 and abs(millions["text_encoder"] - 123.06) < 0.01


def test_original_inventory_is_what_diffusers_converts():
    """The v1-5-pruned-emaonly inventory, converted by diffusers' own single-file functions, is
    exactly the diffusers inventory: both describe the same real files."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    ldm = json.loads((DATA / "sd15_ldm_keys.json").read_text())
    listed = json.loads((DATA / "sd15_diffusers_keys.json").read_text())
    ckpt = {k: torch.empty(v, device="meta") for k, v in ldm.items()}
    got = {**{f"unet/{k}": v for k, v in convert_ldm_unet_checkpoint(
               ckpt, weights.diffusers_config(SD15, "unet")).items()},
           **{f"vae/{k}": v for k, v in convert_ldm_vae_checkpoint(
               ckpt, weights.diffusers_config(SD15, "vae")).items()},
           **{f"text_encoder/{k.removeprefix('text_model.')}": v
              for k, v in convert_ldm_clip_checkpoint(ckpt).items()
              if not k.endswith("position_ids")}}
    got = {k: list(v.shape) for k, v in got.items()}
    got = {k: v[:2] if k.startswith("vae/") and "mid_block.attentions" in k and len(v) == 4
           else v for k, v in got.items()}  # diffusers squeezes these when it loads them
    assert got == listed


# Parity with the references, the weights read from files in each layout.

@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """SD 1.5's structure at toy widths, random, written as a diffusers folder (fp32) and as an
    original single file (safetensors and ckpt); the state dicts it was written from."""
    models = random_models(SD15_NAMES, seed=11)
    sds = sds_of(models)
    root = tmp_path_factory.mktemp("sd15")
    for folder, fp16 in (("diffusers", False), ("diffusers-fp16", True)):
        save_weights(root / folder, SD15_NAMES, fp16=fp16, unet=models.unet, vae=models.vae,
                     text_encoder=models.text_encoder)
    ckpt = to_ldm_v1(sds)
    save_file(ckpt, root / "v1-5-pruned-emaonly.safetensors")
    torch.save({"state_dict": ckpt}, root / "v1-5-pruned-emaonly.ckpt")
    return root, sds


def test_original_layout_has_the_real_key_names(written):
    root, sds = written
    ldm = json.loads((DATA / "sd15_ldm_keys.json").read_text())
    assert set(to_ldm_v1(sds)) - {"betas", "alphas_cumprod"} == set(ldm)


@pytest.mark.parametrize("file", ["diffusers", "diffusers-fp16",
                                  "v1-5-pruned-emaonly.safetensors", "v1-5-pruned-emaonly.ckpt"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_both_layouts_load_bit_exact(written, file, dtype):
    root, sds = written
    loaded = weights.load(root / file, SD15_NAMES, dtype=dtype)
    stored = torch.float16 if file.endswith("fp16") else torch.float32
    for name in weights.FILES:
        assert_same(getattr(loaded, name).state_dict(),
                    {k: v.to(stored).to(dtype) for k, v in sds[name].items()})


def reference_from(root, layout: str):
    """transformers' and diffusers' modules reading the files themselves: from_pretrained on the
    folder, diffusers' single-file converters on the checkpoint."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    if layout == "diffusers":
        folder = root / "diffusers"
        return (CLIPTextModel.from_pretrained(folder / "text_encoder").eval(),
                AutoencoderKL.from_pretrained(folder / "vae").eval(),
                UNet2DConditionModel.from_pretrained(folder / "unet").eval())
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )
    from safetensors.torch import load_file

    ckpt = load_file(root / "v1-5-pruned-emaonly.safetensors")
    text = reference_text(SD15_NAMES)
    text.load_state_dict({k.removeprefix("text_model."): v  # as transformers 5 names them
                          for k, v in convert_ldm_clip_checkpoint(ckpt).items()
                          if not k.endswith("position_ids")})
    vae = reference_vae(SD15_NAMES)
    vae_sd = convert_ldm_vae_checkpoint(ckpt, weights.diffusers_config(SD15_NAMES, "vae"))
    vae.load_state_dict({k: v.reshape(vae.state_dict()[k].shape) for k, v in vae_sd.items()})
    unet = reference_unet(SD15_NAMES, convert_ldm_unet_checkpoint(
        ckpt, weights.diffusers_config(SD15_NAMES, "unet")))
    return text, vae, unet


@pytest.mark.parametrize("layout", ["diffusers", "single-file"])
@torch.no_grad()
def test_modules_equal_the_references_in_both_layouts(written, layout):
    root, _ = written
    path = root / ("diffusers" if layout == "diffusers" else "v1-5-pruned-emaonly.safetensors")
    ours = weights.load(path, SD15_NAMES)
    text, vae, unet = reference_from(root, layout)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 49408, (2, 77), generator=g)
    assert_parity(f"sd1 text encoder ({layout})", ours.text_encoder(ids),
                  text(ids).last_hidden_state, TOL)
    x = torch.rand(1, 3, 32, 48, generator=g) * 2 - 1
    assert_parity(f"sd1 vae encode ({layout})", ours.vae.encode(x).mean,
                  vae.encode(x).latent_dist.mean, TOL)
    z = torch.randn(1, 4, 6, 8, generator=g)
    assert_parity(f"sd1 vae decode ({layout})", ours.vae.decode(z), vae.decode(z).sample, TOL)
    for side in ((8, 8), (10, 14)):
        x = torch.randn(2, 4, *side, generator=g)
        ctx = torch.randn(2, 77, 32, generator=g)
        t = torch.tensor([999, 17])
        assert_parity(f"sd1 unet {side} ({layout})", ours.unet(x, t, ctx),
                      unet(x, t, ctx).sample, TOL)


@pytest.mark.parametrize("layout", ["diffusers", "single-file"])
def test_50_step_pipeline_equals_diffusers(written, vocab_files, layout):
    """StableDiffusionPipeline with SD 1.x's tokenizer (pad "<|endoftext|>") and the modules read
    from each layout, 50 DDIM steps with guidance, against ours loaded from the same files."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    root, _ = written
    path = root / ("diffusers" if layout == "diffusers" else "v1-5-pruned-emaonly.safetensors")
    cfg = replace(SD15_NAMES, resolution=64)
    ours = Pipeline.load(cfg, path, "cpu", torch.float32)
    assert ours.tokenizer.pad_id == 49407
    text, vae, unet = reference_from(root, layout)
    s = cfg.schedule
    theirs = StableDiffusionPipeline(
        vae=vae, text_encoder=text, unet=unet,
        tokenizer=CLIPTokenizer(*vocab_files, model_max_length=77),  # pads with <|endoftext|>
        scheduler=DDIMScheduler(beta_start=s.beta_start, beta_end=s.beta_end,
                                beta_schedule="scaled_linear", clip_sample=False,
                                set_alpha_to_one=False, steps_offset=1,
                                timestep_spacing="leading"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    theirs.set_progress_bar_config(disable=True)
    prompts = ["a photo of a red circle on a blue striped background", "a cat!"]
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ref = theirs(prompts, num_inference_steps=50, guidance_scale=7.5, latents=x_T.clone(),
                 output_type="latent").images
    latents = ours(prompts, steps=50, guidance=7.5, latents=x_T, output="latent")
    assert_parity(f"sd1 50-step pipeline latents ({layout})", latents, ref, PIPELINE_TOL)
    with torch.no_grad():
        image = ours.decode(latents)
        ref_image = theirs.vae.decode(ref / theirs.vae.config.scaling_factor).sample
    assert_parity(f"sd1 50-step pipeline images ({layout})", image,
                  (ref_image / 2 + 0.5).clamp(0, 1), PIPELINE_TOL)


# The version is told apart, and a file given to the other says which --model runs it.

def test_versions_are_told_apart_with_the_model_to_use(written, tmp_path):
    root, sds = written
    sd1 = root / "v1-5-pruned-emaonly.safetensors"
    with pytest.raises(WeightsError, match=r"SD 1.x model.*--model sd1.5.*given to tiny"):
        weights.load(sd1, TINY)
    sd2 = {"cond_stage_model.model.token_embedding.weight": torch.zeros(4, 4),
           "model.diffusion_model.time_embed.0.weight": torch.zeros(4, 4)}
    save_file(sd2, tmp_path / "v2.safetensors")
    with pytest.raises(WeightsError, match=r"SD 2.x model.*--model sd2.1-base"):
        weights.load(tmp_path / "v2.safetensors", TINY_SD1)
    xl = {"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight":
          torch.zeros(4), "model.diffusion_model.time_embed.0.weight": torch.zeros(4, 4)}
    save_file(xl, tmp_path / "sdxl.safetensors")
    for cfg in (TINY, TINY_SD1):
        with pytest.raises(WeightsError, match=r"SDXL model.*not supported"):
            weights.load(tmp_path / "sdxl.safetensors", cfg)
    (tmp_path / "xl" / "text_encoder_2").mkdir(parents=True)
    with pytest.raises(WeightsError, match=r"SDXL model.*not supported"):
        weights.load(tmp_path / "xl", TINY)
    # diffusers folders: a 1.x UNet given to a 2.x model, a 2.x text encoder to a 1.x one
    unet = {k: (torch.zeros(v.shape[0], 768) if k.endswith(("attn2.to_k.weight",
                                                            "attn2.to_v.weight")) else v)
            for k, v in weights.build(TINY).unet.state_dict().items()}
    with pytest.raises(WeightsError, match=r"(?s)of another shape.*SD 1.x model.*sd1.5"):
        weights.check(weights.build(TINY).unet, unet, "unet", "unet/x.safetensors")
    text = {k: (torch.zeros(49408, 1024) if k == "embeddings.token_embedding.weight" else v)
            for k, v in weights.build(TINY_SD1).text_encoder.state_dict().items()}
    with pytest.raises(WeightsError, match=r"(?s)of another shape.*SD 2.x model.*sd2.1"):
        weights.check(weights.build(TINY_SD1).text_encoder, text, "text_encoder", "t.safetensors")


def test_detect_preset_finds_sd1(written, tmp_path):
    root, _ = written
    assert weights.detect_preset(root / "v1-5-pruned-emaonly.safetensors")[0] == "sd1.5"
    save_file({"cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.ones(4)},
              tmp_path / "model.safetensors")  # by its keys, whatever its name
    assert weights.detect_preset(tmp_path / "model.safetensors")[0] == "sd1.5"
    assert weights.detect_preset(tmp_path / "sd-v1-4.ckpt")[0] == "sd1.5"  # by its name
    folder = tmp_path / "folder"
    (folder / "text_encoder").mkdir(parents=True)
    (folder / "text_encoder" / "config.json").write_text(json.dumps(shipped("text_encoder")))
    name, why = weights.detect_preset(folder)
    assert name == "sd1.5" and "768" in why
    assert weights.detect_preset(tmp_path / "v2-1_768-ema-pruned.safetensors")[0] == "sd2.1"


# Every command runs on the tiny 1.x preset (random weights).

def test_commands_run_on_the_tiny_sd1_preset(tmp_path):
    from PIL import Image

    photo = tmp_path / "photo.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(photo)
    (tmp_path / "refs").mkdir()
    for i in range(2):
        Image.new("RGB", (64, 64), (30, 30 + 50 * i, 200)).save(tmp_path / "refs" / f"{i}.png")
    m = ["--model", "sd1.5-tiny", "-q"]
    runs = {
        "sd": ["-m", "sd", "a red circle", *m, "--steps", "3", "--heatmap", "circle",
               "-o", str(tmp_path / "sd.png")],
        "invert": ["-m", "sd", "invert", str(photo), "--prompt", "a red square", *m, "--steps",
                   "3", "-o", str(tmp_path / "photo.inv")],
        "photoswap": ["-m", "photoswap", "a photo of a cat", "--subject", "cat", "--concept",
                      "dog", *m, "--steps", "3", "-o", str(tmp_path / "swap")],
        "p2p on a photo": ["-m", "photoswap", "a red square", "--subject", "square",
                           "--concept", "circle", "--image", str(photo), "--method", "p2p", *m,
                           "--steps", "3", "-o", str(tmp_path / "p2p")],
        "dreambooth": ["-m", "train", "dreambooth", str(tmp_path / "refs"), *m, "--steps", "2",
                       "--instance-prompt", "a photo of sks dog", "--resolution", "64",
                       "-o", str(tmp_path / "db")],
        "textual inversion": ["-m", "train", "textual-inversion", str(tmp_path / "refs"), *m,
                              "--token", "<my-dog>", "--init-word", "dog", "--steps", "2",
                              "--resolution", "64", "-o", str(tmp_path / "ti")],
        "heatmap": ["-m", "recipes", "heatmap", "--toy", "1", *m, "--steps", "2",
                    "-o", str(tmp_path / "heat.png")],
        "correspondence": ["-m", "recipes", "correspondence", str(photo), str(photo), "--point",
                           "20", "30", *m, "--steps", "2", "--inits", "1", "--crops", "1",
                           "-o", str(tmp_path / "match.png")],
        "cds": ["-m", "recipes", "cds", str(photo), "--source", "a red circle", "--target",
                "a blue circle", *m, "--iterations", "2", "-o", str(tmp_path / "cds.png")],
    }
    for name, args in runs.items():
        r = run_python(*args)
        assert r.returncode == 0, f"{name}: {r.stderr[-2000:]}"
        assert "model: sd1.5-tiny" in r.stdout + r.stderr, name


def test_help_lists_the_models():
    for args in (["-m", "sd"], ["-m", "photoswap"], ["-m", "train", "dreambooth"]):
        r = run_python(*args, "--help")
        assert r.returncode == 0 and "sd1.5" in r.stdout and "sd1.4" in r.stdout, args
