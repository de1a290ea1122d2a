"""`python -m sd` end to end on the tiny preset, and its answers to missing weights."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from sd.weights import detect_preset

ROOT = Path(__file__).parent.parent


def run(*args, cwd=ROOT):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "sd", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_tiny_text_to_image_with_heat_map(tmp_path):
    out = tmp_path / "img.png"
    r = run("a red circle on a blue background", "--model", "tiny", "--steps", "4",
            "--width", "96", "--heatmap", "circle", "blue", "--threshold", "0.4", "-o", str(out),
            "-q")
    assert r.returncode == 0, r.stderr
    image = np.asarray(Image.open(out))
    assert image.shape == (64, 96, 3)
    assert image.std() > 1, "the image is constant"
    heat = Image.open(tmp_path / "img_heatmap.png")
    assert heat.size == (5 * 96, 64)  # the image, one heat overlay per word, one mask per word


def test_heat_map_threshold_is_checked_first():
    r = run("a red circle", "--model", "tiny", "--heatmap", "circle", "--threshold", "1.5")
    assert r.returncode == 2 and "--threshold" in r.stderr.splitlines()[-1]


def test_missing_weights_say_how_to_get_them(tmp_path):
    r = run("a prompt", cwd=tmp_path)
    assert r.returncode == 2
    assert "make weights MODEL=sd2.1-base" in r.stderr and "Traceback" not in r.stderr
    r = run("a prompt", "--model", "sd2.1", cwd=tmp_path)
    assert "make weights MODEL=sd2.1" in r.stderr


def test_bad_weights_and_words_are_one_line_errors(tmp_path):
    bad = tmp_path / "v2-1_768-ema-pruned.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    r = run("a prompt", "--weights", str(bad), "--steps", "1")
    assert r.returncode == 2 and "cannot be read" in r.stderr and "Traceback" not in r.stderr
    r = run("a red circle", "--model", "tiny", "--heatmap", "square", "--steps", "1")
    assert r.returncode == 2 and "'square' not found" in r.stderr


def test_help():
    r = run("--help")
    assert r.returncode == 0 and "make weights" in r.stdout and "--heatmap" in r.stdout


def test_detect_preset(tmp_path):
    assert detect_preset(Path("v2-1_768-ema-pruned.safetensors"))[0] == "sd2.1"
    assert detect_preset(Path("v2-1_512-ema-pruned.ckpt"))[0] == "sd2.1-base"
    folder = tmp_path / "mine"
    folder.mkdir()
    name, why = detect_preset(folder)
    assert name == "sd2.1-base" and "assumed" in why
    (folder / "scheduler").mkdir()
    (folder / "scheduler/scheduler_config.json").write_text('{"prediction_type": "v_prediction"}')
    assert detect_preset(folder)[0] == "sd2.1"
    (folder / "MODEL").write_text("preset=sd2.1-base\nprediction=epsilon\n")
    assert detect_preset(folder) == ("sd2.1-base", f"{folder / 'MODEL'} says so")
