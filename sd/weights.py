"""Load SD 2.1 and SD 1.x weights in both official layouts (train/checkpoints.py saves them).

Layout A, diffusers folders: {unet,vae}/diffusion_pytorch_model[.fp16].safetensors and
text_encoder/model[.fp16].safetensors. Our parameter names ARE these keys, with three exceptions
for older files, handled in `_tidy`: a `text_model.` prefix on text keys, a stray
`text_model.embeddings.position_ids` buffer, and the VAE mid-block attention saved as
query/key/value/proj_attn with [C, C, 1, 1] conv shapes.

Layout B, one original LDM checkpoint (v2-1_{512,768}-ema-pruned, v1-5-pruned-emaonly, sd-v1-4;
.safetensors or .ckpt), is renamed to layout A by sd/ldm.py. Then both take the same path: read,
tidy, check, strict load.
"""

import json
import pickle
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from sd import ldm
from sd.clip import TextEncoder
from sd.config import PRESETS, RANDOM, ModelConfig, preset
from sd.errors import MissingWeights, WeightsError
from sd.unet import UNet
from sd.vae import VAE

FILES = {"unet": "unet/diffusion_pytorch_model", "vae": "vae/diffusion_pytorch_model",
         "text_encoder": "text_encoder/model"}


@dataclass
class Models:
    text_encoder: TextEncoder
    vae: VAE
    unet: UNet


def read(file: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a .safetensors or .ckpt file (the latter unpickled with weights_only)."""
    file = Path(file)
    if not file.is_file():
        raise WeightsError(f"{file}: {'a folder, not a file' if file.is_dir() else 'no such file'}")
    try:
        if file.suffix == ".safetensors":
            return load_file(file)
        sd = torch.load(file, map_location="cpu", weights_only=True)
    except SafetensorError as e:
        raise WeightsError(f"{file}: cannot be read as safetensors ({e}): the file is incomplete "
                           "or corrupt, or not safetensors; make or download it again") from e
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, KeyError, IndexError,
            ValueError, UnicodeDecodeError) as e:  # torch's text would
        # advise weights_only=False, i.e. running whatever code the file holds: never say that
        raise WeightsError(f"{file}: cannot be read: not a checkpoint, or a truncated one, or one "
                           "holding objects besides tensors (never unpickled: they could run "
                           "code). Make or download it again.") from e
    sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
    if not (isinstance(sd, dict) and all(isinstance(v, torch.Tensor) for v in sd.values())):
        raise WeightsError(f"{file}: not a weights file (it holds a {type(sd).__name__}, not "
                           "tensors by name)")
    return sd


def _component(path: Path, name: str, prefer_fp16: bool) -> Path:
    stem = path / FILES[name]
    options = [Path(f"{stem}{v}.safetensors") for v in ((".fp16", "") if prefer_fp16 else
                                                        ("", ".fp16"))]
    options += [Path(f"{stem}.bin")]
    for option in options:
        if option.is_file():
            return option
    raise WeightsError(f"{path}: no {name} weights (looked for {options[0].name} and "
                       f"{options[1].name} in {stem.parent}); download the model's files again "
                       "(weights/README.md)")


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


def check(module: nn.Module, sd: dict[str, torch.Tensor], name: str, source) -> None:
    """Raise a WeightsError naming every missing, unexpected or mis-shaped key."""
    want = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    probes = {"unet": "time_embedding.linear_1.weight", "vae": "encoder.conv_in.weight",
              "text_encoder": "embeddings.token_embedding.weight"}
    for other, probe in probes.items():  # a whole file in the wrong place: say so plainly
        if other != name and probe in sd:
            raise WeightsError(f"{source}: holds {other} weights where {name} weights were "
                               "expected; check which file went where.")
    missing = sorted(set(want) - set(sd))
    unexpected = sorted(set(sd) - set(want))
    shapes = sorted(k for k in set(want) & set(sd) if tuple(sd[k].shape) != want[k])
    if not (missing or unexpected or shapes):
        values(sd, name, source)
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
    found = family(name, {k: tuple(v.shape) for k, v in sd.items()})
    if found and found != family(name, want):
        lines.append(f"  This is {ldm.WHAT[found]}.")
    raise WeightsError("\n".join(lines))


def family(name: str, shapes: dict[str, tuple]) -> str | None:
    """The SD version of a text encoder's or UNet's tensor shapes, by its width (None for
    other widths: tiny and toy models)."""
    key = {"unet": "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight",
           "text_encoder": "embeddings.token_embedding.weight"}.get(name)
    return {768: "1.x", 1024: "2.x", 2048: "SDXL"}.get(shapes[key][1]) if key in shapes else None


def values(sd: dict[str, torch.Tensor], name: str, source) -> None:
    """Raise a WeightsError for a tensor that is not floating point (an int32 weight is a broken
    file, not something to cast) or holds NaN or infinity (it would draw black images)."""
    for key, v in sd.items():
        if not v.is_floating_point():
            raise WeightsError(f"{source}: {name} tensor {key} is {str(v.dtype)[6:]}, not floating "
                               "point: the file is broken or not SD weights; download it again")
        if not v.isfinite().all():
            raise WeightsError(f"{source}: {name} tensor {key} holds NaN or infinite values: the "
                               "file is damaged (or the training diverged); use another copy")


def state_dicts(path: str | Path, cfg: ModelConfig, prefer_fp16: bool = False) -> dict[str, dict]:
    """Diffusers-named state dicts of all three components, from either layout."""
    path = Path(path)
    if (path / "text_encoder_2").is_dir():
        raise WeightsError(f"{path}: this is {ldm.WHAT['SDXL']}.")
    if path.is_dir():
        return {n: _tidy(n, read(_component(path, n, prefer_fp16))) for n in FILES}
    if not path.exists():
        raise WeightsError(f"{path}: no such file or folder (weights/README.md says where the "
                           "weights come from)")
    return {n: _tidy(n, sd) for n, sd in ldm.convert(read(path), cfg, path).items()}


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
    """Load SD weights from a diffusers folder or an original single-file checkpoint."""
    sds = state_dicts(path, cfg, prefer_fp16=dtype == torch.float16)
    return build(cfg, device, dtype, sds, source=path)


def diffusers_config(cfg: ModelConfig, name: str) -> dict:
    """The config.json diffusers/transformers need to load a saved component."""
    u, v, t = cfg.unet, cfg.vae, cfg.text
    if name == "unet":
        return {"_class_name": "UNet2DConditionModel",
                "sample_size": cfg.resolution // cfg.vae.factor,  # latent side (toy: factor 4)
                "in_channels": u.in_channels, "out_channels": u.out_channels,
                "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D"
                                     for a in u.attention],
                "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D"
                                   for a in reversed(u.attention)],
                "block_out_channels": list(u.channels), "layers_per_block": u.layers_per_block,
                "attention_head_dim": list(u.heads), "cross_attention_dim": u.context_dim,
                "norm_num_groups": u.groups, "use_linear_projection": u.linear_projection,
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
            "max_position_embeddings": t.max_len, "hidden_act": t.activation,
            "layer_norm_eps": 1e-5, "projection_dim": t.width, "torch_dtype": "float32"}


def detect_preset(path: str | Path) -> tuple[str, str]:
    """Which preset a weights path holds, and why we think so.

    Nothing in the tensors says epsilon or v (SD 2.1's variants have identical shapes), so this
    reads the MODEL file written by weights/fetch.py, the text encoder's width (SD 1.x), a
    diffusers scheduler config, or the file name.
    """
    path = Path(path)
    marker = path / "MODEL"
    if marker.is_file():
        fields = dict(line.split("=", 1) for line in marker.read_text().split() if "=" in line)
        if fields.get("preset") in PRESETS:
            return fields["preset"], f"{marker} says so"
    text = path / "text_encoder" / "config.json"  # 1.x before the scheduler: both say epsilon
    if text.is_file() and json.loads(text.read_text()).get("hidden_size") == 768:
        return "sd1.5", f"{text} is 768 wide: SD 1.x's CLIP ViT-L (sd1.4 is the same network)"
    if path.suffix == ".safetensors" and path.is_file() and header_version(path) == "1.x":
        return "sd1.5", f"{path.name} holds SD 1.x's keys (sd1.4 is the same network)"
    scheduler = path / "scheduler" / "scheduler_config.json"
    if scheduler.is_file():
        v = json.loads(scheduler.read_text()).get("prediction_type") == "v_prediction"
        return ("sd2.1" if v else "sd2.1-base"), f"{scheduler} gives its prediction type"
    name = path.name.lower()
    if re.search(r"v1[-_.]?[45]|sd-?1[-_.]?[45]", name):
        return "sd1.5", f"the name {path.name!r} says SD 1.4 or 1.5 (the same network)"
    if "768" in name:
        return "sd2.1", f"the name {path.name!r} contains 768"
    if "512" in name or "base" in name:
        return "sd2.1-base", f"the name {path.name!r} contains 512 or base"
    return "sd2.1-base", ("assumed: nothing in the weights says epsilon or v; pass --model sd2.1 "
                          "for the 768 px v-prediction model")


def with_scaling(cfg: ModelConfig, path: str | Path) -> ModelConfig:
    """cfg with the latent scale a diffusers folder's vae/config.json gives (diffusers reads
    scaling_factor from there too): a retrained toy model measures its own; single files, and
    folders without it, keep the preset's."""
    file = Path(path) / "vae" / "config.json"
    if not file.is_file():
        return cfg
    try:
        scaling = json.loads(file.read_text()).get("scaling_factor")
    except (ValueError, AttributeError, OSError) as e:
        raise WeightsError(f"{file}: not a readable JSON object ({e}); make or download the "
                           "model again") from None
    if scaling is None or scaling == cfg.vae.scaling:
        return cfg
    return replace(cfg, vae=replace(cfg.vae, scaling=float(scaling)))


def header_version(file: Path) -> str | None:
    """ldm.version of a .safetensors single file, from its header alone (None if unreadable)."""
    try:
        with safe_open(file, "pt") as f:
            return ldm.version(f.keys())
    except (SafetensorError, OSError):
        return None


def resolve(model: str, weights: Path | None) -> tuple[ModelConfig, Path | None, str]:
    """The preset, the weights path (default weights/<preset>; tiny: None, random weights) and
    why that preset; "auto" asks detect_preset. A WeightsError says how to download absent ones."""
    if model in RANDOM and weights is None:
        return preset(model), None, "random weights"
    name = model if model != "auto" else "sd2.1-base"
    weights = weights or Path("weights") / name
    if name == "toy" and not (weights / "unet").exists():
        raise MissingWeights(f"No toy model at {weights} (its unet/ is missing).", "toy")
    if not weights.exists():
        raise MissingWeights(f"No {name} weights at {weights}.", name)
    if model == "auto":
        model, why = detect_preset(weights)
        return preset(model), weights, why
    return preset(model), weights, f"chosen with --model {model}"
