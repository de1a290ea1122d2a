"""Bad inputs that used to crash or lie, each refused the one way sd/cli.py sets for every entry
point: exit code 2 for what the user gave, 130 for Ctrl-C, one `error:` line, no traceback,
nothing written or evicted; and the good inputs next to them still work.

CLI cases run as subprocesses on the tiny preset (one thread each)."""

import os
import signal
import stat
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from sd import files
from sd.config import TINY
from sd.files import atomic_write
from sd.pipeline import Pipeline
from sd.weights import WeightsError, build
from train import checkpoints
from train.checkpoints import atomic_folder, save_weights

ROOT = Path(__file__).parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
SWAP = ["photoswap", "a red circle", "--subject", "circle", "--concept", "square", "--model",
        "tiny", "--steps", "2", "-q"]


def cli(module: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)


def refused(r: subprocess.CompletedProcess, message: str, before_loading: bool = True) -> None:
    """Exit code 2, one `error:` line holding `message`, no traceback; with `before_loading`,
    the model never loaded (every CLI prints its `model:` line just before it loads)."""
    print(r.stderr.strip())
    lines = [line for line in r.stderr.strip().splitlines() if not line.startswith("model:")]
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    if before_loading:
        assert "model:" not in r.stderr


def bomb(path: Path, side: int = 30000) -> Path:
    """A 45-byte PNG whose header claims side x side pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    file = tmp_path_factory.mktemp("photo") / "photo.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(file)
    return file


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    m = build(TINY)
    save_weights(folder, TINY, unet=m.unet, vae=m.vae, text_encoder=m.text_encoder)
    return folder


def test_outputs_that_cannot_be_written_are_refused_before_any_work(tmp_path):
    (tmp_path / "file").write_text("x")
    refused(cli("sd", "a cat", "--model", "tiny", "-o", "/proc/17.png"), "/proc is not writable")
    refused(cli(*SWAP, "-o", tmp_path / "file"), "is a file; give a folder")
    refused(cli(*SWAP, "-o", "/proc/x"), "/proc is not writable")
    refused(cli("toy", "swap", "-o", tmp_path / "file"), "is a file; give a folder")
    refused(cli("sd", "invert", tmp_path / "file", "--prompt", "x", "--model", "tiny", "-o",
                "/proc/x.inv"), "/proc is not writable")
    assert sorted(f.name for f in tmp_path.iterdir()) == ["file"]


def test_files_that_are_not_what_they_claim(tmp_path, photo):
    text = tmp_path / "notes.txt"
    text.write_text("learned tokens, I promise\n" * 20)
    refused(cli("sd", "a <x>", "--model", "tiny", "--concepts", text), "notes.txt: cannot be read")
    refused(cli(*SWAP, "--embeds", text), "cannot be read as a textual-inversion file")
    with pytest.raises(WeightsError, match="notes.txt: cannot be read"):  # the library alike
        Pipeline(build(TINY), TINY).add_concepts(text)
    big = bomb(tmp_path / "big.png")
    assert big.stat().st_size < 100
    refused(cli(*SWAP, "--image", big), "claims more pixels than this program reads")
    refused(cli("sd", "invert", big, "--prompt", "x", "--model", "tiny"), "claims more pixels")
    refused(cli("recipes", "cds", big, "--source", "a", "--target", "b", "--model", "tiny", "-o",
                tmp_path / "out.png"), "claims more pixels")
    cut = tmp_path / "cut.png"
    cut.write_bytes(photo.read_bytes()[:60])
    refused(cli("sd", "invert", cut, "--prompt", "x", "--model", "tiny"), f"{cut}: cannot be")
    assert sorted(f.name for f in tmp_path.iterdir()) == ["big.png", "cut.png", "notes.txt"]


def test_weights_with_a_wrong_dtype_or_nan_are_refused_by_name(tiny_folder, tmp_path):
    file = "unet/diffusion_pytorch_model.safetensors"
    for name, change, message in (
            ("ints", lambda v: v.to(torch.int32), "conv_in.weight is int32, not floating"),
            ("nan", lambda v: v.index_put_((torch.tensor([0]),), torch.tensor(float("nan"))),
             "conv_in.weight holds NaN")):
        folder = tmp_path / name
        subprocess.run(["cp", "-r", str(tiny_folder), str(folder)], check=True)
        sd = load_file(folder / file)
        sd["conv_in.weight"] = change(sd["conv_in.weight"].clone())
        save_file(sd, folder / file)
        refused(cli("sd", "a cat", "--model", "tiny", "--weights", folder, "-o",
                    tmp_path / f"{name}.png"), message, before_loading=False)
        assert not (tmp_path / f"{name}.png").exists()
    r = cli("sd", "a cat", "--model", "tiny", "--weights", tiny_folder, "--steps", "1", "-o",
            tmp_path / "fine.png")
    assert r.returncode == 0, r.stderr


def test_guidance_is_finite_and_zero_means_zero(tmp_path):
    refused(cli(*SWAP, "--guidance", "nan", "-o", tmp_path), "--guidance nan: give a finite")
    r = cli(*SWAP, "--guidance", "0", "-o", tmp_path)
    assert r.returncode == 0, r.stderr
    assert '"guidance": 0.0' in (tmp_path / "settings.json").read_text()
    pipe = Pipeline(build(TINY), TINY)
    with pytest.raises(ValueError, match="guidance nan: give a finite number"):
        pipe("a cat", steps=1, guidance=float("nan"))


def test_the_python_api_refuses_what_the_cli_refuses():
    from photoswap.settings import Settings, Swap, settings_for

    with pytest.raises(ValueError, match="unknown preset 'banana': give one of paper"):
        settings_for("photoswap", "banana")
    with pytest.raises(ValueError, match="unknown method 'magic': give one of photoswap"):
        settings_for("magic", "paper")
    with pytest.raises(ValueError, match="window 2.0 is outside"):
        settings_for("photoswap", phi=2.0)
    with pytest.raises(ValueError, match="window -0.1 is outside"):
        Swap(-0.1)
    with pytest.raises(ValueError, match="blend start 1.5"):
        Settings(blend_start=1.5)


def test_writers_of_one_file_at_once_never_collide(tmp_path):
    out = tmp_path / "same.png"
    argv = [sys.executable, "-m", "sd", "a cat", "--model", "tiny", "--steps", "2", "-q", "-o",
            str(out)]
    runs = [subprocess.Popen(argv, cwd=ROOT, env=ENV, stderr=subprocess.PIPE, text=True)
            for _ in range(3)]
    errors = [r.communicate(timeout=300)[1] for r in runs]
    assert [r.returncode for r in runs] == [0, 0, 0], errors
    assert Image.open(out).size == (64, 64)
    assert [f.name for f in tmp_path.iterdir()] == ["same.png"]  # no temporary file left


def test_files_get_the_users_umask_mode(tmp_path, photo):
    expected = 0o666 & ~_umask()
    r = cli("sd", "invert", photo, "--prompt", "x", "--model", "tiny", "--steps", "2",
            "--inner-steps", "1", "-q", "-o", tmp_path / "photo.inv")
    assert r.returncode == 0, r.stderr
    torch.manual_seed(0)
    m = build(TINY)
    save_weights(tmp_path / "model", TINY, unet=m.unet, vae=m.vae, text_encoder=m.text_encoder)
    files = [tmp_path / "photo.inv", *sorted((tmp_path / "model").rglob("*.safetensors"))]
    assert len(files) == 4
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == expected, (f, oct(f.stat().st_mode))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_size_far_beyond_the_model_is_announced(tmp_path):
    r = cli("sd", "a cat", "--model", "tiny", "--steps", "1", "--height", "512", "--width", "512",
            "-q", "-o", tmp_path / "big.png")
    assert r.returncode == 0, r.stderr
    warning = next(line for line in r.stderr.splitlines() if line.startswith("warning:"))
    assert "512x512 (x1) is 64x the pixels of tiny's 64x64" in warning
    lines = r.stderr.splitlines()
    assert lines.index(warning) < lines.index(f"wrote {tmp_path / 'big.png'}")


@pytest.mark.parametrize("command", [
    [*SWAP[:-3], "--steps", "999", "--height", "256", "--width", "256", "-q", "-o", "{tmp}"],
    ["sd", "invert", "{photo}", "--prompt", "x", "--model", "tiny", "--steps", "100",
     "--inner-steps", "100000", "-q", "-o", "{tmp}/x.inv"],
    ["recipes", "heatmap", "--toy", "100000", "--model", "tiny", "-q"],
], ids=["photoswap", "null_text", "heatmap"])
def test_ctrl_c_is_one_line_and_exit_code_130(command, tmp_path, photo):
    argv = [a.format(tmp=tmp_path, photo=photo) for a in command]
    # A shell without job control starts background jobs with SIGINT ignored, and a child
    # inherits that: give it Ctrl-C back.
    run = subprocess.Popen([sys.executable, "-m", *argv], cwd=ROOT, env=ENV,
                           stderr=subprocess.PIPE, text=True,
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        line = run.stderr.readline()  # the model: line, printed before loading
        assert line.startswith("model:"), line
        time.sleep(3)  # into the work
        for _ in range(6):  # a first Ctrl-C is now and then not acted on: press it again
            run.send_signal(signal.SIGINT)
            try:
                err = run.communicate(timeout=20)[1]
                break
            except subprocess.TimeoutExpired:
                continue
    finally:  # never leave a child running (it would slow every later test)
        run.kill()
        run.wait()
    print(line + err)
    assert run.returncode == 130, err
    assert err.strip().splitlines()[-1].startswith("interrupted") and "Traceback" not in err
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_ctrl_c_inside_exec_of_a_string_still_exits_130(tmp_path):
    # Where CI's null_text case above once died by SIGINT (returncode -2): Ctrl-C landed in
    # mpmath's exec() of a string (torch imports it at an optimiser's first use), which makes
    # CPython kill a `python -m` process with SIGINT at exit even though cli.run caught it.
    (tmp_path / "interrupted.py").write_text(
        "import sys\nfrom sd import cli\n\n"
        "def main(argv):\n    exec('raise KeyboardInterrupt')\n\n"
        "sys.exit(cli.run(main))\n")
    r = subprocess.run([sys.executable, "-m", "interrupted"], cwd=tmp_path, env=ENV,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 130, r.stderr
    assert r.stderr.strip() == "interrupted (nothing half-written is left)"


def _write_file(target: Path, text: str) -> None:
    with atomic_write(target) as tmp:
        tmp.write_text(text)


def _write_folder(target: Path, text: str) -> None:
    with atomic_folder(target) as tmp:
        (tmp / "state.pt").write_text(text)


@pytest.mark.parametrize("write, module", [(_write_file, files), (_write_folder, checkpoints)],
                         ids=["atomic_write", "atomic_folder"])
def test_ctrl_c_at_any_line_of_a_writer_leaves_the_old_or_the_new_and_nothing_else(
        write, module, tmp_path):
    """A real Ctrl-C lands between any two lines: raise KeyboardInterrupt at each line of the
    writer's module in turn (sys.settrace), until a run goes through."""
    target = tmp_path / "checkpoint-1"
    read = (lambda: (target / "state.pt").read_text()) if write is _write_folder else \
        target.read_text
    write(target, "old")
    tracer = sys.gettrace()  # coverage's or a debugger's, put back after each run
    for n in range(1, 1000):
        lines = 0

        def trace(frame, event, arg):
            nonlocal lines
            if frame.f_code.co_filename != module.__file__:
                return None
            if event == "line":
                lines += 1
                if lines == n:
                    raise KeyboardInterrupt
            return trace

        sys.settrace(trace)
        try:
            write(target, f"new {n}")
        except KeyboardInterrupt:
            assert read() in ("old", f"new {n}"), n
            assert [f.name for f in tmp_path.iterdir()] == [target.name], n
            write(target, "old")
            continue
        finally:
            sys.settrace(tracer)
        assert read() == f"new {n}" and [f.name for f in tmp_path.iterdir()] == [target.name]
        break
    print(f"{n - 1} interrupted runs")
    assert n > 5  # it did stop inside the writer


def test_dreambooth_resumes_refuse_damage_and_other_settings(tmp_path, photo):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(2):
        Image.open(photo).save(folder / f"{i}.png")
    out = tmp_path / "db"
    base = [folder, "--instance-prompt", "a photo of sks dog", "--model", "tiny", "-q",
            "--checkpoint-every", "1", "-o", out]
    assert cli("train", "dreambooth", *base, "--steps", "2").returncode == 0
    resume = ["train", "dreambooth", *base, "--steps", "3", "--resume", "latest"]
    refused(cli(*resume, "--lr", "1e-4"), "--lr 0.0001 (it had", before_loading=False)
    checkpoint = out / "checkpoint-2"
    unet = checkpoint / "unet" / "diffusion_pytorch_model.safetensors"
    whole = unet.read_bytes()
    unet.write_bytes(whole[: len(whole) // 2])
    r = cli(*resume)
    refused(r, "weights cannot be read", before_loading=False)
    assert "make weights" not in r.stderr and "earlier checkpoint" in r.stderr
    unet.write_bytes(whole)
    state = (checkpoint / "state.pt").read_bytes()
    (checkpoint / "state.pt").write_bytes(state[: len(state) // 2])
    refused(cli(*resume), "state.pt cannot be read", before_loading=False)
    (checkpoint / "state.pt").write_bytes(state)
    r = cli(*resume)
    assert r.returncode == 0 and (out / "checkpoint-3").is_dir(), r.stderr


def test_the_toy_swap_checks_its_model_before_touching_the_cache(tmp_path, tiny_folder):
    cache = tmp_path / "cache"
    (cache / "kept").mkdir(parents=True)
    (cache / "kept" / "recipe.json").write_text("{}")
    refused(cli("toy", "swap", "--weights", tiny_folder, "--cache", cache, "-o", tmp_path / "o"),
            "is not a toy model")
    assert [f.name for f in cache.iterdir()] == ["kept"] and not (tmp_path / "o").exists()
