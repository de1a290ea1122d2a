"""python -m photoswap as a user runs it: outputs on the tiny model, and bad input as one line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
BASE = ["a photo of a cat on the grass", "--subject", "cat", "--model", "tiny", "--steps", "3",
        "-q"]


def cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    # The kernel path is passed on: random weights drawn under another ATEN_CPU_CAPABILITY differ
    # (vectorised normal/uniform draws), and a test compares the CLI's model with its own.
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    env.update({k: v for k, v in os.environ.items() if k == "ATEN_CPU_CAPABILITY"})
    return subprocess.run([sys.executable, "-m", "photoswap", *args], capture_output=True,
                          text=True, cwd=cwd, env=env)


def one_line_error(r: subprocess.CompletedProcess, *phrases: str) -> None:
    assert r.returncode != 0, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    lines = [line for line in r.stderr.splitlines() if not line.startswith("model: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for phrase in phrases:
        assert phrase in lines[0], lines[0]


def test_help_is_fast_and_loads_no_torch():
    code = ("import sys, photoswap.__main__ as m\n"
            "try:\n    m.parse(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.stdout.strip().endswith("False"), r.stdout + r.stderr
    assert "--sweep-phi" in r.stdout and "official" in r.stdout


def test_swap_writes_the_pictures(tmp_path):
    mask = tmp_path / "mask.png"
    Image.new("L", (100, 30), 255).save(mask)
    r = cli(*BASE, "--concept", "sks dog", "--heatmap", "--layout", "--mask", str(mask),
            "--sweep-phi", "0", "0.5", "--sweep-a", "0.2", "0.4", "0.6", "-o", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr
    out = tmp_path / "o"
    sizes = {p.name: Image.open(p).size for p in out.glob("*.png")}
    assert sizes["swap.png"] == sizes["source.png"] == (64, 64)
    assert sizes["grid.png"] == (2 * 64, 64 + 12)  # source | swap, under caption strips
    assert sizes["heat.png"] == sizes["layout.png"] == (2 * 64, 64 + 12)
    assert sizes["sweep.png"] == (3 * 64, 2 * (64 + 12))  # rows phi, columns A
    record = json.loads((out / "settings.json").read_text())
    assert record["target"] == "a photo of a sks dog on the grass"
    assert record["settings"]["phi"]["window"] == 0.2 and record["steps"] == 3
    assert record["mask"] == str(mask)


def test_missing_subject_lists_the_prompts_words(tmp_path):
    one_line_error(cli(*BASE[:2], "dog", *BASE[3:], "--concept", "sks dog"),
                   "'dog' not found", "a, photo, of, a, cat, on, the, grass")


def test_unknown_concept_token(tmp_path):
    one_line_error(cli(*BASE, "--concept", "<my-dog>"), "'<my-dog>' is unknown to the tokenizer",
                   "--embeds")


def test_unreadable_mask(tmp_path):
    bad = tmp_path / "mask.png"
    bad.write_text("not an image")
    one_line_error(cli(*BASE, "--concept", "sks dog", "--mask", str(bad)),
                   "cannot be read as an image")


def test_bad_size_before_loading():
    one_line_error(cli(*BASE, "--concept", "sks dog", "--height", "70"), "multiple of 8")


@pytest.mark.parametrize("flag", ["--phi", "--a", "--blend-start", "--sweep-a"])
def test_window_outside_unit_interval(flag):
    args = ["--sweep-phi", "0.1"] if flag == "--sweep-a" else []
    one_line_error(cli(*BASE, "--concept", "sks dog", flag, "1.5", *args), "outside [0, 1]")


def test_inversion_from_another_model(tmp_path):
    from sd.inversion import Inversion, save

    inv = Inversion(torch.zeros(1, 4, 8, 8), [torch.zeros(1, 77, 32)] * 3, BASE[0], 3, 7.5,
                    "negative-prompt", 0, 0.01, 1e-5, "sd2.1-base/0123456789abcdef")
    save(inv, tmp_path / "other.inv")
    one_line_error(cli(*BASE, "--concept", "sks dog", "--inversion", str(tmp_path / "other.inv")),
                   "invert the photo again with this model")


def test_make_swap_without_weights_says_what_to_provide(tmp_path):
    r = subprocess.run(["make", "-s", "toy-weights", f"SWAP_WEIGHTS={tmp_path}/none"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "Provide the toy model there" in r.stderr
    assert "SWAP_WEIGHTS=weights/sd2.1-base" in r.stderr


def test_textual_inversion_concept(tmp_path):
    from safetensors.torch import save_file

    save_file({"<my-dog>": torch.randn(1, 32)}, tmp_path / "learned_embeds.safetensors")
    embeds = str(tmp_path / "learned_embeds.safetensors")
    r = cli(*BASE, "--concept", "<my-dog>", "--embeds", embeds, "-o", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "o" / "settings.json").read_text())["target"] == \
        "a photo of a <my-dog> on the grass"
    other = cli(*BASE, "--concept", "<your-dog>", "--embeds",
                str(tmp_path / "learned_embeds.safetensors"))
    one_line_error(other, "'<your-dog>' is unknown to the tokenizer", "defines <my-dog>")


def test_photo_and_saved_inversion_sources(tmp_path):
    """A photo inverted on the fly (fast mode), and the same photo's saved inversion: the source
    branch redraws the photo's inversion; the saved one gives the same pictures."""
    from sd.config import TINY, InversionSettings
    from sd.inversion import invert, save
    from sd.pipeline import Pipeline

    photo = tmp_path / "photo.png"
    Image.new("RGB", (90, 70), (200, 40, 40)).save(photo)
    r = cli(*BASE, "--concept", "sks dog", "--image", str(photo), "--fast", "-o",
            str(tmp_path / "a"))
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "a" / "grid.png").size == (3 * 64, 64 + 12)  # photo | src | swap

    torch.manual_seed(0)  # the CLI's --seed 0 draws the tiny model's weights the same way
    pipe = Pipeline.load(TINY, None, "cpu", torch.float32)
    inv = invert(pipe, pipe.encode(photo), BASE[0], InversionSettings(steps=3, fast=True))
    save(inv, tmp_path / "p.inv")
    r = cli(*BASE, "--concept", "sks dog", "--inversion", str(tmp_path / "p.inv"), "-o",
            str(tmp_path / "b"))
    assert r.returncode == 0, r.stderr
    for name in ("source.png", "swap.png"):
        a, b = (torch.tensor(list(Image.open(tmp_path / d / name).getdata())).float()
                for d in "ab")
        assert (a - b).abs().max() <= 1, name  # the same inversion, up to rounding
    wrong = cli("a photo of a dog", "--subject", "dog", *BASE[3:], "--concept", "sks cat",
                "--inversion", str(tmp_path / "p.inv"))
    one_line_error(wrong, "was inverted with the prompt")


def test_dreambooth_folder_concept(tmp_path):
    """A DreamBooth'd model is a weights folder: the swap loads it for both branches."""
    from sd.config import TINY
    from sd.weights import build
    from train.checkpoints import save_weights

    torch.manual_seed(3)
    m = build(TINY)
    save_weights(tmp_path / "dog", TINY, unet=m.unet, vae=m.vae, text_encoder=m.text_encoder)
    r = cli(*BASE, "--concept", "sks dog", "--weights", str(tmp_path / "dog"), "-o",
            str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "o" / "settings.json").read_text())["weights"] == \
        str(tmp_path / "dog")


@pytest.mark.parametrize("method", ["masactrl", "pnp"])
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_other_methods_run_in_both_dtypes(tmp_path, dtype, method):
    """--method masactrl and pnp on the tiny model (their equality with the official
    algorithms: tests/test_methods.py), fp32 and fp16, with the heat map recorder beside them."""
    out, photo = tmp_path / dtype, tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(photo)
    r = cli(*BASE, "--concept", "sks dog", "--method", method, "--dtype", dtype, "--heatmap",
            "--image", str(photo), "-o", str(out))
    assert r.returncode == 0, r.stderr
    record = json.loads((out / "settings.json").read_text())
    assert record["method"] == method
    assert record["settings"] == ({"start_step": 4, "layers": {"places": ["up"], "min_level": 0,
                                                               "max_level": 1}}
                                  if method == "masactrl" else record["settings"] | {
                                      "features": 0.8, "attention": 0.5})
    assert np.asarray(Image.open(out / "swap.png")).std() > 1  # a picture, not a constant


def test_masactrl_and_pnp_refuse_photoswaps_settings():
    r = cli(*BASE, "--concept", "sks dog", "--method", "masactrl", "--a", "0.5", "--no-blend")
    one_line_error(r, "--a --no-blend", "masactrl has its published ones")
    one_line_error(cli(*BASE, "--concept", "sks dog", "--method", "pnp"), "give --image")
