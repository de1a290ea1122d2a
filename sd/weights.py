"""Load and save SD 2.1 weights in both official layouts.

Layout A, diffusers folders: {unet,vae}/diffusion_pytorch_model[.fp16].safetensors and
text_encoder/model[.fp16].safetensors. Our parameter names ARE these keys, with three exceptions
for older files, handled in `_tidy`: a `text_model.` prefix on text keys, a stray
`text_model.embeddings.position_ids` buffer, and the VAE mid-block attention saved as
query/key/value/proj_attn with [C, C, 1, 1] conv shapes.

Layout B, one original LDM checkpoint (v2-1_{512,768}-ema-pruned.{safetensors,ckpt}) holding
`model.diffusion_model.` (UNet), `first_stage_model.` (VAE) and `cond_stage_model.model.` (the
full 24-block OpenCLIP text tower); `_from_ldm` renames it as diffusers' converters do.
"""

import json
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from sd.clip import TextEncoder
from sd.config import ModelConfig
from sd.unet import UNet
from sd.vae import VAE

FILES = {"unet": "unet/diffusion_pytorch_model", "vae": "vae/diffusion_pytorch_model",
         "text_encoder": "text_encoder/model"}
LDM_PREFIXES = {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
                "text_encoder": "cond_stage_model.model."}


class WeightsError(ValueError):
    """A weights file is missing, unreadable, or does not fit the model."""


@dataclass
class Models:
    text_encoder: TextEncoder
    vae: VAE
    unet: UNet


def read(file: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a .safetensors or .ckpt file (the latter unpickled with weights_only)."""
    file = Path(file)
    if not file.is_file():
        raise WeightsError(f"{file}: no such file. Fetch the weights with `make weights` "
                           "(see weights/README.md).")
    try:
        if file.suffix == ".safetensors":
            return load_file(file)
        sd = torch.load(file, map_location="cpu", weights_only=True)
        return sd.get("state_dict", sd)
    except (SafetensorError, pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        raise WeightsError(f"{file}: cannot be read ({e}). The file is probably incomplete or "
                           "corrupt: delete it and download it again (`make weights`).") from e


def _component(path: Path, name: str, prefer_fp16: bool) -> Path:
    stem = path / FILES[name]
    options = [Path(f"{stem}{v}.safetensors") for v in ((".fp16", "") if prefer_fp16 else
                                                        ("", ".fp16"))]
    options += [Path(f"{stem}.bin")]
    for option in options:
        if option.is_file():
            return option
    raise WeightsError(f"{path}: no {name} weights (looked for {options[0].name} and "
                       f"{options[1].name} in {stem.parent}). Fetch them with `make weights`.")


def _tidy(name: str, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Apply the three older-file exceptions of layout A (see the module docstring)."""
    if name == "text_encoder":
        sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
        sd.pop("embeddings.position_ids", None)  # a buffer of arange(77), not a weight
    if name == "vae":
        old = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
        out = {}
        for k, v in sd.items():
            m = re.match(r"(.*mid_block\.attentions\.0\.)(query|key|value|proj_attn)\.(.*)", k)
            if m:
                k = m[1] + old[m[2]] + "." + m[3]
            if re.match(r".*mid_block\.attentions\.0\.to_(q|k|v|out\.0)\.weight", k):
                v = v.reshape(v.shape[:2])  # 1x1 conv in old files -> linear
            out[k] = v
        sd = out
    return sd


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
    for old, new in (("mid.attn_1.norm.", "mid_block.attentions.0.group_norm."),
                     ("mid.attn_1.q.", "mid_block.attentions.0.to_q."),
                     ("mid.attn_1.k.", "mid_block.attentions.0.to_k."),
                     ("mid.attn_1.v.", "mid_block.attentions.0.to_v."),
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


def _from_ldm(sd: dict[str, torch.Tensor], cfg: ModelConfig, file: Path) -> dict[str, dict]:
    """Split an original single-file checkpoint into diffusers-named state dicts."""
    if any(k.startswith("cond_stage_model.transformer.") for k in sd):
        raise WeightsError(f"{file}: this is an SD 1.x checkpoint (CLIP ViT-L text encoder, "
                           "cross-attention width 768). This project runs SD 2.1 (OpenCLIP "
                           "ViT-H, width 1024): use v2-1_512-ema-pruned or v2-1_768-ema-pruned.")
    # Anything outside the three prefixes is the training schedule (betas, alphas_cumprod, ...)
    # or EMA bookkeeping: recomputed or unused here.
    parts = {name: {k[len(p):]: v for k, v in sd.items() if k.startswith(p)}
             for name, p in LDM_PREFIXES.items()}
    if not all(parts.values()):
        missing = [LDM_PREFIXES[n] for n, p in parts.items() if not p]
        raise WeightsError(f"{file}: not an SD 2.1 single-file checkpoint: no keys under "
                           f"{', '.join(missing)}. Pass a diffusers folder or an original "
                           "v2-1_*-ema-pruned checkpoint.")
    layers = cfg.unet.layers_per_block
    levels = len(cfg.vae.channels)
    return {"unet": {_unet_key(k, layers): v for k, v in parts["unet"].items()},
            "vae": _tidy("vae", {_vae_key(k, levels): v for k, v in parts["vae"].items()}),
            "text_encoder": _text(parts["text_encoder"], cfg.text.layers)}


def _guess(keys) -> str | None:
    """Which component a set of diffusers-named keys belongs to, for error messages."""
    for name, probe in (("unet", "time_embedding.linear_1.weight"),
                        ("vae", "encoder.conv_in.weight"),
                        ("text_encoder", "embeddings.token_embedding.weight")):
        if probe in keys:
            return name
    return None


def check(module: nn.Module, sd: dict[str, torch.Tensor], name: str, source) -> None:
    """Raise a WeightsError naming every missing, unexpected or mis-shaped key."""
    want = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    if _guess(sd) not in (None, name):
        raise WeightsError(f"{source}: holds {_guess(sd)} weights where {name} weights were "
                           "expected; check which file went where.")
    missing = sorted(set(want) - set(sd))
    unexpected = sorted(set(sd) - set(want))
    shapes = sorted(k for k in set(want) & set(sd) if tuple(sd[k].shape) != want[k])
    if not (missing or unexpected or shapes):
        return
    def few(keys, show=lambda k: k):
        return ", ".join(show(k) for k in keys[:4]) + (", ..." if len(keys) > 4 else "")
    lines = [f"{source}: the {name} weights do not fit this model:"]
    if missing:
        lines.append(f"  {len(missing)} missing: {few(missing)}")
    if unexpected:
        lines.append(f"  {len(unexpected)} unexpected: {few(unexpected)}")
    if shapes:
        lines.append(f"  {len(shapes)} of another shape: " +
                     few(shapes, lambda k: f"{k} {list(sd[k].shape)} vs {list(want[k])}"))
    ctx = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    if name == "unet" and ctx in sd and sd[ctx].shape[1] == 768:
        lines.append("  This is an SD 1.x UNet (text context 768); this project runs SD 2.1.")
    raise WeightsError("\n".join(lines))


def state_dicts(path: str | Path, cfg: ModelConfig, prefer_fp16: bool = False) -> dict[str, dict]:
    """Diffusers-named state dicts of all three components, from either layout."""
    path = Path(path)
    if path.is_dir():
        return {n: _tidy(n, read(_component(path, n, prefer_fp16))) for n in FILES}
    if not path.exists():
        raise WeightsError(f"{path}: no such file or folder. Fetch the weights with "
                           "`make weights` (see weights/README.md).")
    return _from_ldm(read(path), cfg, path)


def build(cfg: ModelConfig, device="cpu", dtype=torch.float32, sds: dict | None = None,
          source: str | Path = "weights") -> Models:
    """The three modules; from `sds` (checked strictly) or randomly initialised."""
    mods = {}
    for name, cls, sub in (("text_encoder", TextEncoder, cfg.text), ("vae", VAE, cfg.vae),
                           ("unet", UNet, cfg.unet)):
        if sds is None:
            mods[name] = cls(sub).to(device, dtype)
            continue
        with torch.device("meta"):  # skip random init of a billion parameters
            mods[name] = cls(sub)
        check(mods[name], sds[name], name, source)
        mods[name].load_state_dict(sds[name], assign=True)
        mods[name].to(device, dtype)
    return Models(**mods)


def load(path: str | Path, cfg: ModelConfig, device="cpu", dtype=torch.float32) -> Models:
    """Load SD 2.1 weights from a diffusers folder or an original single-file checkpoint."""
    sds = state_dicts(path, cfg, prefer_fp16=dtype == torch.float16)
    return build(cfg, device, dtype, sds, source=path)


def _atomic(write, file: Path) -> None:
    """Write to a temporary file beside `file`, then rename: a crash never leaves half a file."""
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(file.name + ".tmp")
    write(tmp)
    os.replace(tmp, file)


def diffusers_config(cfg: ModelConfig, name: str) -> dict:
    """The config.json diffusers/transformers need to load a saved component."""
    u, v, t = cfg.unet, cfg.vae, cfg.text
    if name == "unet":
        return {"_class_name": "UNet2DConditionModel", "sample_size": cfg.resolution // 8,
                "in_channels": u.in_channels, "out_channels": u.out_channels,
                "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D"
                                     for a in u.attention],
                "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D"
                                   for a in reversed(u.attention)],
                "block_out_channels": list(u.channels), "layers_per_block": u.layers_per_block,
                "attention_head_dim": list(u.heads), "cross_attention_dim": u.context_dim,
                "norm_num_groups": u.groups, "use_linear_projection": True,
                "upcast_attention": u.upcast_attention}
    if name == "vae":
        return {"_class_name": "AutoencoderKL", "in_channels": v.image_channels,
                "out_channels": v.image_channels, "latent_channels": v.latent_channels,
                "down_block_types": ["DownEncoderBlock2D"] * len(v.channels),
                "up_block_types": ["UpDecoderBlock2D"] * len(v.channels),
                "block_out_channels": list(v.channels), "layers_per_block": v.layers_per_block,
                "norm_num_groups": v.groups, "sample_size": cfg.resolution,
                "scaling_factor": v.scaling}
    return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
            "vocab_size": t.vocab_size, "hidden_size": t.width, "intermediate_size": t.mlp_width,
            "num_hidden_layers": t.layers, "num_attention_heads": t.heads,
            "max_position_embeddings": t.max_len, "hidden_act": "gelu", "layer_norm_eps": 1e-5,
            "projection_dim": t.width, "torch_dtype": "float32"}


def save(folder: str | Path, cfg: ModelConfig, fp16: bool = False, **modules: nn.Module) -> None:
    """Save components (unet=, vae=, text_encoder=) in the diffusers layout, with configs."""
    folder = Path(folder)
    for name, module in modules.items():
        sd = {k: v.detach().to("cpu", torch.float16 if fp16 else v.dtype).contiguous()
              for k, v in module.state_dict().items()}
        if name == "text_encoder":  # as transformers writes CLIPTextModel files
            sd = {"text_model." + k: v for k, v in sd.items()}
        file = folder / f"{FILES[name]}{'.fp16' if fp16 else ''}.safetensors"
        _atomic(lambda tmp: save_file(sd, tmp, metadata={"format": "pt"}), file)
        text = json.dumps(diffusers_config(cfg, name), indent=2)
        _atomic(lambda tmp: tmp.write_text(text), file.parent / "config.json")


def detect_preset(path: str | Path) -> tuple[str, str]:
    """Which SD 2.1 variant a weights path holds, and why we think so.

    Nothing in the tensors says epsilon or v (both variants have identical shapes), so this reads
    the MODEL file written by weights/fetch.py, a diffusers scheduler config, or the file name.
    """
    path = Path(path)
    marker = path / "MODEL"
    if marker.is_file():
        fields = dict(line.split("=", 1) for line in marker.read_text().split() if "=" in line)
        if fields.get("preset") in ("sd2.1", "sd2.1-base", "tiny"):
            return fields["preset"], f"{marker} says so"
    scheduler = path / "scheduler" / "scheduler_config.json"
    if scheduler.is_file():
        v = json.loads(scheduler.read_text()).get("prediction_type") == "v_prediction"
        return ("sd2.1" if v else "sd2.1-base"), f"{scheduler} gives its prediction type"
    name = path.name.lower()
    if "768" in name:
        return "sd2.1", f"the name {path.name!r} contains 768"
    if "512" in name or "base" in name:
        return "sd2.1-base", f"the name {path.name!r} contains 512 or base"
    return "sd2.1-base", ("assumed: nothing in the weights says epsilon or v; pass --model sd2.1 "
                          "for the 768 px v-prediction model")
