"""Layout B, an original LDM checkpoint, renamed to diffusers keys as diffusers'
convert_original_stable_diffusion script does. It holds `model.diffusion_model.` (UNet) and
`first_stage_model.` (VAE) keys, and the text encoder under a prefix that names the version:
SD 2.x (v2-1_{512,768}-ema-pruned) `cond_stage_model.model.`, the 24-block OpenCLIP tower;
SD 1.x (v1-5-pruned-emaonly, sd-v1-4) `cond_stage_model.transformer.`, a transformers
CLIPTextModel whose keys are already diffusers' (sd/weights.py tidies its `text_model.`)."""

import re
from pathlib import Path

import torch

from sd.config import ModelConfig
from sd.errors import WeightsError

PREFIXES = {"unet": "model.diffusion_model.", "vae": "first_stage_model."}
TEXT = {"2.x": "cond_stage_model.model.", "1.x": "cond_stage_model.transformer."}
# What each version is and which --model runs it: the message for a file given to another.
WHAT = {"1.x": "an SD 1.x model (CLIP ViT-L text encoder, context 768): run it with --model "
               "sd1.5 (or sd1.4)",
        "2.x": "an SD 2.x model (OpenCLIP ViT-H text encoder, context 1024): run it with --model "
               "sd2.1-base (512 px, epsilon) or sd2.1 (768 px, v-prediction)",
        "SDXL": "an SDXL model (two text encoders, context 2048): not supported; this project "
                "runs SD 1.x and 2.1"}


def version(keys) -> str | None:
    """"1.x", "2.x" or "SDXL" by a single-file checkpoint's text encoder keys; None if neither."""
    prefixes = {**{p: v for v, p in TEXT.items()}, "conditioner.embedders.": "SDXL"}
    return next((v for p, v in prefixes.items() if any(k.startswith(p) for k in keys)), None)


def _resnet(rest: str) -> str:
    for old, new in (("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("out_layers.0", "norm2"),
                     ("out_layers.3", "conv2"), ("emb_layers.1", "time_emb_proj"),
                     ("skip_connection", "conv_shortcut"), ("nin_shortcut", "conv_shortcut")):
        rest = rest.replace(old, new)
    return rest


def _unet_key(k: str, layers: int) -> str:
    """One LDM UNet key -> its diffusers name (layers: resnets per down block)."""
    fixed = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
             "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"}
    for old, new in fixed.items():
        if k.startswith(old + "."):
            return new + k[len(old):]
    if m := re.match(r"input_blocks\.(\d+)\.(\d)\.(.*)", k):
        i, sub, rest = int(m[1]) - 1, int(m[2]), m[3]
        b, j = divmod(i, layers + 1)
        if j == layers:  # the slot after a block's resnets holds its downsampler
            return f"down_blocks.{b}.downsamplers.0.conv.{rest.removeprefix('op.')}"
        kind = "resnets" if sub == 0 else "attentions"
        return f"down_blocks.{b}.{kind}.{j}.{_resnet(rest) if sub == 0 else rest}"
    if m := re.match(r"middle_block\.(\d)\.(.*)", k):
        sub, rest = int(m[1]), m[2]
        if sub == 1:
            return f"mid_block.attentions.0.{rest}"
        return f"mid_block.resnets.{sub // 2}.{_resnet(rest)}"
    if m := re.match(r"output_blocks\.(\d+)\.(\d)\.(.*)", k):
        b, j = divmod(int(m[1]), layers + 1)
        sub, rest = int(m[2]), m[3]
        if re.fullmatch(r"conv\.(weight|bias)", rest):
            return f"up_blocks.{b}.upsamplers.0.{rest}"
        kind = "resnets" if sub == 0 else "attentions"
        return f"up_blocks.{b}.{kind}.{j}.{_resnet(rest) if sub == 0 else rest}"
    raise WeightsError(f"unexpected UNet key {k!r} in the checkpoint")


def _vae_key(k: str, levels: int) -> str:
    k = re.sub(r"encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets.", k)
    k = re.sub(r"encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0.", k)
    # LDM numbers decoder levels from the lowest resolution up; diffusers from the top down.
    k = re.sub(r"decoder\.up\.(\d+)\.block\.",
               lambda m: f"decoder.up_blocks.{levels - 1 - int(m[1])}.resnets.", k)
    k = re.sub(r"decoder\.up\.(\d+)\.upsample\.",
               lambda m: f"decoder.up_blocks.{levels - 1 - int(m[1])}.upsamplers.0.", k)
    k = re.sub(r"mid\.block_(\d)\.", lambda m: f"mid_block.resnets.{int(m[1]) - 1}.", k)
    k = re.sub(r"mid\.attn_1\.(q|k|v)\.", r"mid_block.attentions.0.to_\1.", k)
    for old, new in (("mid.attn_1.norm.", "mid_block.attentions.0.group_norm."),
                     ("mid.attn_1.proj_out.", "mid_block.attentions.0.to_out.0."),
                     ("norm_out.", "conv_norm_out.")):
        k = k.replace(old, new)
    return _resnet(k)


def _text(sd: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """OpenCLIP text tower -> CLIPTextModel names, keeping the first `layers` blocks."""
    out = {"embeddings.token_embedding.weight": sd.pop("token_embedding.weight"),
           "embeddings.position_embedding.weight": sd.pop("positional_embedding")}
    for k, v in sd.items():
        if k in ("text_projection", "logit_scale"):  # the contrastive head, unused by SD
            continue
        if k.startswith("ln_final."):
            out["final_layer_norm." + k.split(".")[-1]] = v
            continue
        m = re.match(r"transformer\.resblocks\.(\d+)\.(.*)", k)
        if not m:
            raise WeightsError(f"unexpected text encoder key {k!r} in the checkpoint")
        n, rest = int(m[1]), m[2]
        if n >= layers:  # SD 2.x uses the penultimate block's output: block 23 is never run
            continue
        p = f"encoder.layers.{n}."
        if rest.startswith("attn.in_proj_"):  # q, k and v stacked in that order
            kind = rest.split("_")[-1]
            for name, part in zip(("q", "k", "v"), v.chunk(3, dim=0)):
                out[f"{p}self_attn.{name}_proj.{kind}"] = part
            continue
        for old, new in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"),
                         ("mlp.c_proj", "mlp.fc2"), ("attn.out_proj", "self_attn.out_proj")):
            rest = rest.replace(old, new)
        out[p + rest] = v
    return out


def convert(sd: dict[str, torch.Tensor], cfg: ModelConfig, file: Path) -> dict[str, dict]:
    """Split an original single-file checkpoint into diffusers-named state dicts."""
    found = version(sd)
    if found is not None and found != cfg.version:
        raise WeightsError(f"{file}: this is {WHAT[found]}; it was given to {cfg.name}, an SD "
                           f"{cfg.version} model.")
    # Anything outside the three prefixes is the training schedule (betas, alphas_cumprod, ...)
    # or EMA bookkeeping: recomputed or unused here.
    prefixes = {**PREFIXES, "text_encoder": TEXT[cfg.version]}
    parts = {name: {k[len(p):]: v for k, v in sd.items() if k.startswith(p)}
             for name, p in prefixes.items()}
    if not all(parts.values()):
        missing = [prefixes[n] for n, p in parts.items() if not p]
        raise WeightsError(f"{file}: not an SD {cfg.version} single-file checkpoint: no keys "
                           f"under {', '.join(missing)}. Pass a diffusers folder or an original "
                           "checkpoint (v2-1_*-ema-pruned, v1-5-pruned-emaonly).")
    layers = cfg.unet.layers_per_block
    levels = len(cfg.vae.channels)
    text = parts["text_encoder"]  # 1.x: transformers' names already
    # the VAE's mid-block attention comes out in the old layout: sd.weights._tidy renames it
    return {"unet": {_unet_key(k, layers): v for k, v in parts["unet"].items()},
            "vae": {_vae_key(k, levels): v for k, v in parts["vae"].items()},
            "text_encoder": _text(text, cfg.text.layers) if cfg.version == "2.x" else text}
