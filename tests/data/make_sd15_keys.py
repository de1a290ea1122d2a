"""Writes sd15_diffusers_keys.json and sd15_ldm_keys.json: every tensor name and shape of SD 1.5
in its two real layouts, as SD 2.1's inventories beside them hold SD 2.1's. A test-only tool:

    .venv/bin/python tests/data/make_sd15_keys.py        # from the repository root

sd15_{unet,vae,text_encoder}_config.json are runwayml/stable-diffusion-v1-5's config.json files
(the fields they shipped; as mirrored at stable-diffusion-v1-5/stable-diffusion-v1-5).
The inventories are made from the reference classes, not from our modules:
- diffusers layout: diffusers' UNet2DConditionModel and AutoencoderKL and transformers'
  CLIPTextModel, built from SD 1.5's shipped configs (sd15_*_config.json here) on the meta
  device (the text keys without `text_model.`, as in SD 2.1's inventory);
- original layout (v1-5-pruned-emaonly): the UNet and VAE keys are LDM's, named as in SD 2.1's
  original checkpoint (the same LDM modules; sd21_ldm_to_diffusers.tsv pairs each with its
  diffusers name, diffusers' own conversion), with SD 1.5's shapes; the text encoder is the
  transformers CLIPTextModel LDM's FrozenCLIPEmbedder wrapped, under
  `cond_stage_model.transformer.`, with its position_ids buffer as the 2022 files hold it.
tests/test_sd1.py checks the second against the first with diffusers' single-file converters.
"""

import csv
import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

HERE = Path(__file__).parent


def config(name: str) -> dict:
    c = json.loads((HERE / f"sd15_{name}_config.json").read_text())
    return {k: v for k, v in c.items() if not k.startswith("_")}


def shapes(module: torch.nn.Module, prefix: str = "") -> dict[str, list[int]]:
    return {prefix + k: list(v.shape) for k, v in module.state_dict().items()}


def main() -> None:
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config("unet"))
        vae = AutoencoderKL(**config("vae"))
        text = CLIPTextModel(CLIPTextConfig(**config("text_encoder")))
    text_shapes = {k.removeprefix("text_model."): v for k, v in shapes(text).items()
                   if not k.endswith("position_ids")}  # not in today's files
    # the text keys without text_model. (transformers 5 names them so), as SD 2.1's inventory
    ours = {**shapes(unet, "unet/"), **shapes(vae, "vae/"),
            **{"text_encoder/" + k: v for k, v in text_shapes.items()}}
    ldm = {}
    rows = csv.DictReader(open(HERE / "sd21_ldm_to_diffusers.tsv"), delimiter="\t")
    for row in rows:
        name = row["diffusers_key"]
        if not name.startswith(("unet/", "vae/")):
            continue
        shape = ours[name]
        if len(json.loads(row["ldm_shape"])) == 4 and len(shape) == 2:
            shape = shape + [1, 1]  # the VAE's mid attention is a 1x1 conv in LDM
        ldm[row["ldm_key"]] = shape
    ldm |= {"cond_stage_model.transformer.text_model." + k: v for k, v in text_shapes.items()}
    # transformers of 2022 saved this buffer (arange(77), int64); today's does not
    ldm["cond_stage_model.transformer.text_model.embeddings.position_ids"] = [1, 77]
    for file, table in (("sd15_diffusers_keys.json", ours), ("sd15_ldm_keys.json", ldm)):
        (HERE / file).write_text(json.dumps(dict(sorted(table.items())), indent=0) + "\n")
        print(f"{file}: {len(table)} tensors")


if __name__ == "__main__":
    main()
