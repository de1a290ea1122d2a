"""Parity of our text encoder, VAE and UNet with transformers/diffusers on shared random weights."""

import json
from dataclasses import replace

import pytest
import torch
from conftest import DATA, assert_parity, reference_text, reference_unet, reference_vae, shipped

from sd.clip import TextEncoder
from sd.config import SD21, SD21_BASE, TINY
from sd.unet import UNet
from sd.vae import VAE
from sd.weights import diffusers_config

# Relative to max|ref| (conftest.relative_difference). Observed on shared weights, on the default,
# AVX2 and AVX-512 kernels with 1 and 2 threads: text encoder and UNet 0 (the same kernels in the
# same order as transformers/diffusers), VAE up to 1.5e-6 (decode). 1e-5 leaves ~7x for other
# CPUs. A wrong transpose, scale or eps moves these outputs by 1e-1..1e-5 relative: a UNet
# resnet eps of 1e-6 gives 9e-6, under this bound, so test_norm_eps_at_small_variance catches
# that class where it is large.
TOL = 1e-5


def report(name: str, ours: torch.Tensor, ref: torch.Tensor) -> float:
    return assert_parity(name, ours, ref, TOL)


@torch.no_grad()
def test_text_encoder_parity(tiny):
    ref = reference_text(TINY, tiny.text_encoder.state_dict())
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, TINY.text.vocab_size, (3, 77), generator=g)
    report("text encoder", tiny.text_encoder(ids), ref(ids).last_hidden_state)


@torch.no_grad()
def test_vae_encode_parity(tiny):
    ref = reference_vae(TINY, tiny.vae.state_dict())
    x = torch.rand(2, 3, 48, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    ours, theirs = tiny.vae.encode(x), ref.encode(x).latent_dist
    report("vae encode mean", ours.mean, theirs.mean)
    report("vae encode std", ours.std, theirs.std)
    g1, g2 = (torch.Generator().manual_seed(3) for _ in range(2))
    report("vae encode sample", ours.sample(g1), theirs.sample(g2))


@torch.no_grad()
def test_vae_decode_parity(tiny):
    ref = reference_vae(TINY, tiny.vae.state_dict())
    z = torch.randn(2, 4, 6, 8, generator=torch.Generator().manual_seed(4))
    report("vae decode", tiny.vae.decode(z), ref.decode(z).sample)


@pytest.mark.parametrize("upcast", [False, True])
@pytest.mark.parametrize("side", [(8, 8), (10, 14)])  # 10x14: sides not divisible by 4
@torch.no_grad()
def test_unet_parity(tiny, upcast, side):
    cfg = replace(TINY, unet=replace(TINY.unet, upcast_attention=upcast))
    ours = UNet(cfg.unet).eval()
    ours.load_state_dict(tiny.unet.state_dict())
    ref = reference_unet(cfg, tiny.unet.state_dict())
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, *side, generator=g)
    ctx = torch.randn(2, 77, TINY.unet.context_dim, generator=g)
    t = torch.tensor([999, 17])
    report(f"unet upcast={upcast} latent {side}", ours(x, t, ctx), ref(x, t, ctx).sample)


def test_configs_mirror_shipped_ones():
    """Our presets say what the official config.json files say."""
    for name in ("unet", "vae"):
        ours, theirs = diffusers_config(SD21, name), shipped(name)
        for key, value in ours.items():
            if key in theirs and key not in ("sample_size",):
                assert theirs[key] == value, (name, key)
    text = shipped("text_encoder")
    assert (SD21.text.width, SD21.text.layers, SD21.text.heads, SD21.text.mlp_width) == (
        text["hidden_size"], text["num_hidden_layers"], text["num_attention_heads"],
        text["intermediate_size"])
    assert text["hidden_act"] == "gelu" and SD21.text.vocab_size == text["vocab_size"]
    assert shipped("unet")["upcast_attention"] is SD21.unet.upcast_attention
    assert SD21_BASE.unet.upcast_attention is False and SD21_BASE.schedule.prediction == "epsilon"


def test_full_config_keys_and_shapes():
    """Full SD 2.1: our state-dict keys and shapes equal diffusers' and the shipped inventory."""
    inventory = json.loads((DATA / "sd21_diffusers_keys.json").read_text())
    with torch.device("meta"):
        pairs = {
            "unet": (UNet(SD21.unet), reference_unet(SD21)),
            "vae": (VAE(SD21.vae), reference_vae(SD21)),
            "text_encoder": (TextEncoder(SD21.text), reference_text(SD21)),
        }
    for name, (ours, ref) in pairs.items():
        mine = {k: list(v.shape) for k, v in ours.state_dict().items()}
        theirs = {k: list(v.shape) for k, v in ref.state_dict().items()
                  if k != "embeddings.position_ids"}
        listed = {k.split("/", 1)[1]: v for k, v in inventory.items() if k.startswith(name + "/")}
        assert mine == theirs, f"{name}: keys or shapes differ from the reference"
        assert mine == listed, f"{name}: keys or shapes differ from the inventory"
        count = sum(v.numel() for v in ours.state_dict().values())
        print(f"{name}: {len(mine)} tensors, {count / 1e6:.1f} M parameters")
    expected_millions = {"unet": 865.9, "vae": 83.7, "text_encoder": 340.4}  # the official inventory, tests/data
    for name, (ours, _) in pairs.items():
        count = sum(v.numel() for v in ours.state_dict().values()) / 1e6
        assert abs(count - expected_millions[name]) < 0.1, (name, count)


# (module path, kind) for every place a GroupNorm's eps is set: UNet resnets and conv_norm_out
# (1e-5), the UNet transformer's norm (1e-6), the VAE's resnets, mid attention and
# conv_norm_out (1e-6). Module paths are the same in ours and diffusers'.
NORMED = [("unet", "down_blocks.0.resnets.0", "resnet"),
          ("unet", "up_blocks.2.resnets.2", "resnet"),
          ("unet", "down_blocks.0.attentions.0", "transformer"), ("unet", "conv_norm_out", "norm"),
          ("vae", "encoder.down_blocks.0.resnets.0", "resnet"),
          ("vae", "decoder.mid_block.attentions.0", "attention"),
          ("vae", "decoder.conv_norm_out", "norm")]


@pytest.mark.parametrize("model,path,kind", NORMED, ids=[p for _, p, _ in NORMED])
@torch.no_grad()
def test_norm_eps_at_small_variance(tiny, model, path, kind):
    """Where a GroupNorm's eps matters: inputs of variance 1e-6, comparable to eps, so 1e-5 and
    1e-6 normalise by sqrt(1.1e-5) and sqrt(2e-6), a factor 2.3 apart. The whole-model tests
    cannot see this (their activations have variance ~1e-2 and more, where a wrong eps moves the
    output by ~1e-5 relative, the size of cross-CPU rounding after 20 sampling steps)."""
    ours = getattr(tiny, model).get_submodule(path)
    build = reference_unet if model == "unet" else reference_vae
    ref = build(TINY, getattr(tiny, model).state_dict()).get_submodule(path)
    c = ours.norm1.num_channels if kind == "resnet" else (
        ours.num_channels if kind == "norm" else ours.group_norm.num_channels
        if kind == "attention" else ours.norm.num_channels)
    g = torch.Generator().manual_seed(6)
    x = 1e-3 * torch.randn(2, c, 6, 10, generator=g)
    if kind == "resnet" and model == "unet":
        emb = torch.randn(2, ours.time_emb_proj.in_features, generator=g)
        a, b = ours(x, emb), ref(x, emb)
    elif kind == "resnet":
        a, b = ours(x), ref(x, None)
    elif kind == "transformer":
        ctx = torch.randn(2, 77, TINY.unet.context_dim, generator=g)
        a, b = ours(x, ctx), ref(x, encoder_hidden_states=ctx).sample
    else:
        a, b = ours(x), ref(x)
    assert_parity(f"{model} {path}, variance 1e-6", a, b, TOL)
