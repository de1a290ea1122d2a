"""Bad inputs get one line that says what to do, a non-zero exit code, no
traceback, and nothing half-written; and they are caught before anything loads.

CLI cases run as subprocesses on the tiny preset. "Before anything loads" is observable: every
CLI prints its `model: ...` line just before loading the model, so an error without that line
came first.
"""

import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from sd import inversion as nt
from sd import weights
from sd.config import TINY, InversionSettings
from sd.images import fit_warning, load_image
from sd.pipeline import Pipeline, concept_rows
from sd.weights import WeightsError
from train import UsageError
from train.dataset import ImageFolder
from train.dreambooth import train as db_train
from train.settings import DreamBoothSettings, TextualInversionSettings
from train.textual_inversion import train as ti_train

ROOT = Path(__file__).parent.parent


def cli(module: str, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def refused(r: subprocess.CompletedProcess, message: str, code: int) -> None:
    """One line (the error), the exit code, no traceback, and the model never loaded."""
    print(r.stderr.strip())
    assert r.returncode == code, r.stderr
    assert r.stderr.strip().count("\n") == 0 and message in r.stderr
    assert "Traceback" not in r.stderr and "model:" not in r.stderr


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    for i in range(2):
        Image.new("RGB", (64, 64), (200, 40 * i, 30)).save(folder / f"{i}.png")
    return folder


# ------------------------------------------------------------------------------------ python -m sd

def test_sd_arguments_are_checked_before_loading(tmp_path):
    (tmp_path / "file").write_text("x")
    cases = [(["--batch", "0"], "--batch 0: give 1 or more"),
             (["--batch", "-2"], "--batch -2: give 1 or more"),
             (["--height", "0"], "give multiples of 8, such as 64; got 0"),
             (["--height", "-64"], "give multiples of 8, such as 64; got -64"),
             (["--width", "100"], "give multiples of 8, such as 64; got 100"),
             (["--guidance", "nan"], "--guidance: give a finite number"),
             (["--eta", "-1"], "--eta: give 0 (deterministic) or more"),
             (["--seed", str(2**64)], "--seed: give 0 to 2**64 - 1"),
             (["--seed", "-1"], "--seed: give 0 to 2**64 - 1"),
             (["--steps", "0"], "steps must be in [1, 1000], got 0"),
             (["--device", "gpu"], "--device gpu: this machine has no such device"),
             (["-o", tmp_path], f"{tmp_path} is a folder; give a file name"),
             (["-o", tmp_path / "file" / "x.png"], "is a file, so"),
             (["-o", tmp_path / "x.xyz"], "unknown image extension '.xyz'")]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "--device cuda: this machine has no such device"))
    for args, message in cases:  # every one is what the user gave: exit code 2
        refused(cli("sd", "a red circle", "--model", "tiny", *args), message, 2)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["file"]  # nothing written


def test_toy_without_its_unet_says_where_it_comes_from(tmp_path):
    (tmp_path / "vae").mkdir()  # weights/toy as it was before the UNet was committed
    r = cli("sd", "a red circle", "--model", "toy", "--weights", tmp_path)
    assert r.returncode == 2 and "make toy" in r.stderr and "unet/ is missing" in r.stderr, r.stderr
    assert "make weights" not in r.stderr and "Traceback" not in r.stderr


def test_sd_concepts_are_checked_before_loading(tmp_path):
    torch.save({"step": 3, "optimizer": {}}, tmp_path / "state.pt")
    for width in (16, 48, 64, 768, 1024):
        save_file({f"<w{width}>": torch.ones(1, width)}, tmp_path / f"w{width}.safetensors")
    save_file({"<nan>": torch.full((1, 32), float("nan"))}, tmp_path / "nan.safetensors")
    cases = [(tmp_path, "a folder, not a file"), (tmp_path / "state.pt", "not a weights file"),
             (tmp_path / "w16.safetensors", "is [1, 16]; this model takes one vector of 32"),
             (tmp_path / "w48.safetensors", "is [1, 48]; this model takes one vector of 32"),
             (tmp_path / "w64.safetensors", "is [1, 64]; this model takes one vector of 32"),
             (tmp_path / "w1024.safetensors", "is [1, 1024]; this model takes one vector of 32"),
             (tmp_path / "w768.safetensors", "(an SD 1.x embedding: SD 1.x is 768 wide)"),
             (tmp_path / "nan.safetensors", "'<nan>' holds NaN or infinite values")]
    for file, message in cases:
        refused(cli("sd", "a photo of <x>", "--model", "tiny", "--concepts", file), message, 2)
    with pytest.raises(ValueError, match="holds NaN"):  # the library refuses them too
        Pipeline.load(TINY, None).add_concepts(tmp_path / "nan.safetensors")


def test_sd_writes_the_format_the_extension_names(tmp_path):
    for name, fmt in (("a.jpg", "JPEG"), ("b.JPEG", "JPEG"), ("c.png", "PNG")):
        r = cli("sd", "a red circle", "--model", "tiny", "--steps", "1", "-o", tmp_path / name)
        assert r.returncode == 0, r.stderr
        assert Image.open(tmp_path / name).format == fmt
    assert not list(tmp_path.glob("*.tmp"))


def test_checkpoint_files_that_are_not_state_dicts(tmp_path):
    torch.save(torch.zeros(3), tmp_path / "tensor.ckpt")
    torch.save([1, 2], tmp_path / "list.ckpt")
    (tmp_path / "random.ckpt").write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(WeightsError, match=r"not a weights file \(it holds a Tensor"):
        weights.read(tmp_path / "tensor.ckpt")
    with pytest.raises(WeightsError, match=r"not a weights file \(it holds a list"):
        weights.read(tmp_path / "list.ckpt")
    with pytest.raises(WeightsError, match="cannot be read: not a checkpoint") as e:
        weights.read(tmp_path / "random.ckpt")
    assert "weights_only" not in str(e.value)
    r = cli("sd", "x", "--weights", tmp_path / "list.ckpt", "--steps", "1")
    assert r.returncode == 2 and "not a weights file" in r.stderr and "Traceback" not in r.stderr
    r = cli("sd", "x", "--weights", tmp_path / "random.ckpt", "--steps", "1")
    assert r.returncode == 2 and "not a checkpoint" in r.stderr and "weights_only" not in r.stderr


# ------------------------------------------------------------------------------------ images

def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path):
    grey = np.full((64, 64), 20000, dtype=np.uint16)  # 20000 / 65535 = 0.305
    Image.fromarray(grey).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    x = load_image(tmp_path / "g16.png", 64, 64)
    assert abs(x.mean().item() - 20000 / 65535) < 0.01, x.mean()  # was 1.0: all white
    folder = ImageFolder(tmp_path, 64)
    assert abs(folder.images[0].float().mean().item() - 255 * 20000 / 65535) < 2


def test_tiny_and_extreme_images_are_reported(tmp_path):
    Image.new("RGB", (1, 1), "red").save(tmp_path / "a.png")
    Image.new("RGB", (12800, 1), "red").save(tmp_path / "b.png")
    Image.new("RGB", (64, 64), "red").save(tmp_path / "c.png")
    folder = ImageFolder(tmp_path, 64)
    print(*folder.warnings, sep="\n")
    assert folder.names == ["a.png", "c.png"]
    assert "b.png (12800x1: crop it to the subject)" in folder.warnings[0]
    assert "a.png (1x1)" in folder.warnings[1] and "upscaled" in folder.warnings[1]
    assert "scaled up 64x" in fit_warning((1, 1), 64, 64)
    assert "keeps 0.5%" in fit_warning((12800, 64), 64, 64)
    assert fit_warning((80, 64), 64, 64) is None
    r = cli("sd", "invert", tmp_path / "a.png", "--prompt", "x", "--model", "tiny", "--fast",
            "--steps", "2", "-q", "-o", tmp_path / "a.inv")
    assert r.returncode == 0, r.stderr
    assert f"warning: {tmp_path / 'a.png'}: it is 1x1, scaled up 64x" in r.stderr


# ---------------------------------------------------------------------------------- sd invert

def test_null_text_arguments_are_checked_before_loading(tmp_path, photos):
    (tmp_path / "file").write_text("x")
    photo = photos / "0.png"
    cases = [(["-o", tmp_path], f"{tmp_path} is a folder; give a file name"),
             (["-o", tmp_path / "file" / "x.inv"], "is a file, so"),
             (["--guidance", "inf"], "--guidance: give a finite number"),
             (["--inner-steps", "-1"], "--inner-steps: give 0 or more"),
             (["--steps", "200"], "null-text inversion takes at most 100"),
             (["--steps", "0"], "steps must be in [1, 1000], got 0")]
    for args, message in cases:
        refused(cli("sd", "invert", photo, "--prompt", "x", "--model", "tiny", *args), message,
                2)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["file"]


def test_fingerprint_covers_every_tensor(tiny, tmp_path):
    # every kind of tensor, in a model smaller than the tiny preset: one fingerprint per tensor
    small = replace(TINY, text=replace(TINY.text, vocab_size=512, layers=1),
                    vae=replace(TINY.vae, channels=(16, 16)),
                    unet=replace(TINY.unet, channels=(32, 32), attention=(True, False),
                                 heads=(2, 2), layers_per_block=1))
    models = weights.build(small)
    pipe = Pipeline(models, small)
    base = nt.fingerprint(pipe)
    changed = 0
    with torch.no_grad():
        for part in ("text_encoder", "vae", "unet"):
            for name, w in getattr(models, part).state_dict().items():
                flat = w.view(-1)
                k = flat.numel() // 2
                old = flat[k].clone()
                flat[k] = old + 0.01 * (1 + old.abs())  # visible in fp16
                assert nt.fingerprint(pipe) != base, f"{part}.{name} is not covered"
                flat[k] = old
                changed += 1
    assert nt.fingerprint(pipe) == base
    print(f"changing any one of {changed} tensors changes the fingerprint")
    pipe = Pipeline(tiny, TINY)
    inv = nt.invert(pipe, torch.zeros(1, 4, 8, 8), "x", InversionSettings(steps=2, fast=True))
    nt.save(inv, tmp_path / "x.inv")
    with torch.no_grad():
        tiny.vae.decoder.conv_out.bias[0] += 0.5  # a part the old fingerprint never read
        try:
            with pytest.raises(ValueError, match="invert the photo again with this model"):
                nt.load(tmp_path / "x.inv", pipe)
        finally:
            tiny.vae.decoder.conv_out.bias[0] -= 0.5


# ------------------------------------------------------------------------------------ trainers

def test_trainer_arguments_are_checked_before_loading(tmp_path, photos):
    (tmp_path / "file").write_text("x")
    db = ["train", "dreambooth", photos, "--instance-prompt", "a photo of sks", "--model", "tiny",
          "-o", tmp_path / "db"]
    ti = ["train", "textual-inversion", photos, "--token", "<sks>", "--model", "tiny",
          "-o", tmp_path / "ti"]
    cases = [(db, ["--grad-accum", "0"], "--grad-accum: give 1 or more"),
             (db, ["--batch-size", "0"], "--batch-size: give 1 or more"),
             (db, ["--checkpoint-every", "-1"], "--checkpoint-every: give 0"),
             (db, ["--keep", "-1"], "--keep: give 0 (keep all) or more"),
             (db, ["--lr", "nan"], "--lr: give a positive number"),
             (db, ["--steps", "0"], "--steps: give 1 or more"),
             (db, ["--class-prompt", "a dog"], "--class-prompt needs --class-dir"),
             (db, ["--class-prompt", "a", "--class-dir", tmp_path / "file"], "is a file"),
             (db, ["--resolution", "100"], "--resolution must be a multiple of 8, got 100"),
             (db, ["--device", "gpu"], "--device gpu: this machine has no such device"),
             (ti, ["-o", tmp_path / "file"], "-o: " + f"{tmp_path / 'file'} is a file"),
             (ti, ["--token", "two words"], "--token: give one new word without spaces"),
             (ti, ["--token", "dog"], "pick a new word that CLIP does not know"),
             (ti, ["--init-word", "hot dog"], "--init-word 'hot dog' is 2 tokens"),
             (ti, ["--resume", "latest"], "--resume latest: no checkpoint in")]
    for (module, *base), args, message in cases:
        refused(cli(module, *base, *args), message, 2)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["file"]


def test_keep_prunes_only_after_the_new_checkpoint_is_complete(photos, tmp_path, monkeypatch):
    torch.set_num_threads(1)
    args = DreamBoothSettings(instance_dir=photos, instance_prompt="a photo of sks", model="tiny",
                              quiet=True, steps=4, checkpoint_every=1, keep=2, out=tmp_path)
    db_train(args)
    assert sorted(f.name for f in tmp_path.glob("checkpoint-*")) == ["checkpoint-3",
                                                                     "checkpoint-4"]
    assert (tmp_path / "latest").read_text().strip() == "checkpoint-4"

    real_save = torch.save

    def dies_saving_checkpoint_6(obj, f, *a, **k):
        if "checkpoint-6" in str(f):
            raise KeyboardInterrupt
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", dies_saving_checkpoint_6)
    with pytest.raises(KeyboardInterrupt):  # checkpoint-5 saved and 3 pruned; 6 dies half-way
        db_train(replace(args, steps=6, keep=1, resume="latest"))
    assert sorted(f.name for f in tmp_path.glob("checkpoint-*")) == ["checkpoint-5"]
    assert (tmp_path / "latest").read_text().strip() == "checkpoint-5"


def test_resume_from_the_wrong_checkpoint_says_what_it_holds(photos, tmp_path):
    torch.set_num_threads(1)
    given = dict(instance_dir=photos, model="tiny", steps=1, quiet=True)
    db_train(DreamBoothSettings(**given, instance_prompt="a photo of sks", out=tmp_path / "db"))
    ti_train(TextualInversionSettings(**given, token="<a>", out=tmp_path / "ti"))
    common = [str(photos), "--model", "tiny", "--steps", "2", "-q"]
    db = ["train", "dreambooth", *common, "--instance-prompt", "a photo of sks"]
    ti = ["train", "textual-inversion", *common]
    refused(cli(*ti, "--token", "<b>", "-o", tmp_path / "ti", "--resume", "latest"),
            "it learned <a>, not '<b>': resume with --token <a>", 2)
    refused(cli(*db, "--train-text-encoder", "-o", tmp_path / "db", "--resume", "latest"),
            "it holds unet/diffusion_pytorch_model.safetensors, but this run trains unet and "
            "text_encoder", 2)
    refused(cli(*db, "-o", tmp_path / "db", "--resume", tmp_path / "ti" / "checkpoint-1"),
            "it holds learned_embeds.safetensors, but this run trains unet", 2)
    refused(cli(*ti, "--token", "<a>", "-o", tmp_path / "ti", "--resume",
                tmp_path / "db" / "checkpoint-1"), "but this run trains the token '<a>'", 2)
    with pytest.raises(UsageError, match="not '<b>'"):  # the library says the same
        ti_train(TextualInversionSettings(**given, token="<b>", out=tmp_path / "ti",
                                          resume="latest"))


def test_ctrl_c_says_where_the_checkpoint_is_and_how_to_resume(photos, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "train", "textual-inversion", str(photos), "--token", "<sks>",
            "--model", "tiny", "--steps", "100000", "--checkpoint-every", "1", "-q",
            "-o", str(tmp_path)]
    # A shell without job control starts background jobs with SIGINT ignored, and a child
    # inherits that (Python then installs no KeyboardInterrupt handler): give it Ctrl-C back.
    run = subprocess.Popen(argv, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True,
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 240
    while not (tmp_path / "latest").is_file() and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)
    run.send_signal(signal.SIGINT)
    err = run.communicate(timeout=120)[1]
    print(err)
    assert run.returncode == 130 and "Traceback" not in err
    latest = tmp_path / (tmp_path / "latest").read_text().strip()
    assert f"the last complete checkpoint is {latest}" in err
    command = err.strip().splitlines()[-1].strip()
    assert command.startswith("python -m train textual-inversion ")
    assert command.endswith("--resume latest") and "--token '<sks>'" in command
    assert not list(tmp_path.glob("*.tmp")) and (latest / "state.pt").is_file()


def test_concept_rows_names_both_widths():
    with pytest.raises(ValueError, match=r"'<x>' is \[2, 32\]; this model takes one vector"):
        concept_rows({"<x>": torch.zeros(2, 32)}, 32)
    assert concept_rows({"<x>": torch.zeros(32), "<y>": torch.ones(1, 32)}, 32).shape == (2, 32)
