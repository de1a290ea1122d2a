"""Loading and saving both official layouts (diffusers folders and single-file checkpoints).

Single-file checkpoints are written from the reference mapping tests/data/sd21_ldm_to_diffusers
.tsv (made with diffusers' converters), never from an inverse of our own converter, and our
loader is compared with diffusers' own single-file conversion functions.
"""

import csv
import json
from pathlib import Path

import pytest
import torch
from conftest import DATA, SD21_NAMES, assert_parity, assert_same, randomize
from safetensors.torch import load_file, save_file

from sd import weights
from sd.config import SD21, TINY
from sd.weights import WeightsError
from train.checkpoints import save_weights


def mapping() -> list[dict]:
    return list(csv.DictReader(open(DATA / "sd21_ldm_to_diffusers.tsv"), delimiter="\t"))


def to_ldm(sds: dict[str, dict], layers: int, width: int) -> dict[str, torch.Tensor]:
    """An original-layout checkpoint holding the given diffusers-named weights."""
    flat = {f"{n}/{'text_model.' if n == 'text_encoder' else ''}{k}": v
            for n, sd in sds.items() for k, v in sd.items()}
    ckpt = {}
    for row in mapping():
        if row["ldm_key"].startswith("?"):  # q/k/v: stacked into in_proj below
            continue
        t = flat[row["diffusers_key"]]
        if len(json.loads(row["ldm_shape"])) == 4 and t.ndim == 2:
            t = t[:, :, None, None]  # the VAE's attention is a 1x1 conv in LDM
        ckpt[row["ldm_key"]] = t
    p = "cond_stage_model.model.transformer.resblocks"
    for n in range(layers):
        for kind in ("weight", "bias"):  # nn.MultiheadAttention stacks q, k, v in that order
            parts = [flat[f"text_encoder/text_model.encoder.layers.{n}.self_attn.{x}_proj.{kind}"]
                     for x in "qkv"]
            ckpt[f"{p}.{n}.attn.in_proj_{kind}"] = torch.cat(parts)
    # What the diffusers layout drops: OpenCLIP's last block and contrastive head, the schedule.
    g = torch.Generator().manual_seed(7)
    dtype = next(iter(ckpt.values())).dtype
    for k in [k for k in ckpt if k.startswith(f"{p}.{layers - 1}.")]:
        ckpt[k.replace(f".{layers - 1}.", f".{layers}.", 1)] = torch.randn(
            ckpt[k].shape, generator=g).to(dtype)
    ckpt["cond_stage_model.model.text_projection"] = torch.randn(width, width).to(dtype)
    ckpt["cond_stage_model.model.logit_scale"] = torch.tensor(4.6).to(dtype)
    ckpt["betas"], ckpt["alphas_cumprod"] = torch.zeros(1000), torch.ones(1000)
    return ckpt


def random_sds(cfg, seed=0) -> dict[str, dict]:
    m = weights.build(cfg)
    return {n: randomize(getattr(m, n), seed + i).state_dict()
            for i, n in enumerate(("text_encoder", "vae", "unet"))}


def test_single_file_matches_diffusers_converter(tmp_path):
    from conftest import reference_text
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )

    cfg = SD21_NAMES
    sds = random_sds(cfg)
    ckpt = to_ldm(sds, cfg.text.layers, cfg.text.width)
    inventory = json.loads((DATA / "sd21_ldm_keys.json").read_text())
    assert set(ckpt) - {"betas", "alphas_cumprod"} == set(inventory)  # the real key names
    file = tmp_path / "v2-1_512-ema-pruned.safetensors"
    save_file(ckpt, file)

    ours = weights.state_dicts(file, cfg)
    theirs = {
        "unet": convert_ldm_unet_checkpoint(ckpt, weights.diffusers_config(cfg, "unet")),
        "vae": convert_ldm_vae_checkpoint(ckpt, weights.diffusers_config(cfg, "vae")),
        "text_encoder": {k.removeprefix("text_model."): v for k, v in
                         convert_open_clip_checkpoint(reference_text(cfg), ckpt).items()
                         if k != "text_model.embeddings.position_ids"},
    }
    for name in theirs:
        diff = max((ours[name][k] - theirs[name][k]).abs().max().item() for k in theirs[name])
        print(f"{name}: {len(ours[name])} tensors, max abs diff {diff} against diffusers' "
              "single-file conversion")
        assert_same(ours[name], theirs[name])
        assert_same(ours[name], sds[name])  # and the weights we started from

    torch.save({"state_dict": ckpt}, tmp_path / "v2-1_512-ema-pruned.ckpt")
    from_ckpt = weights.state_dicts(tmp_path / "v2-1_512-ema-pruned.ckpt", cfg)
    for name in theirs:
        assert_same(from_ckpt[name], sds[name])


@torch.no_grad()
def test_loaded_single_file_runs_like_the_original(tmp_path, tiny):
    """A loaded single-file model computes what the model it was written from computes."""
    cfg = SD21_NAMES
    sds = random_sds(cfg, seed=3)
    save_file(to_ldm(sds, cfg.text.layers, cfg.text.width), tmp_path / "m.safetensors")
    loaded = weights.load(tmp_path / "m.safetensors", cfg)
    original = weights.build(cfg, sds=sds)
    ids = torch.randint(0, 49408, (1, 77))
    torch.testing.assert_close(loaded.text_encoder(ids), original.text_encoder(ids), rtol=0, atol=0)
    z = torch.randn(1, 4, 8, 8)
    torch.testing.assert_close(loaded.vae.decode(z), original.vae.decode(z), rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["diffusers", "single-file"])
def test_full_size_round_trip(tmp_path, layout):
    """A full-size random SD 2.1 (fp16, 1.29 B parameters) saved and loaded comes back bit-exact."""
    inventory = json.loads((DATA / "sd21_diffusers_keys.json").read_text())
    g = torch.Generator().manual_seed(0)
    sds = {n: {} for n in weights.FILES}
    for key, shape in inventory.items():
        name, k = key.split("/", 1)
        sds[name][k] = torch.randn(shape, generator=g, dtype=torch.float16)
    if layout == "diffusers":
        models = weights.build(SD21, dtype=torch.float16, sds=sds)
        save_weights(tmp_path, SD21, fp16=True, unet=models.unet, vae=models.vae,
                     text_encoder=models.text_encoder)
        del models
        path = tmp_path
    else:
        path = tmp_path / "v2-1_768-ema-pruned.safetensors"
        save_file(to_ldm(sds, SD21.text.layers, SD21.text.width), path)
    loaded = weights.load(path, SD21, dtype=torch.float16)
    for name in weights.FILES:
        assert_same(getattr(loaded, name).state_dict(), sds[name])


def test_save_loads_in_diffusers_and_transformers(tmp_path, tiny):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    save_weights(tmp_path, TINY, unet=tiny.unet, vae=tiny.vae, text_encoder=tiny.text_encoder)
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g)
    ids = torch.randint(0, 49408, (1, 77), generator=g)
    with torch.no_grad():
        # The module parity bound (test_modules.py): these are the same forward passes.
        unet = UNet2DConditionModel.from_pretrained(tmp_path / "unet").eval()
        assert_parity("saved UNet in diffusers", tiny.unet(x, 10, ctx), unet(x, 10, ctx).sample,
                      1e-5)
        vae = AutoencoderKL.from_pretrained(tmp_path / "vae").eval()
        assert_parity("saved VAE in diffusers", tiny.vae.decode(x), vae.decode(x).sample, 1e-5)
        text = CLIPTextModel.from_pretrained(tmp_path / "text_encoder").eval()
        assert_parity("saved text encoder in transformers", tiny.text_encoder(ids),
                      text(ids).last_hidden_state, 1e-5)
    again = weights.load(tmp_path, TINY)
    assert_same(again.unet.state_dict(), tiny.unet.state_dict())


def test_older_diffusers_files(tmp_path, tiny):
    """text_model. prefix, a position_ids buffer, old VAE attention names with 1x1 conv shapes."""
    save_weights(tmp_path, TINY, fp16=True, unet=tiny.unet, vae=tiny.vae,
                 text_encoder=tiny.text_encoder)
    vae_file = tmp_path / "vae/diffusion_pytorch_model.fp16.safetensors"
    old = {}
    for k, v in load_file(vae_file).items():
        for new, name in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"),
                          ("to_out.0", "proj_attn")):
            if f"attentions.0.{new}." in k:
                k = k.replace(f".{new}.", f".{name}.")
                v = v[:, :, None, None] if v.ndim == 2 else v
        old[k] = v
    save_file(old, vae_file)
    text_file = tmp_path / "text_encoder/model.fp16.safetensors"
    text = load_file(text_file)
    text["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    save_file(text, text_file)

    loaded = weights.load(tmp_path, TINY, dtype=torch.bfloat16)  # fp16 files, loaded as bf16
    for name in weights.FILES:
        ref = {k: v.half().to(torch.bfloat16) for k, v in getattr(tiny, name).state_dict().items()}
        assert_same(getattr(loaded, name).state_dict(), ref)


# Bad input: one clear error naming the file and what to do.

def test_missing_file_and_folder(tmp_path):
    with pytest.raises(WeightsError, match=r"no such file.*weights/README.md"):
        weights.load(tmp_path / "nope.safetensors", TINY)
    (tmp_path / "unet").mkdir()
    with pytest.raises(WeightsError, match=r"no unet weights.*download"):
        weights.load(tmp_path, TINY)


def test_truncated_and_corrupt_files(tmp_path):
    file = tmp_path / "v2-1_512-ema-pruned.safetensors"
    save_file({"a": torch.zeros(1000)}, file)
    file.write_bytes(file.read_bytes()[:1500])
    with pytest.raises(WeightsError, match=r"v2-1_512-ema-pruned.safetensors: cannot be read.*"
                                           r"again"):
        weights.load(file, TINY)
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"not a pickle at all")
    with pytest.raises(WeightsError, match=r"model.ckpt: cannot be read"):
        weights.load(ckpt, TINY)


def test_wrong_component_and_partial_files(tmp_path, tiny):
    save_weights(tmp_path, TINY, unet=tiny.unet, vae=tiny.vae, text_encoder=tiny.text_encoder)
    unet_file = tmp_path / "unet/diffusion_pytorch_model.safetensors"
    unet_file.write_bytes((tmp_path / "vae/diffusion_pytorch_model.safetensors").read_bytes())
    with pytest.raises(WeightsError, match=r"holds vae weights where unet weights were expected"):
        weights.load(tmp_path, TINY)
    sd = dict(tiny.unet.state_dict())
    sd.pop("conv_in.weight")
    sd["extra.weight"] = torch.zeros(1)
    save_file(sd, unet_file)
    with pytest.raises(WeightsError, match=r"(?s)1 missing: conv_in.weight.*1 unexpected: extra"):
        weights.load(tmp_path, TINY)
    single = tmp_path / "other.safetensors"
    save_file({"model.diffusion_model.time_embed.0.weight": torch.zeros(1)}, single)
    with pytest.raises(WeightsError, match=r"not an SD 2.x single-file checkpoint"):
        weights.load(single, TINY)


def test_ckpt_is_unpickled_safely(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("code ran",))

    torch.save({"state_dict": {"x": Evil()}}, tmp_path / "evil.ckpt")
    with pytest.raises(WeightsError, match="cannot be read"):
        weights.read(tmp_path / "evil.ckpt")


def test_paths_are_strings_or_paths(tmp_path, tiny):
    save_weights(str(tmp_path), TINY, unet=tiny.unet)
    assert (Path(tmp_path) / "unet/config.json").is_file()
